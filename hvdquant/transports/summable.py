"""Carrying small integer codes through a stock SUM/AVERAGE allreduce (docs/ALGORITHMS.md §3).

Horovod's torch allreduce takes int32/int64/float16/float32/float64 only, and it averages integer
tensors by floor division. So codes are offset to be non-negative, packed ``per_word`` at a time
into fields of ``width`` bits of a float64 word (values below 2^50, exact in float64), and one
sentinel word equal to 1.0 is appended. After the reduction the sentinel holds c·P, where c is
whatever factor the reduction applied (1 for Sum, 1/P for Average, any pre/postscale factors):
the receiver recovers c, divides it out, rounds each word to the exact integer sum and splits the
fields. A field of ``width`` bits holds the sum of P offsets in [0, 2s] as long as 2sP < 2^width,
so sums never overflow into their neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hvdquant.kernels import ops

WORD_BITS = ops.SUM_WORD_BITS


@dataclass(frozen=True)
class SumFieldLayout:
    """Fields for per-rank values v + ``offset`` in [0, ``span``], summed over ``ranks`` ranks."""

    offset: int
    span: int
    ranks: int

    @classmethod
    def for_levels(cls, levels: int, ranks: int) -> SumFieldLayout:
        """DQSG indices k ∈ [−s, s]: offset s, span 2s."""
        return cls(levels, 2 * levels, ranks)

    def __post_init__(self) -> None:
        if self.span < 1 or self.ranks < 1 or self.offset < 0:
            raise ValueError(f"span ({self.span}) and ranks ({self.ranks}) must be >= 1, offset >= 0")
        if self.width > WORD_BITS:
            raise ValueError(f"sums of {self.ranks} values in [0, {self.span}] need "
                             f"{self.width} bits, more than a float64 word's {WORD_BITS}")

    @property
    def width(self) -> int:
        """w = ⌈log2(span·P + 1)⌉ bits: a field holds the sum of P values in [0, span]."""
        return (self.span * self.ranks).bit_length()

    @property
    def per_word(self) -> int:
        return WORD_BITS // self.width

    def words(self, n: int) -> int:
        """Words handed to the collective for n codes, sentinel included."""
        return math.ceil(n / self.per_word) + 1

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """int8 values -> float64 words (+ sentinel 1.0), ready for a SUM or AVERAGE allreduce."""
        out = torch.empty(self.words(codes.numel()), dtype=torch.float64, device=codes.device)
        ops.pack_sum_fields(codes.contiguous(), self.offset, self.width, self.per_word, out=out[:-1])
        out[-1] = 1.0
        return out

    def unpack(self, reduced: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        """Reduced words -> (Σ_p v_p as int32, factor c the reduction applied to the sum)."""
        if reduced.dtype != torch.float64 or reduced.numel() != self.words(n):
            raise ValueError(f"reduced payload has {reduced.numel()} {reduced.dtype} words, "
                             f"expected {self.words(n)} float64")
        factor = float(reduced[-1]) / self.ranks
        if not math.isfinite(factor) or factor <= 0.0:
            raise ValueError(f"the reduction scaled the payload by {factor!r}: only positive finite "
                             "factors (Sum, Average, pre/postscale) keep the packed fields decodable")
        ksum = ops.unpack_sum_fields(reduced[:-1].contiguous(), n, self.offset * self.ranks,
                                     self.width, self.per_word, factor)
        return ksum, factor
