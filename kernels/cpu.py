"""CPU twins: the functions of :mod:`.arith` compiled with ``numba.njit`` and looped with ``prange``.

Range kernels (the Philox-driven codecs) take ``(nb, n, ...)`` and give each of the ``nb``
iterations a chunk of ``CHUNK`` elements of ``[0, n)`` with its own dither scratch buffer: inside a
chunk the Philox loop and the per-bucket loops vectorize. Index kernels take ``(nb, ...)`` and map
each index below ``nb`` (element, bucket, column, packed group).

Each kernel is compiled twice: ``parallel=True`` (this module's names) and as a serial twin
(``serial.<name>``: the same loop without ``parallel=True``, where ``prange`` is ``range``). Every
iteration writes its own outputs, so both give the same bits. :func:`launch` picks one per call
(:mod:`.threads`). Callers use :mod:`.ops`.
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import numpy as np
from numba import njit, prange
from numba.core.registry import CPUDispatcher

from . import arith, threads
from .jit import cached

CHUNK = 4096  # elements per prange iteration of a range kernel (a multiple of 4)

_f = arith.build(njit, njit(inline="always"))
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
philox4x32 = _f.philox4x32


# Numba's on-disk cache keys a kernel by a hash of the file that defines it (this one), not of
# arith.py where its arithmetic lives. Every kernel is compiled under a name carrying arith.py's
# content hash, so an edited arith.py never meets a stale cached kernel.
ARITH_STAMP = hashlib.sha1(Path(arith.__file__).read_bytes()).hexdigest()[:12]


_par = cached("_" + ARITH_STAMP, parallel=True)


@_par
def dither_fill(nb, n, out, step, tid, sender, ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(CHUNK, np.float32)
        _dither_fill(c * CHUNK, min(n, (c + 1) * CHUNK), u, out, step, tid, sender, ranks, k0, k1)


@_par
def dqsg_encode(nb, n, g, delta, bucket, levels, offset, codes, step, tid, sender, ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(CHUNK, np.float32)
        _dqsg_encode(c * CHUNK, min(n, (c + 1) * CHUNK), u, g, delta, bucket, levels, offset, codes, step, tid,
                        sender, ranks, k0, k1)


@_par
def dqsg_decode(nb, n, ksum, offset, delta, bucket, first, senders, factor, out, step, tid, ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(CHUNK, np.float32)
        _dqsg_decode(c * CHUNK, min(n, (c + 1) * CHUNK), u, ksum, offset, delta, bucket, first, senders, factor, out,
                        step, tid, ranks, k0, k1)


@_par
def dqsg_aggregate(nb, n, codes, offset, delta, bucket, factor, out, step, tid, ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(CHUNK, np.float32)
        _dqsg_aggregate(c * CHUNK, min(n, (c + 1) * CHUNK), u, codes, offset, delta, bucket, factor, out, step, tid,
                        ranks, k0, k1)


@_par
def dqsg_encode_packed(nb, n, span, g, delta, scaled, bucket, levels, radix, nbits, per_byte, packed, counts, step,
                       tid, sender, ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(span, np.float32)
        sym = np.empty(span, np.uint8)
        _dqsg_encode_packed(c * span, min(n, (c + 1) * span), u, sym, g, delta, scaled, bucket, levels, radix, nbits,
                            per_byte, packed, counts, c, step, tid, sender, ranks, k0, k1)


@_par
def dqsg_decode_packed(nb, n, span, packed, levels, radix, nbits, per_byte, delta, bucket, out, step, tid, sender,
                       ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(span, np.float32)
        sym = np.empty(span, np.uint8)
        _dqsg_decode_packed(c * span, min(n, (c + 1) * span), u, sym, packed, levels, radix, nbits, per_byte, delta,
                            bucket, out, step, tid, sender, ranks, k0, k1)


@_par
def dqsg_encode_fields(nb, n, span, g, delta, bucket, levels, radix, per_word, words, counts, step, tid, sender,
                       ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(span, np.float32)
        sym = np.empty(span, np.uint8)
        _dqsg_encode_fields(c * span, min(n, (c + 1) * span), u, sym, g, delta, bucket, levels, radix, per_word, words,
                            counts, c, step, tid, sender, ranks, k0, k1)


@_par
def dqsg_decode_fields(nb, n, span, words, factor, radix, inverses, per_word, offset, delta, bucket, first, senders,
                       out, step, tid, ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(span, np.float32)
        ksum = np.empty(span, np.int32)
        _dqsg_decode_fields(c * span, min(n, (c + 1) * span), u, ksum, words, factor, radix, inverses, per_word,
                            offset, delta, bucket, first, senders, out, step, tid, ranks, k0, k1)


@_par
def nested_encode(nb, n, g, delta, bucket, levels, rho, symbols, step, tid, sender, ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(CHUNK, np.float32)
        _nested_encode(c * CHUNK, min(n, (c + 1) * CHUNK), u, g, delta, bucket, levels, rho, symbols, step,
                          tid, sender, ranks, k0, k1)


@_par
def nested_decode(nb, n, symbols, delta, bucket, rho, side, first, senders, factor, out, kout, step, tid, ranks,
                  k0, k1):
    for c in prange(nb):
        u = np.empty(CHUNK, np.float32)
        _nested_decode(c * CHUNK, min(n, (c + 1) * CHUNK), u, symbols, delta, bucket, rho, side, first, senders,
                       factor, out, kout, step, tid, ranks, k0, k1)


@_par
def qsgd_encode(nb, n, g, norm, bucket, levels, codes, step, tid, sender, ranks, k0, k1):
    for c in prange(nb):
        u = np.empty(CHUNK, np.float32)
        _qsgd_encode(c * CHUNK, min(n, (c + 1) * CHUNK), u, g, norm, bucket, levels, codes, step, tid, sender,
                        ranks, k0, k1)


@_par
def bucket_absmax(nb, g, bucket, out):
    for b in prange(nb):
        _bucket_absmax(b, g, bucket, out)


@_par
def bucket_checksum(nb, k, bucket, out):
    for b in prange(nb):
        _bucket_checksum(b, k, bucket, out)


@_par
def bucket_l2(nb, g, bucket, out):
    for b in prange(nb):
        _bucket_l2(b, g, bucket, out)


@_par
def bucket_step(nb, absmax, levels, out):
    for b in prange(nb):
        _bucket_step(b, absmax, levels, out)


@_par
def scale_decode(nb, codes, scale, bucket, levels, out):
    for b in prange(nb):
        _scale_decode(b, codes, scale, bucket, levels, out)


@_par
def onebit_column_means(nb, g, cols, pos_mean, neg_mean):
    for b in prange(nb):
        _onebit_column_means(b, g, cols, pos_mean, neg_mean)


@_par
def onebit_encode(nb, g, bits):
    for b in prange(nb):
        _onebit_encode(b, g, bits)


@_par
def onebit_decode(nb, bits, cols, pos_mean, neg_mean, out):
    for b in prange(nb):
        _onebit_decode(b, bits, cols, pos_mean, neg_mean, out)


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
def pack_sum_fields(nb, codes, offset, radix, per_word, words):
    for b in prange(nb):
        _pack_sum_fields(b, codes, offset, radix, per_word, words)


@_par
def unpack_sum_fields(nb, words, factor, radix, inverses, per_word, offset, ksum):
    for b in prange(nb):
        _unpack_sum_fields(b, words, factor, radix, inverses, per_word, offset, ksum)


def _serial_twin(kernel: CPUDispatcher) -> CPUDispatcher:
    """``kernel``'s loop compiled without ``parallel=True`` (``prange`` runs as ``range`` on the calling
    thread). Its own name keeps its on-disk cache entry apart from the parallel kernel's."""
    return cached("_serial")(kernel.py_func)


KERNELS = tuple(name for name, v in list(globals().items())
                if isinstance(v, CPUDispatcher) and v.targetoptions.get("parallel"))
serial = types.SimpleNamespace(**{name: _serial_twin(globals()[name]) for name in KERNELS})


def launch(kernel: str, work: int, *args: object) -> None:
    """Run ``kernel(*args)`` on the threads :func:`.threads.plan` gives a call of ``work`` cost
    units: the serial twin on one, the parallel kernel on more."""
    n = threads.plan(work)
    if n > 1:
        with threads.using(n) as used:
            if used > 1:
                globals()[kernel](*args)
                return
    getattr(serial, kernel)(*args)
