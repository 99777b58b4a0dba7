"""CUDA kernels: every block function of :mod:`.arith`, compiled with
``numba.cuda.jit(device=True)``, one thread per block index. Same arguments as the CPU twins in
:mod:`.cpu` (block count first), same arithmetic, same bits. Callers use :mod:`.ops`, which launches
them on torch's current CUDA stream.

Imported lazily: only when a CUDA tensor (or a forced CUDA target, see ``ops.force_target``) asks
for it. With ``NUMBA_ENABLE_CUDASIM=1`` these kernels run in Numba's CUDA simulator on the CPU.
"""

from __future__ import annotations

from numba import cuda

from . import arith

_f = arith.build(cuda.jit(device=True))
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


@cuda.jit
def dither_fill(nb, out, step, tid, sender, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        _dither_fill(b, out, step, tid, sender, k0, k1)


@cuda.jit
def bucket_absmax(nb, g, bucket, out):
    b = cuda.grid(1)
    if b < nb:
        _bucket_absmax(b, g, bucket, out)


@cuda.jit
def bucket_l2(nb, g, bucket, out):
    b = cuda.grid(1)
    if b < nb:
        _bucket_l2(b, g, bucket, out)


@cuda.jit
def dqsg_encode(nb, g, delta, bucket, levels, codes, step, tid, sender, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        _dqsg_encode(b, g, delta, bucket, levels, codes, step, tid, sender, k0, k1)


@cuda.jit
def dqsg_decode(nb, ksum, delta, bucket, first, senders, factor, out, step, tid, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        _dqsg_decode(b, ksum, delta, bucket, first, senders, factor, out, step, tid, k0, k1)


@cuda.jit
def dither1_encode(nb, g, delta, bucket, bits, step, tid, sender, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        _dither1_encode(b, g, delta, bucket, bits, step, tid, sender, k0, k1)


@cuda.jit
def dither1_decode(nb, bits, delta, bucket, out, step, tid, sender, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        _dither1_decode(b, bits, delta, bucket, out, step, tid, sender, k0, k1)


@cuda.jit
def nested_encode(nb, g, delta, bucket, levels, rho, symbols, step, tid, sender, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        _nested_encode(b, g, delta, bucket, levels, rho, symbols, step, tid, sender, k0, k1)


@cuda.jit
def nested_decode(nb, symbols, delta, bucket, levels, rho, side, first, senders, factor, guard,
                  out, flags, step, tid, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        _nested_decode(b, symbols, delta, bucket, levels, rho, side, first, senders, factor, guard,
                       out, flags, step, tid, k0, k1)


@cuda.jit
def qsgd_encode(nb, g, norm, bucket, levels, codes, step, tid, sender, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        _qsgd_encode(b, g, norm, bucket, levels, codes, step, tid, sender, k0, k1)


@cuda.jit
def scale_decode(nb, codes, scale, bucket, levels, out):
    i = cuda.grid(1)
    if i < nb:
        _scale_decode(i, codes, scale, bucket, levels, out)


@cuda.jit
def onebit_column_means(nb, g, cols, pos_mean, neg_mean):
    c = cuda.grid(1)
    if c < nb:
        _onebit_column_means(c, g, cols, pos_mean, neg_mean)


@cuda.jit
def onebit_encode(nb, g, bits):
    i = cuda.grid(1)
    if i < nb:
        _onebit_encode(i, g, bits)


@cuda.jit
def onebit_decode(nb, bits, cols, pos_mean, neg_mean, out):
    i = cuda.grid(1)
    if i < nb:
        _onebit_decode(i, bits, cols, pos_mean, neg_mean, out)


@cuda.jit
def bitpack(nb, symbols, nbits, out):
    b = cuda.grid(1)
    if b < nb:
        _bitpack(b, symbols, nbits, out)


@cuda.jit
def bitunpack(nb, packed, nbits, out):
    b = cuda.grid(1)
    if b < nb:
        _bitunpack(b, packed, nbits, out)


@cuda.jit
def radixpack(nb, symbols, radix, per_byte, out):
    b = cuda.grid(1)
    if b < nb:
        _radixpack(b, symbols, radix, per_byte, out)


@cuda.jit
def radixunpack(nb, packed, radix, per_byte, out):
    b = cuda.grid(1)
    if b < nb:
        _radixunpack(b, packed, radix, per_byte, out)


@cuda.jit
def modadd_bits(nb, x, y, nbits, out):
    b = cuda.grid(1)
    if b < nb:
        _modadd_bits(b, x, y, nbits, out)


@cuda.jit
def modadd_radix(nb, x, y, radix, per_byte, out):
    b = cuda.grid(1)
    if b < nb:
        _modadd_radix(b, x, y, radix, per_byte, out)


@cuda.jit
def pack_sum_fields(nb, codes, offset, width, per_word, words):
    w = cuda.grid(1)
    if w < nb:
        _pack_sum_fields(w, codes, offset, width, per_word, words)


@cuda.jit
def unpack_sum_fields(nb, words, factor, width, per_word, offset, ksum):
    w = cuda.grid(1)
    if w < nb:
        _unpack_sum_fields(w, words, factor, width, per_word, offset, ksum)
