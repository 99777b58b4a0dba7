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
    def onebit_column_means(c, g, cols, pos_mean, neg_mean):
        """Seide 1-bit SGD: for column c of g viewed as (rows, cols) row-major, the means of its
        entries ≥ 0 and < 0 (float64 sums in row order; 0 for an empty bin)."""
        sp = np.float64(0.0)  # typed: the CUDA simulator's NumPy 2 rules would keep a bare 0.0 + float32 in float32
        sn = np.float64(0.0)
        npos = 0
        nneg = 0
        for i in range(c, g.shape[0], cols):
            x = np.float64(g[i])
            if x >= 0.0:
                sp += x
                npos += 1
            else:
                sn += x
                nneg += 1
        pos_mean[c] = np.float32(sp / npos) if npos else F32_ZERO
        neg_mean[c] = np.float32(sn / nneg) if nneg else F32_ZERO

    @leaf
    def onebit_encode(i, g, bits):
        bits[i] = 1 if g[i] >= F32_ZERO else 0

    @leaf
    def onebit_decode(i, bits, cols, pos_mean, neg_mean, out):
        c = i % cols
        out[i] = pos_mean[c] if bits[i] else neg_mean[c]

    return SimpleNamespace(qsgd_encode=qsgd_encode, scale_decode=scale_decode, onebit_column_means=onebit_column_means,
                           onebit_encode=onebit_encode, onebit_decode=onebit_decode)
