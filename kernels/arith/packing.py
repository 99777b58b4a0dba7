"""Packing of small symbols into bytes and modular addition on packed bytes: b-bit fields
(8 symbols in b bytes, little-endian bit order) and base-ρ digits (radix_per_byte(ρ) to a byte).

The ``pack_*``/``unpack_*`` helpers pack one group at any offset (the fused DQSG passes call them on
their scratch buffers); ``bitpack``, ``radixpack`` and their inverses are the index functions of the
packing kernels, ``modadd_bits``/``modadd_radix`` those of the coset ring's addition."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np


def build(jit: Callable, leaf: Callable) -> SimpleNamespace:
    """The packers, unpackers and modular adders, compiled with ``leaf``."""

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

    return SimpleNamespace(pack_bits=pack_bits, unpack_bits=unpack_bits, pack_radix=pack_radix,
                           unpack_radix=unpack_radix, bitpack=bitpack, bitunpack=bitunpack, radixpack=radixpack,
                           radixunpack=radixunpack, pack_range=pack_range, modadd_bits=modadd_bits,
                           modadd_radix=modadd_radix)
