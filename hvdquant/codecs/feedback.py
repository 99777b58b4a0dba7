"""Error feedback around any codec (Seide et al.; Karimireddy et al.).

For each tensor name, the residual r (float64) left by the last step is added before encoding and
replaced by what the codec lost: c = g + r, payload = encode(c), r ← c − ĝ, ĝ being what every
receiver takes the payload for (:meth:`Codec.reconstruction`). So g + r_old = ĝ + r_new up to the
float64 rounding of two additions (tested). The residuals live in the exchange's
:class:`~hvdquant.codecs.state.CodecState` (``ctx.state.residuals``), which the exchange
checkpoints, so a checkpoint resumes exactly; the codec itself is frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hvdquant.codecs.base import Codec, Encoded, Layout, Recover, TensorContext, flat32
from hvdquant.codecs.state import require_state
from hvdquant.stats import DecodeStats


@dataclass(frozen=True)
class ErrorFeedback(Codec):
    """``ErrorFeedback(codec)``: ``codec`` with per-tensor residuals carried across steps in
    ``ctx.state`` (required: a context without a state raises)."""

    codec: Codec

    scheme = "ef"

    def __post_init__(self) -> None:
        if not isinstance(self.codec, Codec):
            raise TypeError(f"ErrorFeedback wraps an hvdquant codec, got {type(self.codec).__name__}")
        if isinstance(self.codec, ErrorFeedback):
            raise ValueError("ErrorFeedback(ErrorFeedback(...)) would carry two residuals: wrap once")

    def config(self) -> dict:
        return {"scheme": f"ef({self.codec.scheme})", "inner": self.codec.config()}

    def layout(self, n: int, ctx: TensorContext) -> Layout:
        return self.codec.layout(n, ctx)

    def formula_bits(self, n: int, ctx: TensorContext) -> float:
        return self.codec.formula_bits(n, ctx)

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        enc = self.encode_group([g], [ctx])[0]
        if enc is None:
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        return enc

    def encode_group(self, parts: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """c = g + r for every part, the codec's group encoding of the c's, then r ← c − ĝ (residuals
        of parts that were not finite stay as they were). The group's c and r are each one flat
        float64 buffer (the residuals kept are views of it): a constant number of operations
        however many parts."""
        if not parts:
            return []
        flats = [flat32(g) for g in parts]
        lengths = [f.numel() for f in flats]
        corrected = torch.cat(flats).double() + torch.cat([self._residual(f, ctx) for f, ctx in zip(flats, ctxs)])
        encs = self.codec.encode_group(list(corrected.float().split(lengths)), ctxs)
        sent = [i for i, e in enumerate(encs) if e is not None]
        recon = self.codec.reconstruction_group([encs[i] for i in sent], [ctxs[i] for i in sent])
        if len(sent) == len(encs):
            left = (corrected - torch.cat(recon).double()).split(lengths) if recon else []
        else:  # a part was refused: the others' residuals one by one
            mine = corrected.split(lengths)
            left = {i: mine[i] - r.double() for i, r in zip(sent, recon)}  # type: ignore[assignment]
        for i in sent:
            ctxs[i].state.residuals[ctxs[i].name] = left[i]  # type: ignore[union-attr]
        return encs

    def _residual(self, flat: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        """This tensor's residual r (float64, on the gradient's device: a restored one may sit on
        another), or −0.0 everywhere before its first step: adding −0.0 leaves every value exactly
        as it is, so c = g there, signed zeros included."""
        residuals = require_state(ctx.state, "ErrorFeedback", "its residuals").residuals
        r = residuals.get(ctx.name)
        if r is None:
            return torch.full((flat.numel(),), -0.0, dtype=torch.float64, device=flat.device)
        if r.numel() != flat.numel():
            raise ValueError(f"'{ctx.name}' has {flat.numel()} elements but its residual has {r.numel()}")
        return r.to(flat.device)

    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        return self.codec.decode(enc, ctx)

    def decode_group(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext]) -> list[torch.Tensor]:
        return self.codec.decode_group(encs, ctxs)

    def reconstruction(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        return self.codec.reconstruction(enc, ctx)

    def reconstruction_group(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext]) -> list[torch.Tensor]:
        return self.codec.reconstruction_group(encs, ctxs)

    def from_bytes_group(self, bufs: Sequence[torch.Tensor], ns: Sequence[int], ctxs: Sequence[TensorContext]
                         ) -> list[Encoded]:
        return self.codec.from_bytes_group(bufs, ns, ctxs)

    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        return self.codec.aggregate(payloads, ctx, recover)

    def aggregate_group(self, payloads: Sequence[list[Encoded]], ctxs: Sequence[TensorContext],
                        recovers: Sequence[Recover | None]) -> list[tuple[torch.Tensor, DecodeStats]]:
        return self.codec.aggregate_group(payloads, ctxs, recovers)

    def recovery_payload(self, enc: Encoded, ctx: TensorContext, requests: list) -> torch.Tensor:
        return self.codec.recovery_payload(enc, ctx, requests)  # type: ignore[attr-defined]
