"""The stratified dither (docs/ALGORITHMS.md §9): rank p's dither of a coordinate is
u_p = (π(p) + v)/P − ½, with the offset v and the permutation π of the P strata drawn from Philox
streams every rank shares (sender words SHARED_V, SHARED_PERM, SHARED_SHIFT), π an affine map of
GF(2^m) restricted to [0, P) by cycle walking. Each u_p is uniform on (−½, ½); all P sum to v − ½."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from .constants import (
    F32_2POW_M24,
    F32_HALF,
    F32_ZERO,
    GF_MAX_DEGREE,
    GF_POLY,
    SHARED_PERM,
    SHARED_SHIFT,
    SHARED_V,
    SHIFT16,
    SHIFT24,
    SHIFT32,
    U64_ONE,
    U64_ZERO,
)


def build(jit: Callable, leaf: Callable, *, philox4x32, odd_numerator, gf_mul, lane) -> SimpleNamespace:
    """The stratified-dither functions, compiled."""

    @leaf
    def strata_map(m, w):
        """(a, c) of the map x ↦ a·x ⊕ c in GF(2^m) from a shared word w: a = 1 + ⌊(w >> 16)(q − 1)/2^16⌋
        ∈ [1, q), c = w mod q, q = 2^m."""
        q = U64_ONE << m
        return U64_ONE + (((w >> SHIFT16) * (q - U64_ONE)) >> SHIFT16), w & (q - U64_ONE)

    @leaf
    def stratum_pow2(p, m, poly, w, steps):
        """:func:`stratum` for ranks = 2^m: a·p ⊕ c, straight-line code (``steps``: see gf_mul)."""
        a, c = strata_map(m, w)
        return gf_mul(a, np.uint64(p), m, poly, steps) ^ c

    @leaf
    def stratum(p, ranks, m, poly, w, s):
        """π(p): the stratum of rank p among ``ranks`` (uint64) for one coordinate, whose shared words
        are w (the map's a and c) and s (the shift b); m = ⌈log2 ranks⌉ ≥ 1, q = 2^m.

        x ↦ a·x ⊕ c in GF(2^m), a = 1 + ⌊(w >> 16)(q − 1) / 2^16⌋ ≠ 0, c = w mod q, is a bijection of
        [0, q); the family is sharply 2-transitive (every ordered pair of distinct ranks lands on every
        ordered pair of distinct strata for exactly one (a, c)), which is all the variance of a sum of
        errors depends on. Cycle walking restricts it to [0, ranks). When ranks is not a power of 2
        the walk is not exactly uniform, so a shift b = ⌊s·ranks / 2^32⌋ (mod ranks) follows.
        """
        a, c = strata_map(m, w)
        x = gf_mul(a, np.uint64(p), m, poly, GF_MAX_DEGREE) ^ c
        if (U64_ONE << m) == ranks:
            return x
        while x >= ranks:
            x = gf_mul(a, x, m, poly, GF_MAX_DEGREE) ^ c
        return (x + ((s * ranks) >> SHIFT32)) % ranks

    @leaf
    def placed(stratum, m, pf):
        """u = fl(fl(fl(π + v)/P) − ½) for stratum π < 2^16 and offset v = m·2^-24 (m: the odd numerator,
        uint64). fl(π + v) is computed as fl(π·2^24 + m)·2^-24: one correctly rounded integer-to-float
        conversion and an exact scaling (the same bits as the float32 sum), so no product feeds an
        addition."""
        return (np.float32(np.int64((stratum << SHIFT24) | m)) * F32_2POW_M24) / pf - F32_HALF

    @leaf
    def strata_field(ranks):
        """(P, m, GF(2^m) modulus, P == 2^m, P as float32) for ``ranks`` = P, m = max(1, ⌈log2 P⌉)."""
        m = 1
        while (1 << m) < ranks:
            m += 1
        mu = np.uint64(m)
        rk = np.uint64(ranks)
        return rk, mu, np.uint64(GF_POLY[m]), (U64_ONE << mu) == rk, np.float32(ranks)

    @leaf
    def strata_block(b, mu, pow2, step, tid, key0, key1):
        """Shared words of elements 4b .. 4b+3: the offsets' numerators m (SHARED_V), the strata words w (SHARED_PERM,
        except for P = 2 (m = 1), whose permutation has one random bit c = w mod 2 and takes it from
        bit 0 of the v word, which v does not use, so no second stream is needed) and s (SHARED_SHIFT,
        when P is not a power of 2)."""
        x0, x1, x2, x3 = philox4x32(b, step, tid, np.uint64(SHARED_V), key0, key1)
        w0, w1, w2, w3 = x0, x1, x2, x3
        if mu != U64_ONE:
            w0, w1, w2, w3 = philox4x32(b, step, tid, np.uint64(SHARED_PERM), key0, key1)
        s0 = s1 = s2 = s3 = U64_ZERO
        if not pow2:
            s0, s1, s2, s3 = philox4x32(b, step, tid, np.uint64(SHARED_SHIFT), key0, key1)
        return (odd_numerator(x0), odd_numerator(x1), odd_numerator(x2), odd_numerator(x3), w0, w1, w2, w3, s0, s1,
                s2, s3)

    @leaf
    def pow2_range(u, b0, full, pu, mu, poly, pf, steps, step, tid, key0, key1):
        """u[4q .. 4q+3] = rank pu's stratified dither for blocks q < full, P = 2^m ≥ 4 (inlined with a
        constant ``steps`` so the GF(2^m) product unrolls and the loop vectorizes)."""
        sv, sw = np.uint64(SHARED_V), np.uint64(SHARED_PERM)
        for q in range(full):
            b = np.uint64(b0 + q)
            x0, x1, x2, x3 = philox4x32(b, step, tid, sv, key0, key1)
            w0, w1, w2, w3 = philox4x32(b, step, tid, sw, key0, key1)
            u[4 * q] = placed(stratum_pow2(pu, mu, poly, w0, steps), odd_numerator(x0), pf)
            u[4 * q + 1] = placed(stratum_pow2(pu, mu, poly, w1, steps), odd_numerator(x1), pf)
            u[4 * q + 2] = placed(stratum_pow2(pu, mu, poly, w2, steps), odd_numerator(x2), pf)
            u[4 * q + 3] = placed(stratum_pow2(pu, mu, poly, w3, steps), odd_numerator(x3), pf)

    @leaf
    def lanes3(block, j):
        """(m, w, s) of lane j of a :func:`strata_block`."""
        return (lane(block[0], block[1], block[2], block[3], j), lane(block[4], block[5], block[6], block[7], j),
                lane(block[8], block[9], block[10], block[11], j))

    @jit
    def stratified_range(i0, i1, first, senders, ranks, u, step, tid, key0, key1):
        """u[i − i0] = Σ_p u_p[i], p = first .. first+senders−1, under the stratified dither among
        ``ranks`` ranks (docs/ALGORITHMS.md §9): u_p = (π(p) + v)/P − ½ with v = m·2^-24 ∈ (0, 1) from the
        shared stream SHARED_V (m: the odd numerator of its word, as in uniforms) and π from the shared
        words of :func:`strata_block`. Each rank's u_p is uniform on (−½, ½); all P of them sum to
        v − ½, which :func:`dither_range` regenerates alone. One sender and P a power of 2 (the
        encoder's case) runs unrolled, so the Philox loop vectorizes.
        """
        rk, mu, poly, pow2, pf = strata_field(ranks)
        n = i1 - i0
        b0 = i0 // 4
        pu = np.uint64(first)
        # One sender and P a power of 2 (the encoder): straight-line loops that vectorize.
        full = n // 4 if senders == 1 and pow2 else 0
        sv = np.uint64(SHARED_V)
        if mu == U64_ONE:  # P = 2: π(p) = p ⊕ c, c = bit 0 of the v word (see strata_block)
            for q in range(full):
                x0, x1, x2, x3 = philox4x32(np.uint64(b0 + q), step, tid, sv, key0, key1)
                u[4 * q] = placed(pu ^ (x0 & U64_ONE), odd_numerator(x0), pf)
                u[4 * q + 1] = placed(pu ^ (x1 & U64_ONE), odd_numerator(x1), pf)
                u[4 * q + 2] = placed(pu ^ (x2 & U64_ONE), odd_numerator(x2), pf)
                u[4 * q + 3] = placed(pu ^ (x3 & U64_ONE), odd_numerator(x3), pf)
        elif mu <= np.uint64(4):  # P = 4 .. 16: four product steps
            pow2_range(u, b0, full, pu, mu, poly, pf, 4, step, tid, key0, key1)
        else:
            pow2_range(u, b0, full, pu, mu, poly, pf, GF_MAX_DEGREE, step, tid, key0, key1)
        for q in range(full, (n + 3) // 4):
            block = strata_block(np.uint64(b0 + q), mu, pow2, step, tid, key0, key1)
            for j in range(min(4, n - 4 * q)):
                m, w, s = lanes3(block, j)
                acc = F32_ZERO
                for p in range(first, first + senders):
                    acc += placed(stratum(p, rk, mu, poly, w, s), m, pf)
                u[4 * q + j] = acc

    return SimpleNamespace(strata_map=strata_map, stratum_pow2=stratum_pow2, stratum=stratum, placed=placed,
                           strata_field=strata_field, strata_block=strata_block, pow2_range=pow2_range, lanes3=lanes3,
                           stratified_range=stratified_range)
