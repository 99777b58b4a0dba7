"""QSGD (Alistarh et al.): stochastic levels k = sgn(g)·⌊s|g|/‖g_b‖ + U⌋ and the scale decoder
ĝ = scale·k/s; 1-bit SGD (Seide et al.): sign bits and per-column means of the two signs."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from .constants import F32_ZERO


def build(jit: Callable, leaf: Callable, *, stochastic_level, dither_range, segment_end) -> SimpleNamespace:
    """The QSGD range function and the QSGD/1-bit index functions, compiled."""

    @jit
    def qsgd_encode(i0, i1, u, g, norm, bucket, levels, codes, step, tid, sender, ranks, key0, key1):
        """QSGD (Alistarh et al., QSGD): k = sgn(g)·floor(s|g|/‖g_b‖ + U), U ~ U(0, 1): E[k]·‖g_b‖/s = g (int8)."""
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        sf = np.float32(levels)
        i = i0
        while i < i1:
            j = segment_end(i, i1, bucket)
            nrm = norm[i // bucket]
            for k in range(i, j):
                q = 0
                if nrm != F32_ZERO:
                    q = min(stochastic_level((sf * abs(g[k])) / nrm, u[k - i0]), levels)
                    if g[k] < F32_ZERO:
                        q = -q
                codes[k] = q
            i = j

    @leaf
    def scale_decode(i, codes, scale, bucket, levels, out):
        """out[i] = scale_b · k_i / s (QSGD decoder; no dither to subtract)."""
        out[i] = (scale[i // bucket] * np.float32(codes[i])) / np.float32(levels)

    @leaf
    def onebit_lane_sums(q, g, cols, lanes, partial):
        """Lane j = q // cols of column c = q % cols of g viewed as (rows, cols) row-major: over rows
        j, j + L, j + 2L, … (L = ``lanes``) in order, the float64 sums of the entries ≥ 0 and < 0 and
        their counts, into partial[k·L·cols + q] for k = 0 … 3. Neighbouring q read neighbouring
        columns; L·cols lanes in all keep a GPU busy when there are few columns."""
        sp = np.float64(0.0)  # typed: the CUDA simulator's NumPy 2 rules would keep a bare 0.0 + float32 in float32
        sn = np.float64(0.0)
        npos = 0
        nneg = 0
        for i in range(q, g.shape[0], lanes * cols):  # row j, column c is element j·cols + c = q
            x = np.float64(g[i])
            if x >= 0.0:
                sp += x
                npos += 1
            else:
                sn += x
                nneg += 1
        m = lanes * cols
        partial[q] = sp
        partial[m + q] = sn
        partial[2 * m + q] = np.float64(npos)
        partial[3 * m + q] = np.float64(nneg)

    @leaf
    def onebit_column_means(c, partial, cols, lanes, pos_mean, neg_mean):
        """Seide 1-bit SGD: the means of the entries ≥ 0 and < 0 of column c (0 for an empty bin),
        from :func:`onebit_lane_sums`' L lanes added pairwise (lane j + L/2 into lane j, then
        j + L/4, …, 1; L a power of 2): a fixed order, the same on every device."""
        m = lanes * cols
        half = lanes // 2
        while half > 0:
            for j in range(half):
                for k in range(4):
                    partial[k * m + j * cols + c] += partial[k * m + (j + half) * cols + c]
            half //= 2
        npos = partial[2 * m + c]
        nneg = partial[3 * m + c]
        pos_mean[c] = np.float32(partial[c] / npos) if npos > 0.0 else F32_ZERO
        neg_mean[c] = np.float32(partial[m + c] / nneg) if nneg > 0.0 else F32_ZERO

    @leaf
    def onebit_encode(i, g, bits):
        bits[i] = 1 if g[i] >= F32_ZERO else 0

    @leaf
    def onebit_decode(i, bits, cols, pos_mean, neg_mean, out):
        c = i % cols
        out[i] = pos_mean[c] if bits[i] else neg_mean[c]

    return SimpleNamespace(qsgd_encode=qsgd_encode, scale_decode=scale_decode, onebit_lane_sums=onebit_lane_sums,
                           onebit_column_means=onebit_column_means,
                           onebit_encode=onebit_encode, onebit_decode=onebit_decode)
