"""The shared random rotation (docs/ALGORITHMS.md §10): a randomized Hadamard transform per bucket.

Bucket b of d coordinates is split into power-of-two pieces (d itself when d is a power of two;
otherwise its binary expansion, largest piece first: 500 = 256 + 128 + 64 + 32 + 16 + 4, and the
same for a shorter last bucket). A piece x of m = 2^k coordinates is rotated as

    forward:  y = 2^−⌊k/2⌋ · H_m · D x          inverse:  x = D · 2^−⌈k/2⌉ · H_m y

with H_m the ±1 Walsh–Hadamard matrix (H_m H_m = m I) and D = diag(±1) the signs of the shared
stream: coordinate i of the tensor is negated when bit i % 32 of lane (i // 32) % 4 of
Philox-4x32-10(counter = (i // 128, step, tensor id, SHARED_SIGNS), key = seed) is set. The same
signs on every rank, for every sender. Both powers of two are exact, so the inverse undoes the
forward up to the rounding of the butterflies; the forward is orthogonal up to the factor
2^(⌈k/2⌉−⌊k/2⌋)/2 ∈ {1, √2}, which a scale-invariant quantizer does not see.

H_m runs as a fast Walsh–Hadamard transform: butterflies (a, c) → (a + c, a − c) over strides
h = 1, 2, 4, …, m/2, the first three in registers 8 coordinates at a time and the rest two strides
per pass (the same additions in the same order, so the same bits as one stride per pass).
Only additions, subtractions, negations and multiplications by powers of two, the products last:
no product ever feeds an addition, so the CUDA kernels give the CPU's bits
(kernels/arith/__init__.py).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from .constants import F32_ONE, SHARED_SIGNS, U64_ONE, U64_ZERO

SIGNS = np.uint64(SHARED_SIGNS)
SIGN_GROUP = 128  # signs per Philox block: 4 lanes of 32 bits


def build(jit: Callable, leaf: Callable, *, philox4x32, lane, sync) -> SimpleNamespace:
    """The rotation's sign flip, fast Walsh–Hadamard transform and per-bucket block function."""

    @leaf
    def signed(v, word, bit):
        """−v if bit ``bit`` of ``word`` is set, else v."""
        return -v if (word >> np.uint64(bit)) & U64_ONE else v

    @leaf
    def flip_signs(x, i0, i1, step, tid, key0, key1):
        """x[i] = −x[i] for i in [i0, i1) where bit i of the shared sign stream is set (D above)."""
        i = i0
        while i < i1:
            q = i // SIGN_GROUP
            r0, r1, r2, r3 = philox4x32(np.uint64(q), step, tid, SIGNS, key0, key1)
            j1 = min(i1, (q + 1) * SIGN_GROUP)
            if i == q * SIGN_GROUP and j1 == i + SIGN_GROUP:  # a whole group: one word per 32 coordinates
                for t in range(32):
                    x[i + t] = signed(x[i + t], r0, t)
                for t in range(32):
                    x[i + 32 + t] = signed(x[i + 32 + t], r1, t)
                for t in range(32):
                    x[i + 64 + t] = signed(x[i + 64 + t], r2, t)
                for t in range(32):
                    x[i + 96 + t] = signed(x[i + 96 + t], r3, t)
            else:
                for k in range(i, j1):
                    x[k] = signed(x[k], lane(r0, r1, r2, r3, (k // 32) % 4), k % 32)
            i = j1

    @leaf
    def stride_pass(x, i0, m, h):
        """One butterfly stride h over x[i0 : i0+m]: (x[j], x[j+h]) → (x[j] + x[j+h], x[j] − x[j+h]).
        The halves are taken as views indexed from 0, which lets the CPU compiler vectorize the loop
        (same additions, same bits)."""
        for start in range(i0, i0 + m, 2 * h):
            lo = x[start:start + h]
            hi = x[start + h:start + 2 * h]
            for j in range(h):
                a = lo[j]
                c = hi[j]
                lo[j] = a + c
                hi[j] = a - c

    @leaf
    def first_strides(x, s, flip, word, shift):
        """Strides 1, 2 and 4 of x[s : s+8] in registers; with ``flip``, coordinate s + j is first
        negated where bit shift + j of ``word`` is set (D fused into the first load)."""
        a0, a1, a2, a3 = x[s], x[s + 1], x[s + 2], x[s + 3]
        a4, a5, a6, a7 = x[s + 4], x[s + 5], x[s + 6], x[s + 7]
        if flip:
            a0, a1, a2, a3 = signed(a0, word, shift), signed(a1, word, shift + 1), \
                signed(a2, word, shift + 2), signed(a3, word, shift + 3)
            a4, a5, a6, a7 = signed(a4, word, shift + 4), signed(a5, word, shift + 5), \
                signed(a6, word, shift + 6), signed(a7, word, shift + 7)
        b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
        b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
        c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
        c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
        x[s], x[s + 1], x[s + 2], x[s + 3] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
        x[s + 4], x[s + 5], x[s + 6], x[s + 7] = c0 - c4, c1 - c5, c2 - c6, c3 - c7

    @leaf
    def walsh_hadamard(x, i0, m, flip, step, tid, key0, key1):
        """x[i0 : i0+m] ← H_m x[i0 : i0+m] in place (m a power of two): strides 1, 2, 4, … m/2 in
        order; strides 1–4 in registers per 8 coordinates, then strides h and 2h in one pass. With
        ``flip`` (m ≥ 8 and i0 a multiple of 8: every group of 8 lies in one 32-bit sign word), the
        piece is first multiplied by D, in the same registers."""
        h = 1
        if m >= 8:
            group = -1
            r0 = r1 = r2 = r3 = U64_ZERO
            for s in range(i0, i0 + m, 8):
                word = U64_ZERO
                if flip:
                    if s // SIGN_GROUP != group:
                        group = s // SIGN_GROUP
                        r0, r1, r2, r3 = philox4x32(np.uint64(group), step, tid, SIGNS, key0, key1)
                    word = lane(r0, r1, r2, r3, (s // 32) % 4)
                first_strides(x, s, flip, word, s % 32)
            h = 8
            while 4 * h <= m:
                for start in range(i0, i0 + m, 4 * h):
                    q0 = x[start:start + h]  # views indexed from 0: vectorized on the CPU (stride_pass)
                    q1 = x[start + h:start + 2 * h]
                    q2 = x[start + 2 * h:start + 3 * h]
                    q3 = x[start + 3 * h:start + 4 * h]
                    for j in range(h):
                        a, b, c, d = q0[j], q1[j], q2[j], q3[j]
                        p, q, r, t = a + b, a - b, c + d, c - d
                        q0[j], q1[j], q2[j], q3[j] = p + r, q + t, p - r, q - t
                h *= 4
        while h < m:
            stride_pass(x, i0, m, h)
            h *= 2

    @leaf
    def piece_at(pos, i1, inverse):
        """The piece of a bucket ending at i1 that starts at pos: (m, fused, scale) with m = 2^k the
        largest power of two ≤ i1 − pos, whether D is fused into the first strides (forward, m ≥ 8,
        pos a multiple of 8), and the piece's exact factor 2^−⌊k/2⌋ (forward) or 2^−⌈k/2⌉ (inverse)."""
        m = 1
        k = 0
        while 2 * m <= i1 - pos:
            m *= 2
            k += 1
        shift = k // 2 if inverse == 0 else k - k // 2
        return m, inverse == 0 and m >= 8 and pos % 8 == 0, F32_ONE / np.float32(1 << shift)

    @leaf
    def hadamard_rotate(b, src, x, bucket, inverse, step, tid, key0, key1):
        """Bucket b of ``src`` rotated into x (``src`` may be x: in place): forward (``inverse`` = 0)
        2^−⌊k/2⌋ H D per power-of-two piece of 2^k coordinates, or its inverse D 2^−⌈k/2⌉ H
        (``inverse`` = 1). The bucket is copied first, so the butterflies run on it in cache."""
        i0 = b * bucket
        i1 = min(x.shape[0], i0 + bucket)
        into, source = x[i0:i1], src[i0:i1]
        for j in range(i1 - i0):
            into[j] = source[j]
        pos = i0
        while pos < i1:
            m, fused, scale = piece_at(pos, i1, inverse)
            if inverse == 0 and not fused:
                flip_signs(x, pos, pos + m, step, tid, key0, key1)
            walsh_hadamard(x, pos, m, fused, step, tid, key0, key1)
            if scale != F32_ONE:
                piece = x[pos:pos + m]
                for j in range(m):
                    piece[j] = piece[j] * scale
            if inverse != 0:
                flip_signs(x, pos, pos + m, step, tid, key0, key1)
            pos += m

    @leaf
    def flip_threads(x, lo, hi, t, nt, step, tid, key0, key1):
        """:func:`flip_signs` of x[lo : hi] by thread t of ``nt``: 32 coordinates (one sign word) a unit."""
        for q in range(lo // 32 + t, (hi + 31) // 32, nt):
            flip_signs(x, max(lo, 32 * q), min(hi, 32 * q + 32), step, tid, key0, key1)

    @jit
    def hadamard_rotate_threads(b, t, nt, red, src, x, bucket, inverse, step, tid, key0, key1):
        """:func:`hadamard_rotate` run by thread t of the ``nt`` of a GPU block on bucket b, in x
        itself, with a barrier after every pass: the copy, the signs, strides 1–4 (one group of 8 a
        thread, :func:`first_strides`), then one stride h a pass (butterfly p of the piece: a thread
        each), the scaling, the inverse's signs. Every coordinate gets the additions of the CPU's
        passes in the same order (two strides a pass there are the same butterflies), so the same
        bits. (``red`` is unused.)"""
        i0 = b * bucket
        i1 = min(x.shape[0], i0 + bucket)
        for j in range(i0 + t, i1, nt):
            x[j] = src[j]
        sync()
        pos = i0
        while pos < i1:
            m, fused, scale = piece_at(pos, i1, inverse)
            if inverse == 0 and not fused:
                flip_threads(x, pos, pos + m, t, nt, step, tid, key0, key1)
                sync()
            h = 1
            if m >= 8:
                for s in range(pos + 8 * t, pos + m, 8 * nt):
                    word = U64_ZERO
                    if fused:
                        r0, r1, r2, r3 = philox4x32(np.uint64(s // SIGN_GROUP), step, tid, SIGNS, key0, key1)
                        word = lane(r0, r1, r2, r3, (s // 32) % 4)
                    first_strides(x, s, fused, word, s % 32)
                sync()
                h = 8
            while h < m:
                for p in range(t, m // 2, nt):
                    j = pos + (p // h) * 2 * h + p % h
                    a = x[j]
                    c = x[j + h]
                    x[j] = a + c
                    x[j + h] = a - c
                sync()
                h *= 2
            if scale != F32_ONE:
                for j in range(pos + t, pos + m, nt):
                    x[j] = x[j] * scale
                sync()
            if inverse != 0:
                flip_threads(x, pos, pos + m, t, nt, step, tid, key0, key1)
                sync()
            pos += m

    return SimpleNamespace(signed=signed, flip_signs=flip_signs, stride_pass=stride_pass, first_strides=first_strides,
                           walsh_hadamard=walsh_hadamard, piece_at=piece_at, hadamard_rotate=hadamard_rotate,
                           flip_threads=flip_threads,
                           hadamard_rotate_threads=hadamard_rotate_threads)
