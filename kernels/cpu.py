"""CPU twins: every block function of :mod:`.arith`, compiled with ``numba.njit`` and looped
over its blocks with ``prange``. Each kernel takes the block count first, then the block
function's arguments (contiguous NumPy arrays and typed scalars). Callers use :mod:`.ops`.
"""

from __future__ import annotations

from numba import njit, prange

from . import arith

_f = arith.build(njit)
philox4x32 = _f.philox4x32
_dither_fill = _f.dither_fill
_bucket_absmax = _f.bucket_absmax
_bucket_l2 = _f.bucket_l2
_dqsg_encode = _f.dqsg_encode
_dqsg_decode = _f.dqsg_decode
_dither1_encode = _f.dither1_encode
_dither1_decode = _f.dither1_decode
_nested_encode = _f.nested_encode
_nested_decode = _f.nested_decode
_qsgd_encode = _f.qsgd_encode
_scale_decode = _f.scale_decode
_onebit_column_means = _f.onebit_column_means
_onebit_encode = _f.onebit_encode
_onebit_decode = _f.onebit_decode
_bitpack = _f.bitpack
_bitunpack = _f.bitunpack
_radixpack = _f.radixpack
_radixunpack = _f.radixunpack
_modadd_bits = _f.modadd_bits
_modadd_radix = _f.modadd_radix
_pack_sum_fields = _f.pack_sum_fields
_unpack_sum_fields = _f.unpack_sum_fields
_par = njit(parallel=True, cache=True)


@_par
def dither_fill(nb, out, step, tid, sender, k0, k1):
    for b in prange(nb):
        _dither_fill(b, out, step, tid, sender, k0, k1)


@_par
def bucket_absmax(nb, g, bucket, out):
    for b in prange(nb):
        _bucket_absmax(b, g, bucket, out)


@_par
def bucket_l2(nb, g, bucket, out):
    for b in prange(nb):
        _bucket_l2(b, g, bucket, out)


@_par
def dqsg_encode(nb, g, delta, bucket, levels, codes, step, tid, sender, k0, k1):
    for b in prange(nb):
        _dqsg_encode(b, g, delta, bucket, levels, codes, step, tid, sender, k0, k1)


@_par
def dqsg_decode(nb, ksum, delta, bucket, first, senders, factor, out, step, tid, k0, k1):
    for b in prange(nb):
        _dqsg_decode(b, ksum, delta, bucket, first, senders, factor, out, step, tid, k0, k1)


@_par
def dither1_encode(nb, g, delta, bucket, bits, step, tid, sender, k0, k1):
    for b in prange(nb):
        _dither1_encode(b, g, delta, bucket, bits, step, tid, sender, k0, k1)


@_par
def dither1_decode(nb, bits, delta, bucket, out, step, tid, sender, k0, k1):
    for b in prange(nb):
        _dither1_decode(b, bits, delta, bucket, out, step, tid, sender, k0, k1)


@_par
def nested_encode(nb, g, delta, bucket, levels, rho, symbols, step, tid, sender, k0, k1):
    for b in prange(nb):
        _nested_encode(b, g, delta, bucket, levels, rho, symbols, step, tid, sender, k0, k1)


@_par
def nested_decode(nb, symbols, delta, bucket, levels, rho, side, first, senders, factor, guard,
                  out, flags, step, tid, k0, k1):
    for b in prange(nb):
        _nested_decode(b, symbols, delta, bucket, levels, rho, side, first, senders, factor, guard,
                       out, flags, step, tid, k0, k1)


@_par
def qsgd_encode(nb, g, norm, bucket, levels, codes, step, tid, sender, k0, k1):
    for b in prange(nb):
        _qsgd_encode(b, g, norm, bucket, levels, codes, step, tid, sender, k0, k1)


@_par
def scale_decode(nb, codes, scale, bucket, levels, out):
    for i in prange(nb):
        _scale_decode(i, codes, scale, bucket, levels, out)


@_par
def onebit_column_means(nb, g, cols, pos_mean, neg_mean):
    for c in prange(nb):
        _onebit_column_means(c, g, cols, pos_mean, neg_mean)


@_par
def onebit_encode(nb, g, bits):
    for i in prange(nb):
        _onebit_encode(i, g, bits)


@_par
def onebit_decode(nb, bits, cols, pos_mean, neg_mean, out):
    for i in prange(nb):
        _onebit_decode(i, bits, cols, pos_mean, neg_mean, out)


@_par
def bitpack(nb, symbols, nbits, out):
    for b in prange(nb):
        _bitpack(b, symbols, nbits, out)


@_par
def bitunpack(nb, packed, nbits, out):
    for b in prange(nb):
        _bitunpack(b, packed, nbits, out)


@_par
def radixpack(nb, symbols, radix, per_byte, out):
    for b in prange(nb):
        _radixpack(b, symbols, radix, per_byte, out)


@_par
def radixunpack(nb, packed, radix, per_byte, out):
    for b in prange(nb):
        _radixunpack(b, packed, radix, per_byte, out)


@_par
def modadd_bits(nb, x, y, nbits, out):
    for b in prange(nb):
        _modadd_bits(b, x, y, nbits, out)


@_par
def modadd_radix(nb, x, y, radix, per_byte, out):
    for b in prange(nb):
        _modadd_radix(b, x, y, radix, per_byte, out)


@_par
def pack_sum_fields(nb, codes, offset, width, per_word, words):
    for w in prange(nb):
        _pack_sum_fields(w, codes, offset, width, per_word, words)


@_par
def unpack_sum_fields(nb, words, factor, width, per_word, offset, ksum):
    for w in prange(nb):
        _unpack_sum_fields(w, words, factor, width, per_word, offset, ksum)
