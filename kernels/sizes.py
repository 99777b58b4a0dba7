"""Pure sizing functions: the layouts codecs and transports give their payloads (buckets, packed
bytes, coset and symbol packing, summable words). Integers in, integers out; no tensors."""

from __future__ import annotations

import numpy as np

SUM_WORD_BITS = 50  # float64 words hold integers < 2^50, with margin for the /P and ×P of Average


def integer(name: str, v: object, lo: int, hi: int) -> int:
    """``v`` as an int in [lo, hi]; a TypeError or ValueError that names ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= int(v) <= hi:
        raise ValueError(f"{name}={v} is out of range [{lo}, {hi}]")
    return int(v)


def num_buckets(n: int, bucket: int) -> int:
    return (n + bucket - 1) // bucket


def packed_bytes(n: int, nbits: int) -> int:
    """⌈n·b/8⌉: 8 codes of b bits in b bytes, no padding beyond the last byte."""
    return (n * nbits + 7) // 8


def radix_per_byte(radix: int) -> int:
    """m = ⌊log_radix 256⌋ symbols per byte (radix 3: 5, radix 5: 3, radix 7 to 16: 2)."""
    radix = integer("radix", radix, 2, 256)
    m, p = 0, 1
    while p * radix <= 256:
        p *= radix
        m += 1
    return m


def symbol_packing(alphabet: int) -> tuple[str, int]:
    """Densest of the two packers for symbols in [0, alphabet): ("bits", b) with b = ⌈log2 A⌉, or
    ("radix", m) with m = radix_per_byte(A) symbols per byte (base 3: 1.6 bits, base 5: 2.67)."""
    alphabet = integer("alphabet", alphabet, 2, 256)
    b = (alphabet - 1).bit_length()
    m = radix_per_byte(alphabet)
    return ("radix", m) if 8 / m < b else ("bits", b)


def symbol_bytes(n: int, alphabet: int) -> int:
    kind, v = symbol_packing(alphabet)
    return packed_bytes(n, v) if kind == "bits" else (n + v - 1) // v


def coset_bits(nesting_ratio: int) -> int | None:
    """log2 ρ when ρ is a power of two (bit packing), else None (radix packing)."""
    rho = integer("nesting_ratio", nesting_ratio, 2, 256)
    return rho.bit_length() - 1 if rho & (rho - 1) == 0 else None


def coset_packing(nesting_ratio: int) -> tuple[str, int]:
    """How :func:`.ops.pack_cosets` packs coset symbols in [0, ρ): ("bits", log2 ρ) for ρ a power of
    two, else ("radix", m) with m = radix_per_byte(ρ)."""
    b = coset_bits(nesting_ratio)
    return ("bits", b) if b is not None else ("radix", radix_per_byte(nesting_ratio))


def coset_bytes(n: int, nesting_ratio: int) -> int:
    """Bytes :func:`.ops.pack_cosets` takes for n symbols."""
    kind, v = coset_packing(nesting_ratio)
    return packed_bytes(n, v) if kind == "bits" else (n + v - 1) // v


def onebit_lanes(rows: int, cols: int) -> int:
    """Lanes per column of the 1-bit column means (a function of the shape only, so every device
    adds in the same order): the largest power of 2 with lanes·cols ≤ 2^16 (a GPU's worth of
    threads) and lanes < 2·rows, at least 1."""
    lanes = 1
    while 2 * lanes * cols <= 1 << 16 and lanes < rows:
        lanes *= 2
    return lanes
