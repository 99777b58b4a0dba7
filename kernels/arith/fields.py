"""Summable fields (docs/ALGORITHMS.md §3): F digits in base R packed into one float64 word,
Σ_j digit_j·R^j < R^F ≤ 2^50, so that a float64 sum of P such words is the word of the digit sums
(exact while every digit sum stays below R), and the exact split back into digits."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np


def build(jit: Callable, leaf: Callable) -> SimpleNamespace:
    """The field packers and splitters, compiled with ``leaf``."""

    @leaf
    def field_word(src, i, n, offset, radix, per_word):
        """Σ_j (src[i + j] + offset) · R^j over j < min(per_word, n − i), R = ``radix``, as an exact
        float64 (Horner from the last digit; every partial value is an integer below R^F ≤ 2^50)."""
        acc = np.int64(0)
        for j in range(min(per_word, n - i) - 1, -1, -1):
            acc = acc * np.int64(radix) + np.int64(src[i + j] + offset)
        return np.float64(acc)

    @leaf
    def split_word(words, w, factor, radix, inverses, per_word, offset, dst, i, n):
        """Inverse of :func:`field_word` after a reduction that scaled the summed words by ``factor``:
        dst[i + j] = digit j (base R) of t = round(words[w] / factor), minus ``offset`` (int32).
        ``inverses``[j] = fl(1/R^j) for j ≤ per_word (float64).

        Exact in float64 and with no chain from digit to digit: q_j = ⌊t / R^j⌋ = ⌊(t + ½)·inverses[j]⌋,
        because (t + ½)/R^j lies at least ½/R^j from an integer while the computed product errs by
        less than (t + ½)/R^j·2^−52 ≤ ¼/R^j (t < 2^50); then digit j = q_j − R·q_{j+1}."""
        th = math.floor(words[w] / factor + 0.5) + 0.5  # t + ½, exact: |words/factor| < 2^50
        r = np.float64(radix)
        prev = th - 0.5
        for j in range(1, min(per_word, n - i) + 1):
            q = math.floor(th * inverses[j])
            dst[i + j - 1] = np.int32(np.int64(prev - q * r) - offset)
            prev = q

    @leaf
    def pack_sum_fields(w, codes, offset, radix, per_word, words):
        """Word w = Σ_j (codes[w·F + j] + offset) · R^j, F = per_word, R = radix, as an exact float64."""
        words[w] = field_word(codes, w * per_word, codes.shape[0], offset, radix, per_word)

    @leaf
    def unpack_sum_fields(w, words, factor, radix, inverses, per_word, offset, ksum):
        """Inverse of pack_sum_fields after a reduction that scaled the summed words by ``factor``."""
        split_word(words, w, factor, radix, inverses, per_word, offset, ksum, w * per_word, ksum.shape[0])

    return SimpleNamespace(field_word=field_word, split_word=split_word, pack_sum_fields=pack_sum_fields,
                           unpack_sum_fields=unpack_sum_fields)
