"""Summable fields, on either device (see :mod:`.ops`): integers packed as base-R digits into exact
float64 words, so that a float64 sum (an allreduce) of the words of P ranks is the word of the digit
sums (docs/ALGORITHMS.md §3); and DQSG fused straight into and out of them."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import table
from .dispatch import check_senders, histogram, launch, output, range_span, scales, target, vec
from .key import MAX_ELEMENTS, DitherKey
from .sizes import SUM_WORD_BITS, integer


def _fields(radix: int, per_word: int) -> tuple[int, int]:
    radix = integer("radix", radix, 2, 1 << SUM_WORD_BITS)
    per_word = integer("per_word", per_word, 1, SUM_WORD_BITS)
    if radix ** per_word > 1 << SUM_WORD_BITS:
        raise ValueError(f"radix**per_word = {radix}**{per_word} > 2^{SUM_WORD_BITS}: "
                         "float64 sums would not stay exact")
    return radix, per_word


def _symbol_fields(levels: int, radix: int, per_word: int) -> tuple[int, int, int]:
    """(levels, radix, per_word) checked for DQSG's symbols k + s in summable fields."""
    levels = integer("levels", levels, 1, 127)
    radix, per_word = _fields(radix, per_word)
    if radix <= 2 * levels:
        raise ValueError(f"radix={radix} cannot hold the symbols k + s in [0, {2 * levels}] (levels={levels})")
    return levels, radix, per_word


@functools.lru_cache(maxsize=64)
def _radix_inverses(radix: int, per_word: int, device: torch.device) -> torch.Tensor:
    """fl(1/R^j) for j = 0 … per_word (float64, on ``device``, made once per device; R^j ≤ 2^50 is
    exact, the division correctly rounded): the digit splitter's table (``split_word`` in
    kernels/arith/fields.py)."""
    return (1.0 / torch.tensor([float(radix ** j) for j in range(per_word + 1)], dtype=torch.float64)).to(device)


def dqsg_encode_fields(g: torch.Tensor, delta: torch.Tensor, bucket: int, levels: int, key: DitherKey, radix: int,
                       per_word: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DQSG with common scales Δ straight into summable fields: (words, histogram).

    Equal to :func:`dqsg_encode` then :func:`pack_sum_fields` of the indices with offset s (base
    ``radix`` digits, ``per_word`` to a float64 word), in one pass; the histogram counts the
    symbols k + s (int64, 2s + 1 entries) for the entropy statistic."""
    vec("g", g, torch.float32)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    scales("delta", delta, g.numel(), bucket)
    levels, radix, per_word = _symbol_fields(levels, radix, per_word)
    n = g.numel()
    out = output(out, "out", math.ceil(n / per_word), torch.float64, g)
    span, _ = range_span(target(table.dqsg_encode_fields, g, delta, out), per_word)
    counts = histogram(n, span, 2 * levels + 1, g)
    launch(table.dqsg_encode_fields, n, g, delta, bucket, levels, radix, per_word, out, counts, *key.words(), span=span)
    return out, counts.sum(0)


def dqsg_decode_fields(words: torch.Tensor, n: int, factor: float, radix: int, per_word: int, offset: int,
                       delta: torch.Tensor, bucket: int, key: DitherKey, senders: int = 1,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Δ_b (Σ_p k_p − Σ_p u_p) (float32) straight from the reduced summable words, in one pass.

    Equal to :func:`unpack_sum_fields` (``factor``: what the reduction scaled the words by;
    ``offset``: the summed field offset, P·s) then :func:`dqsg_decode` over senders
    key.sender … key.sender + senders − 1."""
    n = integer("n", n, 0, MAX_ELEMENTS)
    radix, per_word = _fields(radix, per_word)
    vec("words", words, torch.float64, math.ceil(n / per_word))
    bucket = integer("bucket", bucket, 1, 1 << 31)
    scales("delta", delta, n, bucket)
    senders = integer("senders", senders, 1, 1 << 24)
    check_senders(key, senders)
    out = output(out, "out", n, torch.float32, words)
    span, _ = range_span(target(table.dqsg_decode_fields, words, delta, out), per_word)
    step, tid, first, ranks, k0, k1 = key.words()
    inverses = _radix_inverses(radix, per_word, words.device)
    launch(table.dqsg_decode_fields, n, words, np.float64(factor), radix, inverses, per_word, int(offset), delta,
           bucket, int(first), senders, out, step, tid, ranks, k0, k1, span=span)
    return out


def pack_sum_fields(codes: torch.Tensor, offset: int, radix: int, per_word: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Word w = Σ_j (codes[w·F + j] + offset)·R^j, F = per_word, R = radix (R^F ≤ 2^50), as an exact
    float64: the sum of P such words is the word of the digit sums as long as every digit sum stays
    below R."""
    vec("codes", codes, torch.int8)
    radix, per_word = _fields(radix, per_word)
    nw = math.ceil(codes.numel() / per_word)
    out = output(out, "out", nw, torch.float64, codes)
    launch(table.pack_sum_fields, nw, codes, int(offset), radix, per_word, out)
    return out


def unpack_sum_fields(words: torch.Tensor, n: int, offset: int, radix: int, per_word: int,
                      factor: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_sum_fields` after a reduction that returned ``factor`` × the sum:
    each word / factor is rounded to the exact integer sum (< 2^50), split, minus ``offset``."""
    radix, per_word = _fields(radix, per_word)
    vec("words", words, torch.float64, math.ceil(n / per_word))
    out = output(out, "out", n, torch.int32, words)
    launch(table.unpack_sum_fields, words.numel(), words, np.float64(factor), radix,
            _radix_inverses(radix, per_word, words.device), per_word, int(offset), out)
    return out
