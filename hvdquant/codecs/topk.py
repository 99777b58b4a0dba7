"""Top-k sparsification (the DGC-style warm-up that learned gradient compression starts from,
docs/ALGORITHMS.md §6): send the k = ⌈ratio·n⌉ coordinates of largest magnitude as (int32 index,
float32 value) pairs; the rest decode as 0. Biased on its own: wrap it in
:class:`~hvdquant.codecs.feedback.ErrorFeedback`, as DGC does (``hvdquant.TopK.with_feedback(ratio)``).
Ties are broken by the lower index, so every rank selects the same coordinates for the same input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hvdquant.codecs.base import Codec, Encoded, Layout, TensorContext, all_finite, flat32
from hvdquant.kernels import ops


@dataclass(frozen=True)
class TopK(Codec):
    ratio: float = 0.01

    scheme = "topk"

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"TopK ratio={self.ratio!r} must be a number in (0, 1]")

    @staticmethod
    def with_feedback(ratio: float = 0.01) -> Codec:
        from hvdquant.codecs.feedback import ErrorFeedback

        return ErrorFeedback(TopK(ratio))

    def k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n))) if n else 0

    def layout(self, n: int, ctx: TensorContext | None = None) -> Layout:
        return [("indices", torch.int32, self.k(n)), ("values", torch.float32, self.k(n))]

    def formula_bits(self, n: int, ctx: TensorContext | None = None) -> float:
        return 64.0 * self.k(n) / n if n else 0.0

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        flat = flat32(g)
        if not all_finite(flat):
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        idx = ops.topk_indices(flat, self.k(flat.numel()))
        return Encoded(flat.numel(), {"indices": idx.to(torch.int32), "values": flat[idx]})

    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        out = torch.zeros(enc.n, dtype=torch.float32, device=enc.fields["values"].device)
        idx = enc.fields["indices"].long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= enc.n):
            raise ValueError("top-k payload holds an index outside the tensor")
        out[idx] = enc.fields["values"]
        return out
