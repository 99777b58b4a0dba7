"""The dither streams (docs/ALGORITHMS.md §1): element i of sender p's stream is lane i % 4 of
Philox-4x32-10(counter = (i // 4, step, tensor id, p), key = seed), mapped to a uniform on (−½, ½).

:func:`dither_range` fills a scratch buffer with the sum over a run of senders of either these
independent dithers (summed in sender order) or the stratified ones of :mod:`.strata`; every
Philox-driven codec draws its dithers through it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from .constants import F32_HALF, SHARED_V


def build(jit: Callable, leaf: Callable, *, philox4x32, odd_numerator, centered, lane,
          stratified_range) -> SimpleNamespace:
    """The Philox uniforms, the independent dither range and :func:`dither_range` over either kind."""

    @leaf
    def uniforms(b, step, tid, sender, key0, key1):
        """The four dithers u in (-1/2, 1/2) of elements 4b .. 4b+3 of stream (seed, step, tensor, sender).

        Counter = (b, step, tensor id, sender), key = (seed low 32 bits, seed high 32 bits).
        """
        r0, r1, r2, r3 = philox4x32(np.uint64(b), step, tid, sender, key0, key1)
        return (centered(odd_numerator(r0)), centered(odd_numerator(r1)), centered(odd_numerator(r2)),
                centered(odd_numerator(r3)))

    @jit
    def independent_range(i0, i1, first, senders, u, step, tid, key0, key1):
        """u[i − i0] = Σ_p u_p[i] for i in [i0, i1), senders p = first .. first+senders−1 in order,
        under the paper's independent dither.

        Element i of sender p's stream is lane i % 4 of Philox(counter = (i // 4, step, tensor,
        p), key = seed). The sum runs in sender order on every device.
        """
        m = i1 - i0
        full = m // 4
        b0 = i0 // 4
        tail = m - 4 * full
        # First sender: plain stores (the Philox loop vectorizes); later senders accumulate in order.
        sp = np.uint64(first)
        for q in range(full):
            r0, r1, r2, r3 = uniforms(b0 + q, step, tid, sp, key0, key1)
            u[4 * q] = r0
            u[4 * q + 1] = r1
            u[4 * q + 2] = r2
            u[4 * q + 3] = r3
        if tail:
            r0, r1, r2, r3 = uniforms(b0 + full, step, tid, sp, key0, key1)
            for j in range(tail):
                u[4 * full + j] = lane(r0, r1, r2, r3, j)
        for p in range(first + 1, first + senders):
            sp = np.uint64(p)
            for q in range(full):
                r0, r1, r2, r3 = uniforms(b0 + q, step, tid, sp, key0, key1)
                u[4 * q] += r0
                u[4 * q + 1] += r1
                u[4 * q + 2] += r2
                u[4 * q + 3] += r3
            if tail:
                r0, r1, r2, r3 = uniforms(b0 + full, step, tid, sp, key0, key1)
                for j in range(tail):
                    u[4 * full + j] += lane(r0, r1, r2, r3, j)

    @jit
    def dither_range(i0, i1, first, senders, ranks, u, step, tid, key0, key1):
        """u[i − i0] = Σ_p u_p[i] for i in [i0, i1) over senders p = first .. first+senders−1.

        ``ranks`` = 0: the independent dither (one Philox stream per sender, summed in sender order).
        ``ranks`` = P ≥ 1: the stratified dither among P ranks; the sum over all P ranks is v − ½,
        one shared stream whatever P (in exact arithmetic; float32 rounding of the P terms differs
        from it by at most P·2^-24, far below the quantization noise).
        """
        if ranks == 0:
            independent_range(i0, i1, first, senders, u, step, tid, key0, key1)
        elif first == 0 and senders == ranks:
            independent_range(i0, i1, SHARED_V, 1, u, step, tid, key0, key1)
        else:
            stratified_range(i0, i1, first, senders, ranks, u, step, tid, key0, key1)

    @jit
    def dither_fill(i0, i1, u, out, step, tid, sender, ranks, key0, key1):
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        for i in range(i0, i1):
            out[i] = u[i - i0]

    @jit
    def dither_bins(i0, i1, u, bins, out, step, tid, sender, ranks, key0, key1):
        """out[i] = ⌊(u_i + ½)·bins⌋, at most bins − 1, for i in [i0, i1): which of ``bins`` equal
        intervals of (−½, ½) sender's dither u_i falls in (``bins`` a power of 2 up to 256, so the
        product is exact): the context of an entropy coder conditioned on the dither."""
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        scale = np.float32(bins)
        top = bins - 1
        for i in range(i0, i1):
            c = np.int64((u[i - i0] + F32_HALF) * scale)
            out[i] = min(c, top)

    return SimpleNamespace(uniforms=uniforms, independent_range=independent_range, dither_range=dither_range,
                           dither_fill=dither_fill, dither_bins=dither_bins)
