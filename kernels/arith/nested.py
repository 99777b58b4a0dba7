"""NDQSG (docs/ALGORITHMS.md §2, §3): the fine DQSG index sent as its coset symbol modulo ρ, and
the side-information decoder that resolves the coset (of one sender, or of a mod-ρ sum of several)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from .constants import F32_ZERO, RESOLVE_LIMIT


def build(jit: Callable, leaf: Callable, *, round_half_up, centered_mod, dither_range, dither_code,
          segment_end) -> SimpleNamespace:
    """The nested encoder and decoder, compiled."""

    @jit
    def nested_encode(i0, i1, u, g, delta, bucket, levels, rho, symbols, step, tid, sender, ranks, key0, key1):
        """NDQSG (docs/ALGORITHMS.md §2): fine index k = DQSG(s₁) code, sent as its coset symbol
        (k + ⌊ρ/2⌋) mod ρ ∈ [0, ρ) (uint8)."""
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        half = rho // 2
        i = i0
        while i < i1:
            j = segment_end(i, i1, bucket)
            d = delta[i // bucket]
            for k in range(i, j):
                symbols[k] = centered_mod(dither_code(g[k], d, u[k - i0], levels), rho, half)
            i = j

    @jit
    def nested_decode(i0, i1, u, symbols, delta, bucket, rho, side, first, senders, factor, out, kout, step, tid,
                      ranks, key0, key1):
        """Side-information decoder of the (mod-ρ sum of the) coset symbols of senders
        first .. first+senders−1 (one sender: docs/ALGORITHMS.md §2; several: §3). ``symbols`` may
        be any integers congruent to them mod ρ (the unreduced sums of several senders' symbols).

        side[i] estimates the senders' summed gradient. With U = Σ_p u_p and Y = side/Δ + U (the
        estimate of K = Σ_p k_p), C = (symbol mod ρ) − (P⌊ρ/2⌋ mod ρ) is K's coset value and
            K̂ = C + ρ · round((Y − C)/ρ),   out = factor · Δ (K̂ − U).
        K̂ = K exactly iff |K − Y| < ρ/2. kout[i] = K̂ (int32), for checksums.
        """
        dither_range(i0, i1, first, senders, ranks, u, step, tid, key0, key1)
        rho_f = np.float32(rho)
        shift = centered_mod(senders * (rho // 2), rho, 0)
        i = i0
        while i < i1:
            j = segment_end(i, i1, bucket)
            d = delta[i // bucket]
            for k in range(i, j):
                if d == F32_ZERO:
                    out[k] = F32_ZERO
                    kout[k] = 0
                    continue
                uk = u[k - i0]
                c = centered_mod(np.int64(symbols[k]), rho, 0) - shift
                y = side[k] / d + uk
                r = min(max((y - np.float32(c)) / rho_f, -RESOLVE_LIMIT), RESOLVE_LIMIT)
                kk = c + rho * round_half_up(r)
                out[k] = factor * (d * (np.float32(kk) - uk))
                kout[k] = kk
            i = j

    return SimpleNamespace(nested_encode=nested_encode, nested_decode=nested_decode)
