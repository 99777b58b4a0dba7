"""Device-agnostic scalar arithmetic, written once and compiled for each device.

Every function here is plain Python over NumPy scalar types. :func:`build` compiles them with a
given Numba decorator (``numba.njit`` for the CPU twins in :mod:`hvdquant.kernels.cpu`,
``numba.cuda.jit(device=True)`` for CUDA kernels), so the CPU and GPU paths share one definition
of the arithmetic and produce the same codes bit for bit.

Integer arithmetic is done in ``uint64`` with explicit 32-bit masks: Numba promotes mixed
signed/unsigned 64-bit operands to float64, so every constant below is a typed ``np.uint64``.

Floating-point arithmetic is float32 and uses only operations that IEEE 754 rounds exactly the
same way on every device (add, subtract, multiply, divide; no transcendental functions, and no
expression a compiler could contract into a fused multiply-add with a different rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

MASK32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)
SHIFT9 = np.uint64(9)
# Philox-4x32 multipliers and Weyl key increments (Salmon et al., SC'11, "Parallel random
# numbers: as easy as 1, 2, 3"; the Random123 reference values).
PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint64(0x9E3779B9)
PHILOX_W1 = np.uint64(0xBB67AE85)
PHILOX_ROUNDS = 10

F32_HALF = np.float32(0.5)
F32_ULP23 = np.float32(2.0**-23)


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


def _uniform_centered(x):
    """Map a 32-bit random word to a float32 uniform on the open interval (-1/2, 1/2).

    u = ((x >> 9) + 1/2) * 2^-23 - 1/2: the top 23 bits give 2^23 equally likely values, symmetric
    about 0, never +-1/2. Every step is exact in float32, so CPU and GPU agree bit for bit.
    """
    return (np.float32(x >> SHIFT9) + F32_HALF) * F32_ULP23 - F32_HALF


def _round_half_up(t):
    """Nearest integer to float32 t (ties upward), exactly: t - floor(t) is exact in float32."""
    f = np.float32(np.floor(t))
    if t - f >= F32_HALF:
        f = f + np.float32(1.0)
    return np.int32(f)


def build(jit: Callable) -> SimpleNamespace:
    """Compile the scalar functions with ``jit`` and return them, plus composites built on them.

    The composites reference the compiled scalars through this closure, which is how Numba lets
    one device function call another on both the CPU and the CUDA target.
    """
    philox4x32 = jit(_philox4x32)
    uniform_centered = jit(_uniform_centered)
    round_half_up = jit(_round_half_up)

    def dither_block(block, step, tensor_id, sender, key0, key1):
        """The four dithers u in (-1/2, 1/2) of elements 4*block .. 4*block+3.

        Counter = (block, step, tensor_id, sender), key = (seed low 32 bits, seed high 32 bits):
        any rank can regenerate any sender's dither for any step and tensor.
        """
        r0, r1, r2, r3 = philox4x32(block, step, tensor_id, sender, key0, key1)
        return uniform_centered(r0), uniform_centered(r1), uniform_centered(r2), uniform_centered(r3)

    def dither_code(g, delta, u, levels):
        """DQSG index k = round(g/delta + u), clipped to [-levels, levels] (ALGORITHMS.md §1).

        delta == 0 marks an all-zero (or underflowed) bucket: the index is 0. The clip only acts
        when float32 rounding of delta = max|g|/levels pushes |g/delta| a hair above levels.
        """
        if delta == np.float32(0.0):
            return np.int32(0)
        k = round_half_up(g / delta + u)
        if k > levels:
            k = levels
        if k < -levels:
            k = -levels
        return k

    return SimpleNamespace(
        philox4x32=philox4x32,
        uniform_centered=uniform_centered,
        round_half_up=round_half_up,
        dither_block=jit(dither_block),
        dither_code=jit(dither_code),
    )
