"""Top-k sparsification (the DGC-style warm-up that learned gradient compression starts from,
docs/ALGORITHMS.md §6): send the k = ⌈ratio·n⌉ coordinates of largest magnitude as (int32 index,
float32 value) pairs; the rest decode as 0. Biased on its own: wrap it in
:class:`~hvdquant.codecs.feedback.ErrorFeedback`, as DGC does (``hvdquant.TopK.with_feedback(ratio)``).
Ties are broken by the lower index, so every rank selects the same coordinates for the same input.
A fused group is selected, and decoded, in the same few operations however many tensors it holds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hvdquant.codecs.base import Codec, Encoded, Layout, TensorContext, all_finite, each_finite, flat32
from hvdquant.codecs.grouped import GroupDecoding
from hvdquant.kernels import ops


@dataclass(frozen=True)
class TopK(GroupDecoding, Codec):
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
        return self.decode_flat([enc], [ctx])

    # ------------------------------------------------------------- a fused group at once
    def encode_group(self, parts: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """:meth:`encode` of every part with the same bytes: one selection over the group
        (:func:`ops.topk_indices` by segment); None where a part is not finite."""
        if not self.grouped(ctxs):
            return super().encode_group(parts, ctxs)
        flats = [flat32(g) for g in parts]
        lengths = [f.numel() for f in flats]
        ks = [self.k(n) for n in lengths]
        source = torch.cat(flats)
        chosen = ops.topk_indices(source, ks, lengths)
        local = (chosen - _starts(lengths, ks, source.device)).to(torch.int32)
        return [Encoded(n, {"indices": i, "values": v}) if ok else None
                for n, i, v, ok in zip(lengths, local.split(ks), source[chosen].split(ks), each_finite(source, flats))]

    def decode_flat(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext], sender: int | None = None
                    ) -> torch.Tensor:
        """Every payload's values at its indices, zeros elsewhere, end to end (no dither: the same for
        every ``sender``); ValueError if an index lies outside its tensor."""
        lengths = [e.n for e in encs]
        ks = [e.fields["indices"].numel() for e in encs]
        device = encs[0].fields["values"].device
        idx = torch.cat([e.fields["indices"] for e in encs]).long()
        bound = torch.tensor(lengths, device=device).repeat_interleave(torch.tensor(ks, device=device))
        if idx.numel() and bool(((idx < 0) | (idx >= bound)).any()):
            raise ValueError("top-k payload holds an index outside the tensor")
        out = torch.zeros(sum(lengths), dtype=torch.float32, device=device)
        out[idx + _starts(lengths, ks, device)] = torch.cat([e.fields["values"] for e in encs])
        return out


def _starts(lengths: list[int], ks: list[int], device: torch.device) -> torch.Tensor:
    """For each of the ks[s] entries of segment s, where that segment starts among the segments
    ``lengths`` end to end (int64)."""
    starts = torch.tensor([0, *itertools.accumulate(lengths)][:-1], device=device)
    return starts.repeat_interleave(torch.tensor(ks, device=device))
