"""Device-agnostic arithmetic, written once and compiled for each device.

Every function here is plain Python over NumPy scalar types and arrays. :func:`build` compiles
them with a given Numba decorator (``numba.njit`` for the CPU twins in :mod:`.cpu`,
``numba.cuda.jit(device=True)`` for the CUDA kernels in :mod:`.cuda`). Each *block function*
``f(b, ...)`` computes one independent block ``b`` of an output (4 elements for the Philox-driven
codecs, one bucket for reductions, one byte group for packers). The CPU loops ``b`` with
``prange``; the GPU gives each thread one ``b``. Same code, same bits.

Rules that keep CPU and GPU bit-identical:
- integers are ``uint64``/``int64`` with explicit masks (Numba promotes mixed signed/unsigned
  64-bit operands to float64, so constants are typed);
- floats go only through correctly rounded IEEE operations (+, −, ×, ÷, sqrt, conversions) and
  exact ones (floor, truncation, comparisons); no transcendental functions;
- no float32 product ever feeds an addition, so there is nothing for a GPU compiler to contract into
  a fused multiply-add (the CUDA compiler does so by default, the CPU's does not): dithers are built
  from integers (an odd integer times a power of 2), and sums of products accumulate in float64,
  where a product of two float32 values is exact, so a contracted ``fma(a, b, acc)`` rounds exactly
  as ``acc + a*b`` does (the same holds for float64 products of integers below 2^53);
- every reduction runs in a fixed sequential order inside its block.

``tests/unit/test_ptx.py`` compiles every CUDA kernel to PTX and checks the instructions this
argument relies on: no float32 ``fma``, every division and square root ``.rn``, no approximate
instruction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

MASK32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)
SHIFT9 = np.uint64(9)
SHIFT15 = np.uint64(15)
SHIFT16 = np.uint64(16)
U64_ZERO = np.uint64(0)
U64_ONE = np.uint64(1)
# Philox-4x32 multipliers and Weyl key increments (Salmon et al., SC'11, "Parallel random
# numbers: as easy as 1, 2, 3"; the Random123 reference values).
PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint64(0x9E3779B9)
PHILOX_W1 = np.uint64(0xBB67AE85)
PHILOX_ROUNDS = 10
# Multipliers of the 32-bit integer hash that weights the nested checksum (C. Wellons' "lowbias32",
# a two-round multiply–xorshift with low bias): position j of a bucket gets the odd weight h(j) | 1.
CHECK_M0 = np.uint64(0x7FEB352D)
CHECK_M1 = np.uint64(0x846CA68B)

F32_ZERO = np.float32(0.0)
F32_HALF = np.float32(0.5)
F32_ONE = np.float32(1.0)
F32_2POW_M24 = np.float32(2.0**-24)
I32_2POW23 = np.int32(2**23)
SHIFT24 = np.uint64(24)
F32_INF = np.float32(np.inf)
GPU_SPAN = 20  # scratch per GPU thread in the fused payload passes: ≥ lcm(4, packing group) (8, 12 or 20)
GPU_FIELD_SCRATCH = 200  # scratch per GPU thread in the fused summable passes: ≥ lcm(4, F) for F ≤ 50 fields a word
RESOLVE_LIMIT = np.float32(2.0**30)  # clamp for coset resolution: keeps garbage side information finite
# Sender words of the streams every rank shares under the stratified dither (docs/ALGORITHMS.md §9):
# v (the common offset), the permutation's (a, c) and, for a rank count that is not a power of 2,
# the shift b. Real ranks stay below key.MAX_STRATIFIED_RANKS = 2^16, far from these words.
SHARED_V = 0xFFFFFFFF
SHARED_PERM = 0xFFFFFFFE
SHARED_SHIFT = 0xFFFFFFFD
GF_MAX_DEGREE = 16  # GF(2^m) with m <= 16: up to 2^16 ranks share a stratified dither
# The smallest irreducible polynomial of each degree m over GF(2) (bit i = coefficient of x^i),
# the modulus of GF(2^m) arithmetic; index m (entry 0 unused).
GF_POLY = (0, 0x3, 0x7, 0xB, 0x13, 0x25, 0x43, 0x83, 0x11B, 0x203, 0x409, 0x805, 0x1009, 0x201B, 0x4021, 0x8003,
           0x1002B)


# ----------------------------------------------------------------------------- scalars
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


def build(jit: Callable, leaf: Callable | None = None, tally: Callable | None = None) -> SimpleNamespace:
    """Compile every scalar and block function; return them in a namespace.

    Small functions (scalars, per-element helpers, index block functions) are compiled with ``leaf``
    (the CPU passes ``njit(inline="always")``: inlined into their callers, so LLVM vectorizes the
    loops around them — the Philox loop runs 4× faster than with calls), the range functions with
    ``jit`` (called once per chunk; inlining them too would only multiply compile time). Block
    functions reference the compiled functions through this closure, which is how Numba lets one
    device function call another on both the CPU and the CUDA target. ``tally(counts, row, symbol,
    amount)`` adds to a histogram cell: the CPU's plain increment by default, an atomic add on the GPU
    (where many threads share a row).
    """
    leaf = leaf or jit
    tally = tally or leaf(_tally)
    philox4x32 = leaf(_philox4x32)
    odd_numerator = leaf(_odd_numerator)
    centered = leaf(_centered)
    round_half_up = leaf(_round_half_up)
    stochastic_level = leaf(_stochastic_level)
    centered_mod = leaf(_centered_mod)
    gf_mul = leaf(_gf_mul)
    check_weight = leaf(_check_weight)

    @leaf
    def uniforms(b, step, tid, sender, key0, key1):
        """The four dithers u in (-1/2, 1/2) of elements 4b .. 4b+3 of stream (seed, step, tensor, sender).

        Counter = (b, step, tensor id, sender), key = (seed low 32 bits, seed high 32 bits).
        """
        r0, r1, r2, r3 = philox4x32(np.uint64(b), step, tid, sender, key0, key1)
        return (centered(odd_numerator(r0)), centered(odd_numerator(r1)), centered(odd_numerator(r2)),
                centered(odd_numerator(r3)))

    @leaf
    def lane(u0, u1, u2, u3, j):
        if j == 0:
            return u0
        if j == 1:
            return u1
        if j == 2:
            return u2
        return u3

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

    # ------------------------------------------------------------------ range functions
    # Philox-driven codecs work on element ranges [i0, i1) with i0 % 4 == 0 and a scratch buffer u
    # of at least i1 − i0 float32: the CPU gives each prange iteration a chunk of CHUNK elements
    # (the Philox loop and the per-bucket loops then vectorize), the GPU gives each thread 4.

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

    @leaf
    def segment_end(i, i1, bucket):
        """End of the run of [i, i1) that lies in i's bucket."""
        return min(i1, (i // bucket + 1) * bucket)

    @jit
    def dqsg_encode(i0, i1, u, g, delta, bucket, levels, offset, codes, step, tid, sender, ranks, key0, key1):
        """codes[i] = round(g_i/Δ_b + u_i) + offset, the index in [−s, s] (docs/ALGORITHMS.md §1) shifted
        by ``offset`` (0 for signed int8 codes, s for unsigned symbols ready to pack)."""
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        quantize_range(i0, i1, u, g, delta, bucket, levels, offset, codes, 0)

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

    @jit
    def dqsg_decode(i0, i1, u, ksum, offset, delta, bucket, first, senders, factor, out, step, tid, ranks, key0,
                    key1):
        """out[i] = factor · Δ_b · (ksum[i] − offset − Σ_p u_p[i]), p = first .. first+senders−1 in order.

        One sender: the DQSG decoder Δ(k − u) (from k, or from the symbols k + s with offset s). P senders
        with a common Δ: Σ_p ĝ_p (docs/ALGORITHMS.md §3).
        """
        dither_range(i0, i1, first, senders, ranks, u, step, tid, key0, key1)
        reconstruct_range(i0, i1, u, ksum, offset, delta, bucket, factor, out, 0)

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
        first .. first+senders−1 (one sender: docs/ALGORITHMS.md §2; several: §3).

        side[i] estimates the senders' summed gradient. With U = Σ_p u_p and Y = side/Δ + U (the
        estimate of K = Σ_p k_p), C = symbol − P⌊ρ/2⌋ is K's coset value and
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
                c = np.int64(symbols[k]) - shift
                y = side[k] / d + uk
                r = min(max((y - np.float32(c)) / rho_f, -RESOLVE_LIMIT), RESOLVE_LIMIT)
                kk = c + rho * round_half_up(r)
                out[k] = factor * (d * (np.float32(kk) - uk))
                kout[k] = kk
            i = j

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

    # ------------------------------------------------------------------ index functions
    # Everything else maps one index (an element, a bucket, a column, a packed group) to its output.

    @leaf
    def bucket_absmax(b, g, bucket, out):
        """out[b] = max |g_i| over bucket b; NaN reported as +inf so a max-reduction keeps it."""
        m = F32_ZERO
        for i in range(b * bucket, min(g.shape[0], (b + 1) * bucket)):
            a = abs(g[i])
            if a != a:
                a = F32_INF
            if a > m:
                m = a
        out[b] = m

    @leaf
    def bucket_l2(b, g, bucket, out):
        """out[b] = ‖g_b‖₂: float32 squares are exact in float64, summed in order, then sqrt."""
        acc = np.float64(0.0)
        for i in range(b * bucket, min(g.shape[0], (b + 1) * bucket)):
            x = np.float64(g[i])
            acc += x * x
        out[b] = np.float32(math.sqrt(acc))

    @leaf
    def bucket_step(b, absmax, levels, out):
        """out[b] = Δ_b = absmax_b / s in float32 (docs/ALGORITHMS.md §1): one correctly rounded
        division on both devices (a framework's division by a scalar may multiply by the reciprocal
        on the GPU instead, which decides other codes)."""
        out[b] = absmax[b] / np.float32(levels)

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
            acc = (acc + check_weight(j) * np.uint64(np.int64(k[i]) & np.int64(0xFFFFFFFF))) & MASK32
            j += U64_ONE
        out[b] = np.int64(acc)

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

    @leaf
    def pack_bits(src, i, n, nbits, out, o):
        """Symbols src[i .. min(i + 8, n)) (each < 2^nbits) into bytes out[o .. o + nbits) (those
        below out's end), little-endian bit order."""
        acc = np.uint64(0)
        shift = np.uint64(nbits)
        for j in range(min(8, n - i)):
            acc |= np.uint64(src[i + j]) << (shift * np.uint64(j))
        for k in range(min(nbits, out.shape[0] - o)):
            out[o + k] = np.uint8((acc >> np.uint64(8 * k)) & np.uint64(0xFF))

    @leaf
    def unpack_bits(packed, o, nbits, dst, i, n):
        """Inverse of :func:`pack_bits`: bytes packed[o ..] into symbols dst[i .. min(i + 8, n))."""
        acc = np.uint64(0)
        for k in range(min(nbits, packed.shape[0] - o)):
            acc |= np.uint64(packed[o + k]) << np.uint64(8 * k)
        mask = (np.uint64(1) << np.uint64(nbits)) - np.uint64(1)
        for j in range(min(8, n - i)):
            dst[i + j] = np.uint8((acc >> np.uint64(nbits * j)) & mask)

    @leaf
    def pack_radix(src, i, n, radix, per_byte, out, o):
        """out[o] = Σ_j src[i + j] · radix^j over j < min(per_byte, n − i) (radix 3: 5 trits per byte)."""
        acc = 0
        p = 1
        for j in range(min(per_byte, n - i)):
            acc += np.int64(src[i + j]) * p
            p *= radix
        out[o] = np.uint8(acc)

    @leaf
    def unpack_radix(packed, o, radix, per_byte, dst, i, n):
        """Inverse of :func:`pack_radix`: the base-``radix`` digits of packed[o] into dst[i ..]."""
        acc = np.int64(packed[o])
        for j in range(min(per_byte, n - i)):
            dst[i + j] = np.uint8(acc % radix)
            acc //= radix

    @leaf
    def bitpack(b, symbols, nbits, out):
        """Group b: symbols 8b .. 8b+7 (each < 2^nbits) into bytes nbits·b .. nbits·b+nbits−1;
        the last group writes only the ⌈n·nbits/8⌉ − nbits·b bytes left."""
        pack_bits(symbols, 8 * b, symbols.shape[0], nbits, out, nbits * b)

    @leaf
    def bitunpack(b, packed, nbits, out):
        unpack_bits(packed, nbits * b, nbits, out, 8 * b, out.shape[0])

    @leaf
    def radixpack(b, symbols, radix, per_byte, out):
        """Byte b = Σ_j symbols[b·m + j] · radix^j, m = per_byte."""
        pack_radix(symbols, b * per_byte, symbols.shape[0], radix, per_byte, out, b)

    @leaf
    def radixunpack(b, packed, radix, per_byte, out):
        unpack_radix(packed, b, radix, per_byte, out, b * per_byte, out.shape[0])

    # ------------------------------------------------------------------ fused DQSG payload passes
    # One pass per range [i0, i1) from the gradient to its packed payload and back (i0 a multiple of
    # 4 and of the packing group: ``per_byte`` symbols for radix packing, 8 for bit packing), through
    # scratch buffers u (float32) and sym (uint8) of at least i1 − i0 entries: no symbol array in
    # memory. ``radix`` > 0 selects radix packing, else bit packing with ``nbits``.

    @leaf
    def pack_range(i0, i1, sym, radix, nbits, per_byte, packed):
        n = i1 - i0
        if radix > 0:
            for q in range(0, n, per_byte):
                pack_radix(sym, q, n, radix, per_byte, packed, (i0 + q) // per_byte)
        else:
            for q in range(0, n, 8):
                pack_bits(sym, q, n, nbits, packed, (i0 + q) // 8 * nbits)

    @leaf
    def count_symbols(sym, n, alphabet, counts, row):
        """counts[row, v] += #{i < n : sym[i] = v}: one counting pass per value (they vectorize; a
        scatter of increments does not) for small alphabets, the scatter for large ones."""
        if alphabet <= 16:
            for v in range(alphabet):
                c = 0
                for i in range(n):
                    c += np.int64(sym[i] == v)
                tally(counts, row, v, c)
        else:
            for i in range(n):
                tally(counts, row, sym[i], 1)

    @jit
    def dqsg_encode_packed(i0, i1, u, sym, g, delta, scaled, bucket, levels, radix, nbits, per_byte, packed,
                           counts, row, step, tid, sender, ranks, key0, key1):
        """Own-scale DQSG payload of [i0, i1): with ``scaled``, first Δ_b = max|g|/s of the buckets the
        range holds (whole buckets; NaN → +inf as :func:`bucket_absmax`), then the symbols k + s
        (:func:`dqsg_encode`), counted into counts[row] (for the entropy statistic) and packed."""
        if scaled:
            for b in range(i0 // bucket, (i1 + bucket - 1) // bucket):
                bucket_absmax(b, g, bucket, delta)
                bucket_step(b, delta, levels, delta)
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        quantize_range(i0, i1, u, g, delta, bucket, levels, levels, sym, i0)
        count_symbols(sym, i1 - i0, 2 * levels + 1, counts, row % counts.shape[0])
        pack_range(i0, i1, sym, radix, nbits, per_byte, packed)

    @jit
    def dqsg_decode_packed(i0, i1, u, sym, packed, levels, radix, nbits, per_byte, delta, bucket, out, step, tid,
                           sender, ranks, key0, key1):
        """Inverse of :func:`dqsg_encode_packed`: out[i] = Δ_b (k_i − u_i) from the packed symbols."""
        n = i1 - i0
        if radix > 0:
            for q in range(0, n, per_byte):
                unpack_radix(packed, (i0 + q) // per_byte, radix, per_byte, sym, q, n)
        else:
            for q in range(0, n, 8):
                unpack_bits(packed, (i0 + q) // 8 * nbits, nbits, sym, q, n)
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        reconstruct_range(i0, i1, u, sym, levels, delta, bucket, F32_ONE, out, i0)

    @leaf
    def modadd_bits(b, x, y, nbits, out):
        """Group b of nbits bytes (8 fields of nbits bits): field-wise (x + y) mod 2^nbits, no
        carry between fields: ((x & ~H) + (y & ~H)) ^ ((x ^ y) & H), H = each field's top bit."""
        ax = np.uint64(0)
        ay = np.uint64(0)
        for k in range(nbits):
            o = nbits * b + k
            if o < x.shape[0]:
                ax |= np.uint64(x[o]) << np.uint64(8 * k)
                ay |= np.uint64(y[o]) << np.uint64(8 * k)
        high = np.uint64(0)
        for j in range(8):
            high |= np.uint64(1) << np.uint64(nbits * j + nbits - 1)
        s = ((ax & ~high) + (ay & ~high)) ^ ((ax ^ ay) & high)
        for k in range(nbits):
            o = nbits * b + k
            if o < out.shape[0]:
                out[o] = np.uint8((s >> np.uint64(8 * k)) & np.uint64(0xFF))

    @leaf
    def modadd_radix(b, x, y, radix, per_byte, out):
        """Byte b of radix-packed symbols: digit-wise (x + y) mod radix."""
        ax = np.int64(x[b])
        ay = np.int64(y[b])
        acc = 0
        p = 1
        for _ in range(per_byte):
            acc += ((ax % radix + ay % radix) % radix) * p
            ax //= radix
            ay //= radix
            p *= radix
        out[b] = np.uint8(acc)

    @leaf
    def field_word(src, i, n, offset, radix, per_word):
        """Σ_j (src[i + j] + offset) · R^j over j < min(per_word, n − i), R = ``radix``, as an exact
        float64 (Horner from the last digit; every partial value is an integer below R^F ≤ 2^50)."""
        acc = np.int64(0)
        for j in range(min(per_word, n - i) - 1, -1, -1):
            acc = acc * np.int64(radix) + np.int64(src[i + j] + offset)
        return np.float64(acc)

    @leaf
    def split_word(words, w, factor, radix, inverses, per_word, offset, dst, i, n):
        """Inverse of :func:`field_word` after a reduction that scaled the summed words by ``factor``:
        dst[i + j] = digit j (base R) of t = round(words[w] / factor), minus ``offset`` (int32).
        ``inverses``[j] = fl(1/R^j) for j ≤ per_word (float64).

        Exact in float64 and with no chain from digit to digit: q_j = ⌊t / R^j⌋ = ⌊(t + ½)·inverses[j]⌋,
        because (t + ½)/R^j lies at least ½/R^j from an integer while the computed product errs by
        less than (t + ½)/R^j·2^−52 ≤ ¼/R^j (t < 2^50); then digit j = q_j − R·q_{j+1}."""
        th = math.floor(words[w] / factor + 0.5) + 0.5  # t + ½, exact: |words/factor| < 2^50
        r = np.float64(radix)
        prev = th - 0.5
        for j in range(1, min(per_word, n - i) + 1):
            q = math.floor(th * inverses[j])
            dst[i + j - 1] = np.int32(np.int64(prev - q * r) - offset)
            prev = q

    @leaf
    def pack_sum_fields(w, codes, offset, radix, per_word, words):
        """Word w = Σ_j (codes[w·F + j] + offset) · R^j, F = per_word, R = radix, as an exact float64."""
        words[w] = field_word(codes, w * per_word, codes.shape[0], offset, radix, per_word)

    @leaf
    def unpack_sum_fields(w, words, factor, radix, inverses, per_word, offset, ksum):
        """Inverse of pack_sum_fields after a reduction that scaled the summed words by ``factor``."""
        split_word(words, w, factor, radix, inverses, per_word, offset, ksum, w * per_word, ksum.shape[0])

    # ------------------------------------------------------------------ fused DQSG summable fields
    # The stock path's passes (docs/ALGORITHMS.md §3) fused like the payload ones: ranges [i0, i1)
    # start at multiples of 4 and of ``per_word``; scratch u (float32) and sym/ksum of i1 − i0 entries.

    @jit
    def dqsg_encode_fields(i0, i1, u, sym, g, delta, bucket, levels, radix, per_word, words, counts, row, step, tid,
                           sender, ranks, key0, key1):
        """words[i0/F ..] = the summable fields of the symbols k + s of [i0, i1) (:func:`dqsg_encode` with a
        common Δ, then :func:`pack_sum_fields`), the symbols counted into counts[row]."""
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        quantize_range(i0, i1, u, g, delta, bucket, levels, levels, sym, i0)
        count_symbols(sym, i1 - i0, 2 * levels + 1, counts, row % counts.shape[0])
        n = i1 - i0
        for q in range(0, n, per_word):
            words[(i0 + q) // per_word] = field_word(sym, q, n, 0, radix, per_word)

    @jit
    def dqsg_decode_fields(i0, i1, u, ksum, words, factor, radix, inverses, per_word, offset, delta, bucket, first,
                           senders, out, step, tid, ranks, key0, key1):
        """out[i] = Δ_b (Σ_p k_p[i] − Σ_p u_p[i]) for [i0, i1), the index sums read from the reduced
        words (:func:`unpack_sum_fields` with ``offset`` = P·s, then :func:`dqsg_decode`)."""
        n = i1 - i0
        for q in range(0, n, per_word):
            split_word(words, (i0 + q) // per_word, factor, radix, inverses, per_word, offset, ksum, q, n)
        dither_range(i0, i1, first, senders, ranks, u, step, tid, key0, key1)
        reconstruct_range(i0, i1, u, ksum, 0, delta, bucket, F32_ONE, out, i0)

    return SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("jit", "leaf", "tally")})
