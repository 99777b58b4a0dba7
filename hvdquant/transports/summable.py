"""Carrying small integer codes through a stock SUM/AVERAGE allreduce (ALGORITHMS.md §3).

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
    """Field layout for codes in [-levels, levels] summed over ``ranks`` ranks."""

    levels: int
    ranks: int

    def __post_init__(self) -> None:
        if self.levels < 1 or self.ranks < 1:
            raise ValueError(f"levels ({self.levels}) and ranks ({self.ranks}) must be >= 1")
        if self.width > WORD_BITS:
            raise ValueError(f"sums of {self.ranks} codes in [-{self.levels}, {self.levels}] need "
                             f"{self.width} bits, more than a float64 word's {WORD_BITS}")

    @property
    def width(self) -> int:
        """w = ⌈log2(2sP + 1)⌉ bits: a field holds the sum of P offsets in [0, 2s]."""
        return (2 * self.levels * self.ranks).bit_length()

    @property
    def per_word(self) -> int:
        return WORD_BITS // self.width

    def words(self, n: int) -> int:
        """Words handed to the collective for n codes, sentinel included."""
        return math.ceil(n / self.per_word) + 1

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """int8 codes -> float64 words (+ sentinel 1.0), ready for a SUM or AVERAGE allreduce."""
        out = torch.empty(self.words(codes.numel()), dtype=torch.float64, device=codes.device)
        ops.pack_sum_fields(codes.contiguous(), self.levels, self.width, self.per_word, out=out[:-1])
        out[-1] = 1.0
        return out

    def unpack(self, reduced: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        """Reduced words -> (Σ_p k_p as int32, factor c the reduction applied to the sum)."""
        if reduced.dtype != torch.float64 or reduced.numel() != self.words(n):
            raise ValueError(f"reduced payload has {reduced.numel()} {reduced.dtype} words, "
                             f"expected {self.words(n)} float64")
        factor = float(reduced[-1]) / self.ranks
        if not math.isfinite(factor) or factor <= 0.0:
            raise ValueError(f"the reduction scaled the payload by {factor!r}: only positive finite "
                             "factors (Sum, Average, pre/postscale) keep the packed fields decodable")
        ksum = ops.unpack_sum_fields(reduced[:-1].contiguous(), n, self.levels * self.ranks,
                                     self.width, self.per_word, factor)
        return ksum, factor
