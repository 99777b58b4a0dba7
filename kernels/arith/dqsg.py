"""DQSG (docs/ALGORITHMS.md §1, §3): dithered indices k = round(g/Δ + u) ∈ [−s, s], their
reconstruction Δ(k − u), the sum over senders with a common Δ, and the own-scale aggregate of P
senders under the stratified dither."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from .constants import F32_ZERO


def build(jit: Callable, leaf: Callable, *, round_half_up, stratum, placed, strata_field, strata_block, lanes3,
          dither_range) -> SimpleNamespace:
    """The DQSG range functions and their per-bucket helpers, compiled."""

    @leaf
    def dither_code(g, delta, u, levels):
        """DQSG index k = round(g/Δ + u) clipped to [-levels, levels] (docs/ALGORITHMS.md §1).

        Δ == 0 marks an all-zero (or underflowed) bucket: the index is 0. The clip only acts when
        float32 rounding of Δ = max|g|/levels pushes |g/Δ| a hair above levels.
        """
        if delta == F32_ZERO:
            return 0
        k = round_half_up(g / delta + u)
        if k > levels:
            k = levels
        if k < -levels:
            k = -levels
        return k

    @leaf
    def segment_end(i, i1, bucket):
        """End of the run of [i, i1) that lies in i's bucket."""
        return min(i1, (i // bucket + 1) * bucket)

    @leaf
    def quantize_range(i0, i1, u, g, delta, bucket, levels, offset, codes, origin):
        """codes[i − origin] = round(g_i/Δ_b + u[i − i0]) + offset for i in [i0, i1), bucket by bucket."""
        i = i0
        while i < i1:
            j = segment_end(i, i1, bucket)
            d = delta[i // bucket]
            for k in range(i, j):
                codes[k - origin] = dither_code(g[k], d, u[k - i0], levels) + offset
            i = j

    @leaf
    def reconstruct_range(i0, i1, u, ksum, offset, delta, bucket, factor, out, origin):
        """out[i] = factor · Δ_b · (ksum[i − origin] − offset − u[i − i0]) for i in [i0, i1)."""
        off = np.int32(offset)
        i = i0
        while i < i1:
            j = segment_end(i, i1, bucket)
            d = delta[i // bucket]
            for k in range(i, j):
                out[k] = factor * (d * (np.float32(np.int32(ksum[k - origin]) - off) - u[k - i0]))
            i = j

    @jit
    def dqsg_encode(i0, i1, u, g, delta, bucket, levels, offset, codes, step, tid, sender, ranks, key0, key1):
        """codes[i] = round(g_i/Δ_b + u_i) + offset, the index in [−s, s] (docs/ALGORITHMS.md §1) shifted
        by ``offset`` (0 for signed int8 codes, s for unsigned symbols ready to pack)."""
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        quantize_range(i0, i1, u, g, delta, bucket, levels, offset, codes, 0)

    @jit
    def dqsg_decode(i0, i1, u, ksum, offset, delta, bucket, first, senders, factor, out, step, tid, ranks, key0,
                    key1):
        """out[i] = factor · Δ_b · (ksum[i] − offset − Σ_p u_p[i]), p = first .. first+senders−1 in order.

        One sender: the DQSG decoder Δ(k − u) (from k, or from the symbols k + s with offset s). P senders
        with a common Δ: Σ_p ĝ_p (docs/ALGORITHMS.md §3).
        """
        dither_range(i0, i1, first, senders, ranks, u, step, tid, key0, key1)
        reconstruct_range(i0, i1, u, ksum, offset, delta, bucket, factor, out, 0)

    @jit
    def dqsg_aggregate(i0, i1, u, codes, offset, delta, bucket, factor, out, step, tid, ranks, key0, key1):
        """out[i] = factor · Σ_p Δ_{p,b}(k_{p,i} − u_p[i]) over the P = codes.shape[0] senders in order
        (codes: the symbols k + ``offset``, as :func:`dqsg_decode` takes them),
        each with its own scales delta[p] (own-scale DQSG payloads, docs/ALGORITHMS.md §1), under the
        stratified dither among P ranks: v and the strata words are generated once per coordinate, not
        once per sender. The sum runs in float64: each term Δ·(k − u) is a product of two float32
        values, exact in float64, so a contracted multiply-add rounds as the plain sum does and the GPU
        gives the CPU's bits. (``u`` is unused: the range-kernel signature.)"""
        rk, mu, poly, pow2, pf = strata_field(ranks)
        n = i1 - i0
        b0 = i0 // 4
        for q in range((n + 3) // 4):
            block = strata_block(np.uint64(b0 + q), mu, pow2, step, tid, key0, key1)
            for j in range(min(4, n - 4 * q)):
                m, w, s = lanes3(block, j)
                i = i0 + 4 * q + j
                c = i // bucket
                acc = np.float64(0.0)
                for p in range(codes.shape[0]):
                    k = np.float32(np.int64(codes[p, i]) - offset)
                    acc += np.float64(delta[p, c]) * np.float64(k - placed(stratum(p, rk, mu, poly, w, s), m, pf))
                out[i] = factor * np.float32(acc)

    return SimpleNamespace(dither_code=dither_code, segment_end=segment_end, quantize_range=quantize_range,
                           reconstruct_range=reconstruct_range, dqsg_encode=dqsg_encode, dqsg_decode=dqsg_decode,
                           dqsg_aggregate=dqsg_aggregate)
