"""CUDA kernels: the functions of :mod:`.arith` compiled with ``numba.cuda.jit(device=True)``.

Same arguments as the CPU twins in :mod:`.cpu`, same arithmetic, same bits. Range kernels give
each thread 4 elements (one Philox block) with a 4-float local scratch buffer; index kernels give
each thread one index. :mod:`.ops` launches them on torch's current CUDA stream.

Imported lazily: only when a CUDA tensor (or ``ops.force_target("cuda")``) asks for it. With
``NUMBA_ENABLE_CUDASIM=1`` these kernels run in Numba's CUDA simulator on the CPU.
"""

from __future__ import annotations

from numba import cuda, float32, int32, uint8

from . import arith
from .arith import GPU_FIELD_SCRATCH, GPU_SPAN


@cuda.jit(device=True)
def _tally_atomic(counts, row, symbol, amount):
    cuda.atomic.add(counts, (row, symbol), amount)


_f = arith.build(cuda.jit(device=True), tally=_tally_atomic)
_bitpack = _f.bitpack
_bitunpack = _f.bitunpack
_bucket_absmax = _f.bucket_absmax
_bucket_checksum = _f.bucket_checksum
_bucket_l2 = _f.bucket_l2
_bucket_step = _f.bucket_step
_dither_fill = _f.dither_fill
_dqsg_aggregate = _f.dqsg_aggregate
_dqsg_decode = _f.dqsg_decode
_dqsg_decode_fields = _f.dqsg_decode_fields
_dqsg_decode_packed = _f.dqsg_decode_packed
_dqsg_encode = _f.dqsg_encode
_dqsg_encode_fields = _f.dqsg_encode_fields
_dqsg_encode_packed = _f.dqsg_encode_packed
_modadd_bits = _f.modadd_bits
_modadd_radix = _f.modadd_radix
_nested_decode = _f.nested_decode
_nested_encode = _f.nested_encode
_onebit_column_means = _f.onebit_column_means
_onebit_decode = _f.onebit_decode
_onebit_encode = _f.onebit_encode
_pack_sum_fields = _f.pack_sum_fields
_qsgd_encode = _f.qsgd_encode
_radixpack = _f.radixpack
_radixunpack = _f.radixunpack
_scale_decode = _f.scale_decode
_unpack_sum_fields = _f.unpack_sum_fields


