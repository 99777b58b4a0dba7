"""Error feedback around any codec (Seide et al.; Karimireddy et al.).

For each tensor name, the residual r (float64) left by the last step is added before encoding and
replaced by what the codec lost: c = g + r, payload = encode(c), r ← c − decode(payload). So
g + r_old = decoded + r_new up to the float64 rounding of two additions (tested). The residuals are
part of :meth:`state_dict`, so a checkpoint resumes exactly.
"""

from __future__ import annotations

import torch

from hvdquant.codecs.base import Codec, Encoded, Layout, Recover, TensorContext, flat32
from hvdquant.stats import DecodeStats


class ErrorFeedback(Codec):
    """``ErrorFeedback(codec)``: ``codec`` with per-tensor residuals carried across steps."""

    scheme = "ef"

    def __init__(self, codec: Codec) -> None:
        if not isinstance(codec, Codec):
            raise TypeError(f"ErrorFeedback wraps an hvdquant codec, got {type(codec).__name__}")
        if isinstance(codec, ErrorFeedback):
            raise ValueError("ErrorFeedback(ErrorFeedback(...)) would carry two residuals: wrap once")
        self.codec = codec
        self.residuals: dict[str, torch.Tensor] = {}

    def config(self) -> dict:
        return {"scheme": f"ef({self.codec.scheme})", "inner": self.codec.config()}

    def layout(self, n: int, ctx: TensorContext) -> Layout:
        return self.codec.layout(n, ctx)

    def formula_bits(self, n: int, ctx: TensorContext) -> float:
        return self.codec.formula_bits(n, ctx)

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        flat = flat32(g).double()
        r = self.residuals.get(ctx.name)
        if r is not None and r.numel() != flat.numel():
            raise ValueError(f"'{ctx.name}' has {flat.numel()} elements but its residual has {r.numel()}")
        c = flat if r is None else flat + r.to(flat.device)  # a restored residual may sit on another device
        enc = self.codec.encode(c.float(), ctx)
        self.residuals[ctx.name] = c - self.codec.decode(enc, ctx).double()
        return enc

    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        return self.codec.decode(enc, ctx)

    def from_bytes(self, buf: torch.Tensor, n: int, ctx: TensorContext) -> Encoded:
        return self.codec.from_bytes(buf, n, ctx)

    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        return self.codec.aggregate(payloads, ctx, recover)

    def recovery_payload(self, enc: Encoded, ctx: TensorContext, buckets: list[int]) -> torch.Tensor:
        return self.codec.recovery_payload(enc, ctx, buckets)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residuals = {k: v.clone().double() for k, v in state.items()}
