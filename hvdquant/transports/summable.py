"""Carrying small integer codes through a stock SUM/AVERAGE allreduce (docs/ALGORITHMS.md §3).

Horovod's torch allreduce takes int32/int64/float16/float32/float64 only, and it averages integer
tensors by floor division. So codes are offset to be non-negative and packed ``per_word`` at a time
as the base-R digits of a float64 word, R = span·P + 1 (values below R^F ≤ 2^50, exact in float64),
and one sentinel word equal to 1.0 is appended. After the reduction the sentinel holds c·P, where c
is whatever factor the reduction applied (1 for Sum, 1/P for Average, any pre/postscale factors):
the receiver recovers c, divides it out, rounds each word to the exact integer sum and splits the
digits. A digit holds the sum of P offsets in [0, span] because span·P < R, so sums never carry
into their neighbours. (A power-of-two R would be bit fields; the smallest R packs the most: for
span 2, i.e. s = 1, P = 4 gives R = 9 and 15 digits a word, 4.27 bits per coordinate, where 4-bit
fields give 12, 5.33 bits.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hvdquant.kernels import ops, sizes

WORD_BITS = sizes.SUM_WORD_BITS


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
        if self.radix > 1 << WORD_BITS:
            raise ValueError(f"sums of {self.ranks} values in [0, {self.span}] need digits of base "
                             f"{self.radix}, more than a float64 word's 2^{WORD_BITS}")

    @functools.cached_property
    def radix(self) -> int:
        """R = span·P + 1: a digit holds the sum of P values in [0, span]."""
        return self.span * self.ranks + 1

    @functools.cached_property
    def per_word(self) -> int:
        """F = the most digits with R^F ≤ 2^50."""
        return _digits_per_word(self.radix)

    def field_words(self, n: int) -> int:
        """Words holding n codes (no sentinel)."""
        return math.ceil(n / self.per_word)

    def words(self, n: int) -> int:
        """Words handed to the collective for n codes, sentinel included."""
        return self.field_words(n) + 1

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """int8 values -> float64 words (+ sentinel 1.0), ready for a SUM or AVERAGE allreduce."""
        return SumMessage(self.ranks, ((self, codes.numel()),)).pack([codes], codes.device)

    def unpack(self, reduced: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        """Reduced words -> (Σ_p v_p as int32, factor c the reduction applied to the sum)."""
        (ksum,), factor = SumMessage(self.ranks, ((self, n),)).unpack(reduced)
        return ksum, factor


@functools.lru_cache(maxsize=256)
def _digits_per_word(radix: int) -> int:
    """The most base-``radix`` digits F with radix^F ≤ 2^50 (made once per radix: adaptive nesting
    prices its layouts many times a step)."""
    f, top = 1, radix
    while top * radix <= 1 << WORD_BITS:
        f, top = f + 1, top * radix
    return f


Segment = tuple["SumFieldLayout | None", int]  # (layout, codes) or (None, raw float64 words)
FieldWriter = Callable[[torch.Tensor], object]  # writes a fields segment's words into the slice given


@dataclass(frozen=True)
class SumMessage:
    """Several segments in one summable payload, then one sentinel word: a segment is either
    ``(layout, n)``, n small codes packed in ``layout``'s fields, or ``(None, m)``, m float64 words
    summed as they are (e.g. checksums: integers below 2^53)."""

    ranks: int
    segments: tuple[Segment, ...]

    @property
    def words(self) -> int:
        return sum(layout.field_words(n) if layout is not None else n for layout, n in self.segments) + 1

    def pack(self, values: list[torch.Tensor | FieldWriter] | FieldWriter, device: torch.device) -> torch.Tensor:
        """One entry per segment -> the payload words + sentinel 1.0, on ``device`` (the gradients':
        where the entries live, and where a fused quantizer writes). An entry is int8 codes (packed
        here) or float64 words, or for a fields segment a callable that writes the segment's words
        into the slice it is given (a fused quantizer: no code array in between). One callable
        instead of the list writes every segment's words at once (all words but the sentinel)."""
        out = torch.empty(self.words, dtype=torch.float64, device=device)
        if callable(values):
            values(out[:-1])
            out[-1] = 1.0
            return out
        pos = 0
        for (layout, n), v in zip(self.segments, values, strict=True):
            m = n if layout is None else layout.field_words(n)
            if callable(v) and layout is not None:
                v(out[pos:pos + m])
            elif v.numel() != n:
                raise ValueError(f"segment of {n} values given {v.numel()}")
            elif layout is None:
                out[pos:pos + n] = v
            else:
                ops.pack_sum_fields(v.contiguous(), layout.offset, layout.radix, layout.per_word,
                                    out=out[pos:pos + m])
            pos += m
        out[-1] = 1.0
        return out

    def split(self, reduced: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        """Reduced words -> (per segment: its reduced field words, or its raw words divided by c;
        the factor c the reduction applied to the sum)."""
        if reduced.dtype != torch.float64 or reduced.numel() != self.words:
            raise ValueError(f"reduced payload has {reduced.numel()} {reduced.dtype} words, "
                             f"expected {self.words} float64")
        factor = float(reduced[-1]) / self.ranks
        if not math.isfinite(factor) or factor <= 0.0:
            raise ValueError(f"the reduction scaled the payload by {factor!r}: only positive finite "
                             "factors (Sum, Average, pre/postscale) keep the packed fields decodable")
        out, pos = [], 0
        for layout, n in self.segments:
            m = n if layout is None else layout.field_words(n)
            out.append(reduced[pos:pos + m] / factor if layout is None else reduced[pos:pos + m].contiguous())
            pos += m
        return out, factor

    def unpack(self, reduced: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        """Reduced words -> (per segment: Σ_p v_p as int32, or the raw words divided by c; the
        factor c the reduction applied to the sum)."""
        parts, factor = self.split(reduced)
        return [part if layout is None else
                ops.unpack_sum_fields(part, n, layout.offset * self.ranks, layout.radix, layout.per_word, factor)
                for (layout, n), part in zip(self.segments, parts)], factor