@cuda.jit
def dither_fill(nb, n, out, step, tid, sender, ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(4, float32)
        _dither_fill(4 * b, min(n, 4 * b + 4), u, out, step, tid, sender, ranks, k0, k1)


@cuda.jit
def dqsg_encode(nb, n, g, delta, bucket, levels, offset, codes, step, tid, sender, ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(4, float32)
        _dqsg_encode(4 * b, min(n, 4 * b + 4), u, g, delta, bucket, levels, offset, codes, step, tid, sender, ranks,
                     k0, k1)


@cuda.jit
def dqsg_decode(nb, n, ksum, offset, delta, bucket, first, senders, factor, out, step, tid, ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(4, float32)
        _dqsg_decode(4 * b, min(n, 4 * b + 4), u, ksum, offset, delta, bucket, first, senders, factor, out, step, tid,
                        ranks, k0, k1)


@cuda.jit
def dqsg_aggregate(nb, n, codes, offset, delta, bucket, factor, out, step, tid, ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(4, float32)
        _dqsg_aggregate(4 * b, min(n, 4 * b + 4), u, codes, offset, delta, bucket, factor, out, step, tid, ranks,
                        k0, k1)


@cuda.jit
def dqsg_encode_packed(nb, n, span, g, delta, scaled, bucket, levels, radix, nbits, per_byte, packed, counts, step,
                       tid, sender, ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(GPU_SPAN, float32)
        sym = cuda.local.array(GPU_SPAN, uint8)
        _dqsg_encode_packed(span * b, min(n, span * b + span), u, sym, g, delta, scaled, bucket, levels, radix, nbits,
                            per_byte, packed, counts, b, step, tid, sender, ranks, k0, k1)


@cuda.jit
def dqsg_decode_packed(nb, n, span, packed, levels, radix, nbits, per_byte, delta, bucket, out, step, tid, sender,
                       ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(GPU_SPAN, float32)
        sym = cuda.local.array(GPU_SPAN, uint8)
        _dqsg_decode_packed(span * b, min(n, span * b + span), u, sym, packed, levels, radix, nbits, per_byte, delta,
                            bucket, out, step, tid, sender, ranks, k0, k1)


@cuda.jit
def dqsg_encode_fields(nb, n, span, g, delta, bucket, levels, radix, per_word, words, counts, step, tid, sender,
                       ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(GPU_FIELD_SCRATCH, float32)
        sym = cuda.local.array(GPU_FIELD_SCRATCH, uint8)
        _dqsg_encode_fields(span * b, min(n, span * b + span), u, sym, g, delta, bucket, levels, radix, per_word,
                            words, counts, b, step, tid, sender, ranks, k0, k1)


@cuda.jit
def dqsg_decode_fields(nb, n, span, words, factor, radix, inverses, per_word, offset, delta, bucket, first, senders,
                       out, step, tid, ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(GPU_FIELD_SCRATCH, float32)
        ksum = cuda.local.array(GPU_FIELD_SCRATCH, int32)
        _dqsg_decode_fields(span * b, min(n, span * b + span), u, ksum, words, factor, radix, inverses, per_word,
                            offset, delta, bucket, first, senders, out, step, tid, ranks, k0, k1)


@cuda.jit
def nested_encode(nb, n, g, delta, bucket, levels, rho, symbols, step, tid, sender, ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(4, float32)
        _nested_encode(4 * b, min(n, 4 * b + 4), u, g, delta, bucket, levels, rho, symbols, step, tid, sender,
                          ranks, k0, k1)


@cuda.jit
def nested_decode(nb, n, symbols, delta, bucket, rho, side, first, senders, factor, out, kout, step, tid, ranks,
                  k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(4, float32)
        _nested_decode(4 * b, min(n, 4 * b + 4), u, symbols, delta, bucket, rho, side, first, senders, factor, out,
                       kout, step, tid, ranks, k0, k1)


@cuda.jit
def qsgd_encode(nb, n, g, norm, bucket, levels, codes, step, tid, sender, ranks, k0, k1):
    b = cuda.grid(1)
    if b < nb:
        u = cuda.local.array(4, float32)
        _qsgd_encode(4 * b, min(n, 4 * b + 4), u, g, norm, bucket, levels, codes, step, tid, sender, ranks, k0, k1)


@cuda.jit
def bucket_absmax(nb, g, bucket, out):
    b = cuda.grid(1)
    if b < nb:
        _bucket_absmax(b, g, bucket, out)


@cuda.jit
def bucket_checksum(nb, k, bucket, out):
    b = cuda.grid(1)
    if b < nb:
        _bucket_checksum(b, k, bucket, out)


@cuda.jit
def bucket_l2(nb, g, bucket, out):
    b = cuda.grid(1)
    if b < nb:
        _bucket_l2(b, g, bucket, out)


@cuda.jit
def bucket_step(nb, absmax, levels, out):
    b = cuda.grid(1)
    if b < nb:
        _bucket_step(b, absmax, levels, out)


@cuda.jit
def scale_decode(nb, codes, scale, bucket, levels, out):
    b = cuda.grid(1)
    if b < nb:
        _scale_decode(b, codes, scale, bucket, levels, out)


@cuda.jit
def onebit_column_means(nb, g, cols, pos_mean, neg_mean):
    b = cuda.grid(1)
    if b < nb:
        _onebit_column_means(b, g, cols, pos_mean, neg_mean)


@cuda.jit
def onebit_encode(nb, g, bits):
    b = cuda.grid(1)
    if b < nb:
        _onebit_encode(b, g, bits)


@cuda.jit
def onebit_decode(nb, bits, cols, pos_mean, neg_mean, out):
    b = cuda.grid(1)
    if b < nb:
        _onebit_decode(b, bits, cols, pos_mean, neg_mean, out)


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
def pack_sum_fields(nb, codes, offset, radix, per_word, words):
    b = cuda.grid(1)
    if b < nb:
        _pack_sum_fields(b, codes, offset, radix, per_word, words)


@cuda.jit
def unpack_sum_fields(nb, words, factor, radix, inverses, per_word, offset, ksum):
    b = cuda.grid(1)
    if b < nb:
        _unpack_sum_fields(b, words, factor, radix, inverses, per_word, offset, ksum)
