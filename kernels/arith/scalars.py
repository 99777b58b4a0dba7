"""Scalar functions: Philox-4x32-10 and its lanes, the dither's odd numerator and centred uniform,
exact rounding, GF(2^m) products, the QSGD level, the coset symbol and the checksum weight.

Plain module-level Python over NumPy scalar types (callable as they are, e.g. for a known-answer
check); :func:`build` compiles them with the ``leaf`` decorator for the functions of the other
modules of :mod:`.arith` to call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from .constants import (
    CHECK_M0,
    CHECK_M1,
    F32_2POW_M24,
    F32_HALF,
    I32_2POW23,
    MASK32,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    SHIFT9,
    SHIFT15,
    SHIFT16,
    SHIFT32,
    U64_ONE,
    U64_ZERO,
)


def _philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 block function: 128-bit counter (c0..c3), 64-bit key (k0, k1).

    All arguments are uint64 holding 32-bit values; returns four uint64 holding 32-bit values.
    Round r: (hi0, lo0) = M0*c0, (hi1, lo1) = M1*c2;
    c <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); then k <- k + (W0, W1) mod 2^32.
    """
    for _ in range(PHILOX_ROUNDS):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        n0 = (p1 >> SHIFT32) ^ c1 ^ k0
        n2 = (p0 >> SHIFT32) ^ c3 ^ k1
        c1 = p1 & MASK32
        c3 = p0 & MASK32
        c0 = n0
        c2 = n2
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _lane(u0, u1, u2, u3, j):
    """Lane j (0 .. 3) of the four outputs of one Philox block."""
    if j == 0:
        return u0
    if j == 1:
        return u1
    if j == 2:
        return u2
    return u3


def _check_weight(j):
    """Odd 32-bit weight of position j (uint64) in a bucket's nested checksum: w_j = h(j) | 1 with h
    the multiply–xorshift hash above. Odd, hence invertible mod 2^32 (one wrong index is always
    caught); pseudo-random in j, so several wrong indices cancel only by a 2^-32-scale accident,
    where the arithmetic weights 2j + 1 let structured patterns (a + b = c + d) through."""
    x = j & MASK32
    x ^= x >> SHIFT16
    x = (x * CHECK_M0) & MASK32
    x ^= x >> SHIFT15
    x = (x * CHECK_M1) & MASK32
    x ^= x >> SHIFT16
    return x | U64_ONE


def _odd_numerator(x):
    """2·(x >> 9) + 1 (uint64) for a 32-bit random word x: the odd integer m ∈ [1, 2^24) of the offset
    v = m·2^-24 = ((x >> 9) + ½)·2^-23 ∈ (0, 1) (the top 23 bits of x give 2^23 equally likely values)."""
    return ((x >> SHIFT9) << U64_ONE) | U64_ONE


def _centered(m):
    """The float32 uniform on the open interval (−½, ½) of an odd numerator m (uint64, see above):

    u = v − ½ = (m − 2^23)·2^-24, an integer of magnitude below 2^23 (exact in float32) times a power
    of 2 (exact), symmetric about 0, never ±½. No rounding and no multiply-add anywhere, so CPU and
    GPU agree bit for bit.
    """
    return np.float32(np.int32(m) - I32_2POW23) * F32_2POW_M24


def _round_half_up(t):
    """Nearest integer to float32 t (ties upward), exactly: t - floor(t) is exact in float32.

    floor by truncation and correction (one conversion instruction, no libm call); callers keep
    |t| < 2^31.
    """
    f = np.int32(t)
    if np.float32(f) > t:
        f -= np.int32(1)
    if t - np.float32(f) >= F32_HALF:
        f += np.int32(1)
    return f


def _gf_mul(a, x, m, poly, steps):
    """a·x in GF(2^m) = GF(2)[t]/poly (uint64), branch-free shift-and-add, each step adding a·t^i where
    bit i of x is set and reducing a·t^(i+1) by poly when it reaches degree m. ``steps`` ≥ m, a
    constant at each call site (x < 2^m leaves r alone past m), so the loop unrolls and vectorizes."""
    r = U64_ZERO
    top = np.uint64(m - 1)
    for i in range(steps):
        r ^= a * ((x >> np.uint64(i)) & U64_ONE)
        a = (a << U64_ONE) ^ (poly * ((a >> top) & U64_ONE))
    return r


def _stochastic_level(a, u):
    """QSGD level: floor(a + U) with U = u + 1/2 uniform on (0, 1): E = a for a >= 0 (Alistarh et al., QSGD)."""
    return math.floor(a + (u + F32_HALF))


def _centered_mod(k, rho, half):
    """Coset symbol of integer k modulo rho: (k + half) mod rho in [0, rho), half = rho // 2.

    The coset *value* is symbol − half ∈ [−⌊ρ/2⌋, ρ−1−⌊ρ/2⌋] (ρ = 3 → {−1, 0, 1}), computed from the
    integer k (docs/ALGORITHMS.md §2: never from the unrounded t, which gives ρ+1 symbols for even ρ).
    The quotient is floor((m + ½)/ρ) in float32 (exact for |m| < 2^20: the ½ keeps it clear of
    rounding), which vectorizes where an integer modulo does not.
    """
    m = k + half
    t = (np.float32(m) + F32_HALF) / np.float32(rho)
    q = np.int64(t)
    if np.float32(q) > t:
        q -= 1
    return m - rho * q


def _tally(counts, row, symbol, amount):
    """counts[row, symbol] += amount (the CPU's; a range owns its row, so no two ranges race)."""
    counts[row, symbol] += amount


def _no_barrier():
    """The CPU's ``sync``: a CPU block function runs on one thread, with no one to wait for."""


def build(jit: Callable, leaf: Callable, *, tally: Callable | None, sync: Callable | None) -> SimpleNamespace:
    """The scalar functions compiled with ``leaf`` (``jit`` unused: every scalar is a leaf), and the
    target's ``tally`` (the GPU's atomic add) and ``sync`` (the GPU's block barrier), or the CPU's
    plain increment and no-op when it gave none."""
    return SimpleNamespace(tally=tally or leaf(_tally), sync=sync or leaf(_no_barrier), philox4x32=leaf(_philox4x32),
                           odd_numerator=leaf(_odd_numerator), centered=leaf(_centered),
                           round_half_up=leaf(_round_half_up), stochastic_level=leaf(_stochastic_level),
                           centered_mod=leaf(_centered_mod), gf_mul=leaf(_gf_mul), check_weight=leaf(_check_weight),
                           lane=leaf(_lane))
