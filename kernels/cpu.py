"""CPU twins of the quantization kernels (Numba ``njit(parallel=True)``).

The scalar arithmetic comes from :mod:`hvdquant.kernels.arith`, compiled here with ``numba.njit``;
these functions only lay it over arrays. Inputs are contiguous 1-D NumPy arrays (torch CPU tensors
pass through ``tensor.numpy()`` without a copy); outputs are written into arrays the caller owns.
Public wrappers validate arguments and convert :class:`~hvdquant.kernels.key.DitherKey` into the
uint64 words the kernels take.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import arith
from .key import MAX_ELEMENTS, DitherKey

_ops = arith.build(njit)
_philox = _ops.philox4x32
_dither_block = _ops.dither_block
_dither_code = _ops.dither_code


# ----------------------------------------------------------------------------- njit kernels
@njit(parallel=True, cache=True)
def _dither_fill(out, step, tid, sender, key0, key1):
    n = out.shape[0]
    for blk in prange((n + 3) // 4):
        u0, u1, u2, u3 = _dither_block(np.uint64(blk), step, tid, sender, key0, key1)
        i = 4 * blk
        out[i] = u0
        if i + 1 < n:
            out[i + 1] = u1
        if i + 2 < n:
            out[i + 2] = u2
        if i + 3 < n:
            out[i + 3] = u3


@njit(parallel=True, cache=True)
def _bucket_absmax(g, bucket, out):
    nb = out.shape[0]
    n = g.shape[0]
    for b in prange(nb):
        m = np.float32(0.0)
        for i in range(b * bucket, min(n, (b + 1) * bucket)):
            a = abs(g[i])
            if a != a:  # NaN: report it as +inf so that a max-reduction cannot drop it
                a = np.float32(np.inf)
            if a > m:
                m = a
        out[b] = m


@njit(parallel=True, cache=True)
def _dqsg_encode(g, delta, bucket, levels, codes, step, tid, sender, key0, key1):
    n = g.shape[0]
    for blk in prange((n + 3) // 4):
        u0, u1, u2, u3 = _dither_block(np.uint64(blk), step, tid, sender, key0, key1)
        i = 4 * blk
        codes[i] = _dither_code(g[i], delta[i // bucket], u0, levels)
        if i + 1 < n:
            codes[i + 1] = _dither_code(g[i + 1], delta[(i + 1) // bucket], u1, levels)
        if i + 2 < n:
            codes[i + 2] = _dither_code(g[i + 2], delta[(i + 2) // bucket], u2, levels)
        if i + 3 < n:
            codes[i + 3] = _dither_code(g[i + 3], delta[(i + 3) // bucket], u3, levels)


@njit(parallel=True, cache=True)
def _dqsg_decode_sum(ksum, delta, bucket, first, senders, factor, out, step, tid, key0, key1):
    """out[i] = factor * delta_b * (ksum[i] - sum_p u_p[i]), p = first .. first+senders-1 in order."""
    n = ksum.shape[0]
    for blk in prange((n + 3) // 4):
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for p in range(first, first + senders):
            u0, u1, u2, u3 = _dither_block(np.uint64(blk), step, tid, np.uint64(p), key0, key1)
            s0 += u0
            s1 += u1
            s2 += u2
            s3 += u3
        i = 4 * blk
        out[i] = factor * (delta[i // bucket] * (np.float32(ksum[i]) - s0))
        if i + 1 < n:
            out[i + 1] = factor * (delta[(i + 1) // bucket] * (np.float32(ksum[i + 1]) - s1))
        if i + 2 < n:
            out[i + 2] = factor * (delta[(i + 2) // bucket] * (np.float32(ksum[i + 2]) - s2))
        if i + 3 < n:
            out[i + 3] = factor * (delta[(i + 3) // bucket] * (np.float32(ksum[i + 3]) - s3))


@njit(parallel=True, cache=True)
def _pack_sum_fields(codes, offset, width, per_word, words):
    n = codes.shape[0]
    for w in prange(words.shape[0]):
        acc = np.int64(0)
        for j in range(per_word):
            i = w * per_word + j
            if i < n:
                acc |= np.int64(codes[i] + offset) << np.int64(width * j)
        words[w] = np.float64(acc)


@njit(parallel=True, cache=True)
def _unpack_sum_fields(words, factor, width, per_word, offset, ksum):
    n = ksum.shape[0]
    mask = (np.int64(1) << np.int64(width)) - np.int64(1)
    for w in prange(words.shape[0]):
        total = np.int64(np.rint(words[w] / factor))
        for j in range(per_word):
            i = w * per_word + j
            if i < n:
                ksum[i] = np.int32(((total >> np.int64(width * j)) & mask) - offset)


# ----------------------------------------------------------------------------- wrappers
def _vector(name: str, a: np.ndarray, dtype: type) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != 1 or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous 1-D array (got shape {a.shape})")
    if a.shape[0] > MAX_ELEMENTS:
        raise ValueError(f"{name} has {a.shape[0]} elements, more than the dither counter's {MAX_ELEMENTS}")
    return a


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def num_buckets(n: int, bucket: int) -> int:
    return (n + bucket - 1) // bucket


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox-4x32-10 of one 128-bit counter under a 64-bit key (for tests and tools)."""
    words = [np.uint64(c & 0xFFFFFFFF) for c in (*counter, *key)]
    return tuple(int(x) for x in _philox(*words))


