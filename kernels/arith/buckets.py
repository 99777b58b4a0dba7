"""Per-bucket reductions (index functions, one bucket b each): max |g| and the DQSG step
Δ_b = max/s (docs/ALGORITHMS.md §1), the QSGD norm ‖g_b‖₂, and the nested checksum Σ_j w_j·k_j; and
the cooperative twins (``*_threads``) the GPU runs with one CUDA block per bucket."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from .constants import F32_INF, F32_ZERO, MASK32, U64_ONE

L2_LANES = 32  # the lanes of a bucket's sum of squares (bucket_l2): a warp on the GPU


def build(jit: Callable, leaf: Callable, *, check_weight, sync) -> SimpleNamespace:
    """The bucket reductions (index functions), compiled with ``leaf``."""

    @leaf
    def absmax_of(a, m):
        """max(m, |a|), a NaN counted as +inf (so that a max-reduction keeps it)."""
        a = abs(a)
        if a != a:
            a = F32_INF
        return a if a > m else m

    @leaf
    def bucket_absmax(b, g, bucket, out):
        """out[b] = max |g_i| over bucket b; NaN reported as +inf so a max-reduction keeps it."""
        m = F32_ZERO
        for i in range(b * bucket, min(g.shape[0], (b + 1) * bucket)):
            m = absmax_of(g[i], m)
        out[b] = m

    @jit
    def bucket_absmax_threads(b, t, nt, red, g, bucket, out):
        """:func:`bucket_absmax` run by thread t of the ``nt`` (a power of 2) of a GPU block: thread t
        takes elements t, t + nt, … of the bucket (neighbouring threads, neighbouring elements), then
        a tree over ``red`` (``nt`` float64 of shared memory, which hold a float32 exactly). A maximum
        does not depend on the order, so the CPU's bits."""
        m = F32_ZERO
        for i in range(b * bucket + t, min(g.shape[0], (b + 1) * bucket), nt):
            m = absmax_of(g[i], m)
        red[t] = np.float64(m)
        sync()
        half = nt // 2
        while half > 0:
            if t < half and red[t + half] > red[t]:
                red[t] = red[t + half]
            sync()
            half //= 2
        if t == 0:
            out[b] = np.float32(red[0])

    @leaf
    def bucket_l2(b, g, bucket, out):
        """out[b] = ‖g_b‖₂ in float32. The squares (exact in float64) are summed in L2_LANES = 32 lanes,
        lane j taking positions j, j + 32, … of the bucket in order, row by row (rows of 32 vectorize
        on the CPU); then the lanes pairwise, lane j + 16 into lane j, then j + 8, …, 1; then sqrt:
        the order :func:`bucket_l2_threads` follows on the GPU, so the same bits."""
        i0 = b * bucket
        i1 = min(g.shape[0], i0 + bucket)
        lanes = np.zeros(L2_LANES, np.float64)
        for r in range(i0, i1, L2_LANES):
            row = g[r:min(i1, r + L2_LANES)]
            for j in range(row.shape[0]):
                x = np.float64(row[j])
                lanes[j] += x * x
        half = L2_LANES // 2
        while half > 0:
            for j in range(half):
                lanes[j] += lanes[j + half]
            half //= 2
        out[b] = np.float32(math.sqrt(lanes[0]))

    @jit
    def bucket_l2_threads(b, t, nt, red, g, bucket, out):
        """:func:`bucket_l2` run by thread t of the ``nt`` ≥ 32 of a GPU block: threads t < 32 are the
        lanes (a warp reading neighbouring elements), then the same pairwise tree over ``red``."""
        i0 = b * bucket
        i1 = min(g.shape[0], i0 + bucket)
        if t < L2_LANES:
            acc = np.float64(0.0)
            for i in range(i0 + t, i1, L2_LANES):
                x = np.float64(g[i])
                acc += x * x
            red[t] = acc
        sync()
        half = L2_LANES // 2
        while half > 0:
            if t < half:
                red[t] = red[t] + red[t + half]
            sync()
            half //= 2
        if t == 0:
            out[b] = np.float32(math.sqrt(red[0]))

    @leaf
    def bucket_step(b, absmax, levels, out):
        """out[b] = Δ_b = absmax_b / s in float32 (docs/ALGORITHMS.md §1): one correctly rounded
        division on both devices (a framework's division by a scalar may multiply by the reciprocal
        on the GPU instead, which decides other codes)."""
        out[b] = absmax[b] / np.float32(levels)

    @leaf
    def checksum_add(acc, j, k):
        """(acc + w_j·k) mod 2^32: the checksum's term of index k at position j (uint64) of its bucket."""
        return (acc + check_weight(j) * np.uint64(np.int64(k) & np.int64(0xFFFFFFFF))) & MASK32

    @leaf
    def bucket_checksum(b, k, bucket, out):
        """out[b] = Σ_j w_j·k_{b·d + j} mod 2^32 over bucket b (j: index inside the bucket; w_j the
        odd hashed weight of :func:`_check_weight`).

        Linear in k, so the checksums of several senders add up to the checksum of their index
        sums; an index off by a nonzero multiple m of ρ (a failed nested decode) changes it by
        w_j·m·ρ, which is never 0 mod 2^32 for |m·ρ| < 2^31 (w_j is odd).
        """
        acc = np.uint64(0)
        j = np.uint64(0)
        for i in range(b * bucket, min(k.shape[0], (b + 1) * bucket)):
            acc = checksum_add(acc, j, k[i])
            j += U64_ONE
        out[b] = np.int64(acc)

    @jit
    def bucket_checksum_threads(b, t, nt, red, k, bucket, out):
        """:func:`bucket_checksum` run by thread t of the ``nt`` (a power of 2) of a GPU block: thread t
        sums positions t, t + nt, … of the bucket mod 2^32, then a tree of sums mod 2^32 over ``red``
        (``nt`` float64, which hold values below 2^32 exactly). A sum mod 2^32 does not depend on the
        order, so the CPU's bits."""
        acc = np.uint64(0)
        i0 = b * bucket
        for i in range(i0 + t, min(k.shape[0], i0 + bucket), nt):
            acc = checksum_add(acc, np.uint64(i - i0), k[i])
        red[t] = np.float64(acc)
        sync()
        half = nt // 2
        while half > 0:
            if t < half:
                red[t] = np.float64((np.uint64(red[t]) + np.uint64(red[t + half])) & MASK32)
            sync()
            half //= 2
        if t == 0:
            out[b] = np.int64(red[0])

    return SimpleNamespace(absmax_of=absmax_of, bucket_absmax=bucket_absmax,
                           bucket_absmax_threads=bucket_absmax_threads, bucket_l2=bucket_l2,
                           bucket_l2_threads=bucket_l2_threads, bucket_step=bucket_step,
                           checksum_add=checksum_add, bucket_checksum=bucket_checksum,
                           bucket_checksum_threads=bucket_checksum_threads)
