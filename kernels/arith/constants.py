"""Constants of the arithmetic: typed integer masks and shifts, Philox and checksum multipliers,
float32 constants, GPU scratch sizes and the shared-stream words of the stratified dither."""

from __future__ import annotations

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
# The GPU runs a fused pass's range per CUDA block with its scratch in shared memory: a range holds
# at most GPU_TILE elements (a multiple of its phases' units: 4, a packing group ≤ 8, a summable word
# of F ≤ 50 fields; lcm(4, F) ≤ 196), and a block's symbol histogram GPU_HIST values (2s + 1 ≤ 255).
GPU_TILE = 1024
GPU_HIST = 256
RESOLVE_LIMIT = np.float32(2.0**30)  # clamp for coset resolution: keeps garbage side information finite
# Sender words of the streams every rank shares under the stratified dither (docs/ALGORITHMS.md §9):
# v (the common offset), the permutation's (a, c) and, for a rank count that is not a power of 2,
# the shift b. Real ranks stay below key.MAX_STRATIFIED_RANKS = 2^16, far from these words.
SHARED_V = 0xFFFFFFFF
SHARED_PERM = 0xFFFFFFFE
SHARED_SHIFT = 0xFFFFFFFD
# Sender word of the rotation's sign stream (docs/ALGORITHMS.md §10): shared by every rank, like v.
SHARED_SIGNS = 0xFFFFFFFC
GF_MAX_DEGREE = 16  # GF(2^m) with m <= 16: up to 2^16 ranks share a stratified dither
# The smallest irreducible polynomial of each degree m over GF(2) (bit i = coefficient of x^i),
# the modulus of GF(2^m) arithmetic; index m (entry 0 unused).
GF_POLY = (0, 0x3, 0x7, 0xB, 0x13, 0x25, 0x43, 0x83, 0x11B, 0x203, 0x409, 0x805, 0x1009, 0x201B, 0x4021, 0x8003,
           0x1002B)