def dither(n: int, key: DitherKey, out: np.ndarray | None = None) -> np.ndarray:
    """The n dithers u in (-1/2, 1/2) of stream ``key`` (float32)."""
    out = np.empty(n, np.float32) if out is None else _vector("out", out, np.float32)
    step, tid, sender, k0, k1 = key.words()
    _dither_fill(out, step, tid, sender, k0, k1)
    return out


def bucket_absmax(g: np.ndarray, bucket: int, out: np.ndarray | None = None) -> np.ndarray:
    """max_i |g_i| over each run of ``bucket`` coordinates (the last may be shorter); NaN -> +inf."""
    _vector("g", g, np.float32)
    bucket = _positive("bucket", bucket)
    nb = num_buckets(g.shape[0], bucket)
    out = np.empty(nb, np.float32) if out is None else _vector("out", out, np.float32)
    if out.shape[0] != nb:
        raise ValueError(f"out has {out.shape[0]} entries, expected {nb} buckets")
    _bucket_absmax(g, bucket, out)
    return out


def dqsg_encode(g: np.ndarray, delta: np.ndarray, bucket: int, levels: int, key: DitherKey,
                out: np.ndarray | None = None) -> np.ndarray:
    """Dithered indices k_i = round(g_i/Δ_b + u_i) in [-levels, levels] (int8), ALGORITHMS.md §1."""
    _vector("g", g, np.float32)
    _vector("delta", delta, np.float32)
    bucket = _positive("bucket", bucket)
    levels = _positive("levels", levels)
    if levels > 127:
        raise ValueError(f"levels={levels} does not fit the int8 code (at most 127)")
    if delta.shape[0] != num_buckets(g.shape[0], bucket):
        raise ValueError(f"delta has {delta.shape[0]} entries, expected {num_buckets(g.shape[0], bucket)}")
    out = np.empty(g.shape[0], np.int8) if out is None else _vector("out", out, np.int8)
    step, tid, sender, k0, k1 = key.words()
    _dqsg_encode(g, delta, bucket, np.int32(levels), out, step, tid, sender, k0, k1)
    return out


def dqsg_decode_sum(ksum: np.ndarray, delta: np.ndarray, bucket: int, senders: int, key: DitherKey,
                    factor: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """factor * Δ_b * (Σ_p k_p − Σ_p u_p) over senders p = key.sender .. key.sender + senders − 1.

    With one sender this is the plain DQSG decoder Δ(k − u) of that sender; with key.sender = 0 and
    P senders sharing one Δ per bucket it is the exact sum of all P reconstructions (ALGORITHMS.md §3).
    The dithers are summed in sender order, so every rank computes the same float32 result.
    """
    _vector("ksum", ksum, np.int32)
    _vector("delta", delta, np.float32)
    bucket = _positive("bucket", bucket)
    senders = _positive("senders", senders)
    out = np.empty(ksum.shape[0], np.float32) if out is None else _vector("out", out, np.float32)
    step, tid, first, k0, k1 = key.words()
    _dqsg_decode_sum(ksum, delta, bucket, first, np.uint64(senders), np.float32(factor), out, step, tid, k0, k1)
    return out


def pack_sum_fields(codes: np.ndarray, offset: int, width: int, per_word: int,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Pack (code + offset) into ``per_word`` fields of ``width`` bits per float64 word.

    Field j of word w holds element w*per_word + j at bit 0 of 2^(width*j). Words hold integers
    below 2^(width*per_word) <= 2^50, exact in float64, so a SUM allreduce adds every field
    independently as long as each field's sum stays below 2^width.
    """
    _vector("codes", codes, np.int8)
    if width * per_word > 50:
        raise ValueError(f"width*per_word = {width * per_word} > 50 bits: float64 sums would not stay exact")
    nw = num_buckets(codes.shape[0], per_word)
    out = np.empty(nw, np.float64) if out is None else _vector("out", out, np.float64)
    _pack_sum_fields(codes, np.int32(offset), np.int64(width), np.int64(per_word), out)
    return out


def unpack_sum_fields(words: np.ndarray, n: int, offset: int, width: int, per_word: int,
                      factor: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`pack_sum_fields` after a reduction that returned ``factor`` × the sum.

    Each word is divided by ``factor`` and rounded to the nearest integer (exact while the sum is
    below 2^50), then split into fields; ``offset`` is subtracted from each (int32 result).
    """
    _vector("words", words, np.float64)
    out = np.empty(n, np.int32) if out is None else _vector("out", out, np.int32)
    _unpack_sum_fields(words, np.float64(factor), np.int64(width), np.int64(per_word), np.int64(offset), out)
    return out


__all__ = [
    "bucket_absmax",
    "dither",
    "dqsg_decode_sum",
    "dqsg_encode",
    "num_buckets",
    "pack_sum_fields",
    "philox4x32",
    "unpack_sum_fields",
]
