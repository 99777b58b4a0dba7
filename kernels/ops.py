"""The kernels' public API over torch tensors, on either device.

Every function takes and returns 1-D contiguous torch tensors and runs where its inputs live:
CPU tensors go to the CPU twins (:mod:`.cpu`) through zero-copy NumPy views, serially or on a few
threads as :mod:`.threads` decides per call (same bits either way); CUDA tensors go to the CUDA
kernels (:mod:`.cuda`) through ``__cuda_array_interface__``, launched on torch's current CUDA stream
(Horovod records its ready event on that stream, so a payload is never sent before it is written).
Arguments are checked here, with errors that name the argument.

``force_target("cuda")`` runs the CUDA kernels on CPU tensors: under ``NUMBA_ENABLE_CUDASIM=1``
that is Numba's CUDA simulator, which is how the CUDA kernels are tested against their CPU twins
on machines without a GPU.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from . import cpu, threads
from .key import MAX_ELEMENTS, DitherKey

THREADS_PER_BLOCK = 256
_forced: str | None = None
#: kernel launches per target ("cpu", "cuda") in this process: where the arithmetic really ran
launches: Counter[str] = Counter()


@contextmanager
def force_target(target: str | None) -> Iterator[None]:
    """Run kernels on ``target`` ("cpu" or "cuda") regardless of where the tensors live."""
    global _forced
    if target not in (None, "cpu", "cuda"):
        raise ValueError(f"target must be 'cpu', 'cuda' or None, got {target!r}")
    old, _forced = _forced, target
    try:
        yield
    finally:
        _forced = old


def _target(kernel: str, *args: object) -> str:
    """Where ``kernel`` runs on these arguments: "cuda" if its tensors are on a GPU, else "cpu";
    :func:`force_target` overrides. Its tensors must all be on one device (any mixture raises)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{kernel}: all tensors must be on the same device, got {sorted(map(str, devices))}")
    return _forced or ("cuda" if any(t.is_cuda for t in tensors) else "cpu")


def _launch(kernel: str, count: int, *args: object, ranged: bool = False, span: int | None = None) -> None:
    """Run ``kernel`` over ``count`` indices, or over ``count`` elements for a range kernel
    (``ranged=True``: the CPU takes chunks of ``cpu.CHUNK`` elements, each GPU thread takes 4;
    ``span=m``: ranges of m elements on either device, passed to the kernel after ``count``)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    on_gpu = any(t.is_cuda for t in tensors)
    target = _target(kernel, *tensors)
    if count == 0:
        return
    launches[target] += 1
    nblocks = count
    if span is not None:
        nblocks = (count + span - 1) // span
        args = (count, span, *args)
        ranged = True
    elif ranged:
        per = cpu.CHUNK if target == "cpu" else 4
        nblocks = (count + per - 1) // per
        args = (count, *args)
    conv: list[object] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_cuda:
                from numba import cuda as nb_cuda

                conv.append(nb_cuda.as_cuda_array(a))
            else:
                conv.append(a.numpy())
        elif isinstance(a, np.generic):  # typed NumPy scalars pass as they are (np.float64 is a float)
            conv.append(a)
        elif isinstance(a, bool):
            raise TypeError(f"{kernel}: unexpected bool argument")
        elif isinstance(a, int):
            conv.append(np.int64(a))
        elif isinstance(a, float):
            conv.append(np.float32(a))
        else:
            conv.append(a)
    if target == "cpu":
        if on_gpu:
            raise ValueError(f"{kernel}: CUDA tensors cannot run on the CPU target")
        # Cost units for kernels/threads.py, which picks the serial twin or the parallel kernel.
        work = count * threads.RANGE_COST if ranged else max(count, max((t.numel() for t in tensors), default=0))
        cpu.launch(kernel, work, np.int64(nblocks), *conv)
        return
    from numba import cuda as nb_cuda

    from . import cuda as ck

    stream = nb_cuda.external_stream(torch.cuda.current_stream().cuda_stream) if on_gpu else 0
    grid = (nblocks + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    getattr(ck, kernel)[grid, THREADS_PER_BLOCK, stream](np.int64(nblocks), *conv)


# ----------------------------------------------------------------------------- checks
def _vec(name: str, t: object, dtype: torch.dtype, n: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n}")
    if t.numel() > MAX_ELEMENTS:
        raise ValueError(f"{name} has {t.numel()} elements, more than the dither counter's {MAX_ELEMENTS}")
    return t


def _int(name: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= int(v) <= hi:
        raise ValueError(f"{name}={v} is out of range [{lo}, {hi}]")
    return int(v)


def _out(out: torch.Tensor | None, name: str, n: int, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=dtype, device=like.device)
    return _vec(name, out, dtype, n)


def _check_senders(key: DitherKey, senders: int) -> None:
    if key.ranks and key.sender + senders > key.ranks:
        raise ValueError(f"senders {key.sender} .. {key.sender + senders - 1} are not all among the "
                         f"{key.ranks} ranks of the stratified dither")


def num_buckets(n: int, bucket: int) -> int:
    return (n + bucket - 1) // bucket


def _scales(name: str, t: torch.Tensor, n: int, bucket: int) -> torch.Tensor:
    return _vec(name, t, torch.float32, num_buckets(n, bucket))


# ----------------------------------------------------------------------------- dithers, scales
def dither(n: int, key: DitherKey, device: str | torch.device = "cpu") -> torch.Tensor:
    """The n dithers u ∈ (−½, ½) of stream ``key`` (float32): element i is lane i % 4 of
    Philox-4x32-10(counter = (i // 4, step, tensor id, sender), key = seed)."""
    out = torch.empty(_int("n", n, 0, MAX_ELEMENTS), dtype=torch.float32, device=device)
    _launch("dither_fill", n, out, *key.words(), ranged=True)
    return out


def bucket_absmax(g: torch.Tensor, bucket: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """max |g_i| per bucket of ``bucket`` coordinates (last may be shorter); NaN → +inf."""
    _vec("g", g, torch.float32)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    nb = num_buckets(g.numel(), bucket)
    out = _out(out, "out", nb, torch.float32, g)
    _launch("bucket_absmax", nb, g, bucket, out)
    return out


def bucket_step(absmax: torch.Tensor, levels: int) -> torch.Tensor:
    """Δ_b = absmax_b / s per bucket (float32), one correctly rounded division on either device:
    the step decides the codes, so it is computed by the kernels, not by the framework (whose
    division by a scalar may multiply by the reciprocal on a GPU)."""
    _vec("absmax", absmax, torch.float32)
    levels = _int("levels", levels, 1, 1 << 24)
    out = torch.empty_like(absmax)
    _launch("bucket_step", absmax.numel(), absmax, levels, out)
    return out


def bucket_checksum(k: torch.Tensor, bucket: int) -> torch.Tensor:
    """Σ_j w_j·k_j mod 2^32 per bucket (int64 holding the uint32; w_j an odd 32-bit hash of the
    position j inside the bucket): linear in the integer indices k (int8 or int32), so it detects
    a nested decode that is off by a multiple of ρ."""
    if not isinstance(k, torch.Tensor) or k.dtype not in (torch.int8, torch.int32):
        raise TypeError(f"k must be an int8 or int32 tensor, got {getattr(k, 'dtype', type(k).__name__)}")
    _vec("k", k, k.dtype)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    nb = num_buckets(k.numel(), bucket)
    out = torch.empty(nb, dtype=torch.int64, device=k.device)
    _launch("bucket_checksum", nb, k, bucket, out)
    return out


def bucket_l2(g: torch.Tensor, bucket: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """‖g_b‖₂ per bucket (float64 accumulation in index order; NaN propagates)."""
    _vec("g", g, torch.float32)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    nb = num_buckets(g.numel(), bucket)
    out = _out(out, "out", nb, torch.float32, g)
    _launch("bucket_l2", nb, g, bucket, out)
    return out


# ----------------------------------------------------------------------------- DQSG
def dqsg_encode(g: torch.Tensor, delta: torch.Tensor, bucket: int, levels: int, key: DitherKey,
                out: torch.Tensor | None = None, symbols: bool = False) -> torch.Tensor:
    """k_i = round(g_i/Δ_b + u_i) ∈ [−s, s] (int8); Δ_b = 0 gives k = 0 (docs/ALGORITHMS.md §1).

    ``symbols=True`` returns k + s as uint8 in [0, 2s] instead, ready for :func:`bitpack` or
    :func:`radixpack` (one pass, no separate offset step).
    """
    _vec("g", g, torch.float32)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    _scales("delta", delta, g.numel(), bucket)
    levels = _int("levels", levels, 1, 127)
    out = _out(out, "out", g.numel(), torch.uint8 if symbols else torch.int8, g)
    _launch("dqsg_encode", g.numel(), g, delta, bucket, levels, levels if symbols else 0, out, *key.words(),
            ranged=True)
    return out


def dqsg_decode(ksum: torch.Tensor, delta: torch.Tensor, bucket: int, key: DitherKey, senders: int = 1,
                factor: float = 1.0, out: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """factor · Δ_b · (Σ_p k_p − Σ_p u_p) over senders key.sender … key.sender+senders−1 (float32).

    One sender: Δ(k − u). key.sender = 0 and P senders with a common Δ: the sum of all P
    reconstructions (docs/ALGORITHMS.md §3); dithers are summed in sender order on every device.
    ``ksum`` is int32 indices, or uint8 symbols k + ``offset`` (a payload's unpacked symbols, no
    conversion pass).
    """
    if not isinstance(ksum, torch.Tensor) or ksum.dtype not in (torch.int32, torch.uint8):
        raise TypeError(f"ksum must be an int32 or uint8 tensor, got {getattr(ksum, 'dtype', type(ksum).__name__)}")
    _vec("ksum", ksum, ksum.dtype)
    offset = _int("offset", offset, 0, 255)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    _scales("delta", delta, ksum.numel(), bucket)
    senders = _int("senders", senders, 1, 1 << 24)
    out = _out(out, "out", ksum.numel(), torch.float32, ksum)
    _check_senders(key, senders)
    step, tid, first, ranks, k0, k1 = key.words()
    _launch("dqsg_decode", ksum.numel(), ksum, offset, delta, bucket, int(first), senders, float(factor),
            out, step, tid, ranks, k0, k1, ranged=True)
    return out


def dqsg_aggregate(codes: torch.Tensor, delta: torch.Tensor, bucket: int, key: DitherKey, factor: float = 1.0,
                   out: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """factor · Σ_p Δ_{p,b}(k_{p,i} − u_p[i]) over the P = codes.shape[0] senders of own-scale DQSG
    payloads (codes: P × n, int8 indices or uint8 symbols k + ``offset`` as :func:`dqsg_decode`
    takes them; delta: P × buckets float32), under the stratified dither among key.ranks = P ranks:
    the shared dither words are generated once per coordinate."""
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int8, torch.uint8) or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D int8 or uint8 tensor (senders × n), got "
                        f"{getattr(codes, 'dtype', codes)}")
    offset = _int("offset", offset, 0, 255)
    ranks, n = codes.shape
    bucket = _int("bucket", bucket, 1, 1 << 31)
    if not isinstance(delta, torch.Tensor) or delta.dtype != torch.float32 or \
            tuple(delta.shape) != (ranks, num_buckets(n, bucket)):
        raise ValueError(f"delta must be float32 of shape {(ranks, num_buckets(n, bucket))}, got "
                         f"{getattr(delta, 'dtype', None)} {tuple(getattr(delta, 'shape', ()))}")
    if key.ranks != ranks or key.sender != 0:
        raise ValueError(f"dqsg_aggregate needs the stratified key of sender 0 among the {ranks} senders, got {key}")
    if n > MAX_ELEMENTS:
        raise ValueError(f"codes has {n} columns, more than the dither counter's {MAX_ELEMENTS}")
    out = _out(out, "out", n, torch.float32, codes)
    step, tid, _, ranks_word, k0, k1 = key.words()
    _launch("dqsg_aggregate", n, codes.contiguous(), offset, delta.contiguous(), bucket, float(factor), out, step,
            tid, ranks_word, k0, k1, ranged=True)
    return out


# ----------------------------------------------------------------------------- DQSG payloads, fused
MAX_SCALED_SPAN = 1 << 16  # the CPU computes scales inside the fused pass when whole buckets fit a range this long


def _packing(alphabet: int) -> tuple[int, int, int, int]:
    """(radix, nbits, per_byte, group) of :func:`symbol_packing`'s choice for the fused kernels:
    radix > 0 for radix packing, else nbits; group = symbols per packing unit."""
    kind, v = symbol_packing(alphabet)
    return (alphabet, 0, v, v) if kind == "radix" else (0, v, 8, 8)


def _span(target: str, group: int, bucket: int | None = None) -> tuple[int, bool]:
    """Range length of a fused pass and whether a range holds whole buckets of ``bucket`` (then the
    encoder computes their scales itself; CPU only). Ranges start at multiples of 4 (a Philox
    block) and of ``group`` (the symbols of a packing unit, or the fields of a summable word)."""
    unit = math.lcm(4, group)
    if target == "cuda":  # short ranges: neighbouring threads read neighbouring memory
        return unit, False
    if bucket is not None and math.lcm(bucket, unit) <= MAX_SCALED_SPAN:
        whole = math.lcm(bucket, unit)
        return whole * max(1, cpu.CHUNK // whole), True
    return unit * max(1, cpu.CHUNK // unit), False


def _histogram(n: int, span: int, alphabet: int, like: torch.Tensor) -> torch.Tensor:
    """Zeroed symbol counts for a fused encoder: one row per range on the CPU (a range owns its row),
    at most 1024 rows on the GPU (threads share rows through atomic adds); summed by the caller."""
    rows = max(1, min((n + span - 1) // span, 1024 if like.is_cuda else 1 << 62))
    return torch.zeros((rows, alphabet), dtype=torch.int64, device=like.device)


def dqsg_encode_packed(g: torch.Tensor, bucket: int, levels: int, key: DitherKey
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An own-scale DQSG payload in one pass over g: (Δ, packed symbols, histogram).

    Δ_b = max|g|/s per bucket (float32; NaN → +inf: check before sending), the symbols k + s of
    :func:`dqsg_encode` packed as :func:`pack_symbols` packs them, and the count of each symbol
    value (int64, 2s + 1 entries) for the entropy statistic. Bit-identical to those functions run
    one after the other; no n-byte symbol array is written or read back. On the GPU the scales are
    a separate pass (a thread's range does not hold whole buckets)."""
    _vec("g", g, torch.float32)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    levels = _int("levels", levels, 1, 127)
    alphabet = 2 * levels + 1
    radix, nbits, per_byte, group = _packing(alphabet)
    n = g.numel()
    span, scaled = _span(_target("dqsg_encode_packed", g), group, bucket)
    delta = torch.empty(num_buckets(n, bucket), dtype=torch.float32, device=g.device)
    if not scaled:
        bucket_absmax(g, bucket, out=delta).div_(float(levels))
    packed = torch.empty(symbol_bytes(n, alphabet), dtype=torch.uint8, device=g.device)
    counts = _histogram(n, span, alphabet, g)
    _launch("dqsg_encode_packed", n, g, delta, int(scaled), bucket, levels, radix, nbits, per_byte, packed, counts,
            *key.words(), span=span)
    return delta, packed, counts.sum(0)


def dqsg_decode_packed(packed: torch.Tensor, delta: torch.Tensor, bucket: int, levels: int, key: DitherKey, n: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`dqsg_encode_packed`: Δ_b(k_i − u_i) (float32) from the packed symbols in one
    pass, equal to :func:`unpack_symbols` then :func:`dqsg_decode` with offset s."""
    _vec("packed", packed, torch.uint8)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    levels = _int("levels", levels, 1, 127)
    n = _int("n", n, 0, MAX_ELEMENTS)
    alphabet = 2 * levels + 1
    if packed.numel() != symbol_bytes(n, alphabet):
        raise ValueError(f"packed has {packed.numel()} bytes, {n} symbols of {alphabet} values need "
                         f"{symbol_bytes(n, alphabet)}")
    _scales("delta", delta, n, bucket)
    radix, nbits, per_byte, group = _packing(alphabet)
    span, _ = _span(_target("dqsg_decode_packed", packed, delta), group)
    out = _out(out, "out", n, torch.float32, packed)
    _launch("dqsg_decode_packed", n, packed, levels, radix, nbits, per_byte, delta, bucket, out, *key.words(),
            span=span)
    return out


# ----------------------------------------------------------------------------- NDQSG
def nested_encode(g: torch.Tensor, delta: torch.Tensor, bucket: int, levels: int, nesting_ratio: int,
                  key: DitherKey, out: torch.Tensor | None = None) -> torch.Tensor:
    """Coset symbols (k + ⌊ρ/2⌋) mod ρ ∈ [0, ρ) of the DQSG(s₁) indices k (uint8; docs/ALGORITHMS.md §2)."""
    _vec("g", g, torch.float32)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    _scales("delta", delta, g.numel(), bucket)
    levels = _int("levels", levels, 1, 127)
    rho = _int("nesting_ratio", nesting_ratio, 2, 255)
    out = _out(out, "out", g.numel(), torch.uint8, g)
    _launch("nested_encode", g.numel(), g, delta, bucket, levels, rho, out, *key.words(), ranged=True)
    return out


def nested_decode(symbols: torch.Tensor, delta: torch.Tensor, bucket: int, nesting_ratio: int, side: torch.Tensor,
                  key: DitherKey, senders: int = 1, factor: float = 1.0, out: torch.Tensor | None = None,
                  kout: torch.Tensor | None = None) -> torch.Tensor:
    """Decode coset symbols (or their mod-ρ sum over ``senders`` senders) with side information.

    ``side`` estimates the senders' summed gradient, in gradient units. Returns factor·Σ_p ĝ_p
    (float32), exact whenever |K − (side/Δ + Σu)| < ρ/2. The resolved index sums K̂ (int32) are
    written to ``kout`` when given (for :func:`bucket_checksum`, which detects a wrong K̂).
    """
    _vec("symbols", symbols, torch.uint8)
    n = symbols.numel()
    bucket = _int("bucket", bucket, 1, 1 << 31)
    _scales("delta", delta, n, bucket)
    rho = _int("nesting_ratio", nesting_ratio, 2, 255)
    _vec("side", side, torch.float32, n)
    senders = _int("senders", senders, 1, 1 << 24)
    out = _out(out, "out", n, torch.float32, symbols)
    kout = _out(kout, "kout", n, torch.int32, symbols)
    _check_senders(key, senders)
    step, tid, first, ranks, k0, k1 = key.words()
    _launch("nested_decode", n, symbols, delta, bucket, rho, side, int(first), senders, float(factor), out, kout,
            step, tid, ranks, k0, k1, ranged=True)
    return out


# ----------------------------------------------------------------------------- QSGD, 1-bit SGD
def qsgd_encode(g: torch.Tensor, norm: torch.Tensor, bucket: int, levels: int, key: DitherKey,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """QSGD levels k = sgn(g)·⌊s|g|/‖g_b‖ + U⌋ ∈ [−s, s] (int8), U ~ U(0,1) from the key's stream."""
    _vec("g", g, torch.float32)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    _scales("norm", norm, g.numel(), bucket)
    levels = _int("levels", levels, 1, 127)
    out = _out(out, "out", g.numel(), torch.int8, g)
    _launch("qsgd_encode", g.numel(), g, norm, bucket, levels, out, *key.words(), ranged=True)
    return out


def scale_decode(codes: torch.Tensor, scale: torch.Tensor, bucket: int, levels: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """ĝ_i = scale_b · k_i / s (the QSGD decoder)."""
    _vec("codes", codes, torch.int8)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    _scales("scale", scale, codes.numel(), bucket)
    levels = _int("levels", levels, 1, 127)
    out = _out(out, "out", codes.numel(), torch.float32, codes)
    _launch("scale_decode", codes.numel(), codes, scale, bucket, levels, out)
    return out


def onebit_column_means(g: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of g viewed as (rows, cols): mean of entries ≥ 0 and mean of entries < 0 (Seide)."""
    _vec("g", g, torch.float32)
    cols = _int("cols", cols, 1, max(1, g.numel()))
    if g.numel() % cols:
        raise ValueError(f"g has {g.numel()} elements, not a multiple of cols={cols}")
    pos = torch.zeros(cols, dtype=torch.float32, device=g.device)  # an empty g has empty (0) bins
    neg = torch.zeros(cols, dtype=torch.float32, device=g.device)
    _launch("onebit_column_means", cols if g.numel() else 0, g, cols, pos, neg)
    return pos, neg


def onebit_encode(g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """bit = [g ≥ 0] (uint8)."""
    _vec("g", g, torch.float32)
    out = _out(out, "out", g.numel(), torch.uint8, g)
    _launch("onebit_encode", g.numel(), g, out)
    return out


def onebit_decode(bits: torch.Tensor, cols: int, pos_mean: torch.Tensor, neg_mean: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """ĝ = pos_mean[col] where bit else neg_mean[col]."""
    _vec("bits", bits, torch.uint8)
    cols = _int("cols", cols, 1, max(1, bits.numel()))
    _vec("pos_mean", pos_mean, torch.float32, cols)
    _vec("neg_mean", neg_mean, torch.float32, cols)
    out = _out(out, "out", bits.numel(), torch.float32, bits)
    _launch("onebit_decode", bits.numel(), bits, cols, pos_mean, neg_mean, out)
    return out


def topk_indices(g: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the k entries of largest |g|, ties to the lower index, on g's
    device: a stable sort of −|g| keeps equal magnitudes in index order, so every rank agrees."""
    _vec("g", g, torch.float32)
    k = _int("k", k, 0, g.numel())
    order = torch.sort(g.abs(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


# ----------------------------------------------------------------------------- packing
def packed_bytes(n: int, nbits: int) -> int:
    """⌈n·b/8⌉: 8 codes of b bits in b bytes, no padding beyond the last byte."""
    return (n * nbits + 7) // 8


def bitpack(symbols: torch.Tensor, nbits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack uint8 symbols < 2^b (b = nbits ∈ 1..8) into ⌈n·b/8⌉ bytes, little-endian bit order."""
    _vec("symbols", symbols, torch.uint8)
    nbits = _int("nbits", nbits, 1, 8)
    n = symbols.numel()
    out = _out(out, "out", packed_bytes(n, nbits), torch.uint8, symbols)
    _launch("bitpack", (n + 7) // 8, symbols, nbits, out)
    return out


def bitunpack(packed: torch.Tensor, nbits: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    _vec("packed", packed, torch.uint8)
    nbits = _int("nbits", nbits, 1, 8)
    if packed.numel() != packed_bytes(n, nbits):
        raise ValueError(f"packed has {packed.numel()} bytes, {n} codes of {nbits} bits need "
                         f"{packed_bytes(n, nbits)}")
    out = _out(out, "out", n, torch.uint8, packed)
    _launch("bitunpack", (n + 7) // 8, packed, nbits, out)
    return out


def radix_per_byte(radix: int) -> int:
    """m = ⌊log_radix 256⌋ symbols per byte (radix 3: 5, radix 5: 3, radix 7 to 16: 2)."""
    radix = _int("radix", radix, 2, 256)
    m, p = 0, 1
    while p * radix <= 256:
        p *= radix
        m += 1
    return m


def radixpack(symbols: torch.Tensor, radix: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack symbols < radix, m = radix_per_byte(radix) per byte: byte = Σ_j s_j·radix^j."""
    _vec("symbols", symbols, torch.uint8)
    m = radix_per_byte(radix)
    nbytes = (symbols.numel() + m - 1) // m
    out = _out(out, "out", nbytes, torch.uint8, symbols)
    _launch("radixpack", nbytes, symbols, radix, m, out)
    return out


def radixunpack(packed: torch.Tensor, radix: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    _vec("packed", packed, torch.uint8)
    m = radix_per_byte(radix)
    if packed.numel() != (n + m - 1) // m:
        raise ValueError(f"packed has {packed.numel()} bytes, {n} symbols need {(n + m - 1) // m}")
    out = _out(out, "out", n, torch.uint8, packed)
    _launch("radixunpack", packed.numel(), packed, radix, m, out)
    return out


def symbol_packing(alphabet: int) -> tuple[str, int]:
    """Densest of the two packers for symbols in [0, alphabet): ("bits", b) with b = ⌈log2 A⌉, or
    ("radix", m) with m = radix_per_byte(A) symbols per byte (base 3: 1.6 bits, base 5: 2.67)."""
    alphabet = _int("alphabet", alphabet, 2, 256)
    b = (alphabet - 1).bit_length()
    m = radix_per_byte(alphabet)
    return ("radix", m) if 8 / m < b else ("bits", b)


def symbol_bytes(n: int, alphabet: int) -> int:
    kind, v = symbol_packing(alphabet)
    return packed_bytes(n, v) if kind == "bits" else (n + v - 1) // v


def pack_symbols(symbols: torch.Tensor, alphabet: int) -> torch.Tensor:
    """Symbols in [0, alphabet) packed with :func:`symbol_packing`'s choice."""
    kind, v = symbol_packing(alphabet)
    return bitpack(symbols, v) if kind == "bits" else radixpack(symbols, alphabet)


def unpack_symbols(packed: torch.Tensor, alphabet: int, n: int) -> torch.Tensor:
    kind, v = symbol_packing(alphabet)
    return bitunpack(packed, v, n) if kind == "bits" else radixunpack(packed, alphabet, n)


def coset_bits(nesting_ratio: int) -> int | None:
    """log2 ρ when ρ is a power of two (bit packing), else None (radix packing)."""
    rho = _int("nesting_ratio", nesting_ratio, 2, 256)
    return rho.bit_length() - 1 if rho & (rho - 1) == 0 else None


def coset_bytes(n: int, nesting_ratio: int) -> int:
    """Bytes :func:`pack_cosets` takes for n symbols."""
    b = coset_bits(nesting_ratio)
    if b is not None:
        return packed_bytes(n, b)
    m = radix_per_byte(nesting_ratio)
    return (n + m - 1) // m


def pack_cosets(symbols: torch.Tensor, nesting_ratio: int) -> torch.Tensor:
    """Coset symbols in [0, ρ) packed densely: log2 ρ bits each, or radix-ρ bytes."""
    b = coset_bits(nesting_ratio)
    return bitpack(symbols, b) if b is not None else radixpack(symbols, nesting_ratio)


def unpack_cosets(packed: torch.Tensor, nesting_ratio: int, n: int) -> torch.Tensor:
    b = coset_bits(nesting_ratio)
    return bitunpack(packed, b, n) if b is not None else radixunpack(packed, nesting_ratio, n)


def modadd_cosets(x: torch.Tensor, y: torch.Tensor, nesting_ratio: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """(x + y) mod ρ symbol by symbol, on packed bytes (as :func:`pack_cosets` lays them out)."""
    _vec("x", x, torch.uint8)
    _vec("y", y, torch.uint8, x.numel())
    out = _out(out, "out", x.numel(), torch.uint8, x)
    b = coset_bits(nesting_ratio)
    if b is not None:
        _launch("modadd_bits", (x.numel() + b - 1) // b, x, y, b, out)
    else:
        _launch("modadd_radix", x.numel(), x, y, nesting_ratio, radix_per_byte(nesting_ratio), out)
    return out


SUM_WORD_BITS = 50  # float64 words hold integers < 2^50, with margin for the /P and ×P of Average


def _fields(radix: int, per_word: int) -> tuple[int, int]:
    radix = _int("radix", radix, 2, 1 << SUM_WORD_BITS)
    per_word = _int("per_word", per_word, 1, SUM_WORD_BITS)
    if radix ** per_word > 1 << SUM_WORD_BITS:
        raise ValueError(f"radix**per_word = {radix}**{per_word} > 2^{SUM_WORD_BITS}: "
                         "float64 sums would not stay exact")
    return radix, per_word


@functools.lru_cache(maxsize=64)
def _radix_inverses(radix: int, per_word: int, device: torch.device) -> torch.Tensor:
    """fl(1/R^j) for j = 0 … per_word (float64, on ``device``, made once per device; R^j ≤ 2^50 is
    exact, the division correctly rounded): the digit splitter's table (``split_word`` in
    kernels/arith.py)."""
    return (1.0 / torch.tensor([float(radix ** j) for j in range(per_word + 1)], dtype=torch.float64)).to(device)


def dqsg_encode_fields(g: torch.Tensor, delta: torch.Tensor, bucket: int, levels: int, key: DitherKey, radix: int,
                       per_word: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DQSG with common scales Δ straight into summable fields: (words, histogram).

    Equal to :func:`dqsg_encode` then :func:`pack_sum_fields` of the indices with offset s (base
    ``radix`` digits, ``per_word`` to a float64 word), in one pass; the histogram counts the
    symbols k + s (int64, 2s + 1 entries) for the entropy statistic."""
    _vec("g", g, torch.float32)
    bucket = _int("bucket", bucket, 1, 1 << 31)
    _scales("delta", delta, g.numel(), bucket)
    levels = _int("levels", levels, 1, 127)
    radix, per_word = _fields(radix, per_word)
    if radix <= 2 * levels:
        raise ValueError(f"radix={radix} cannot hold the symbols k + s in [0, {2 * levels}] (levels={levels})")
    n = g.numel()
    out = _out(out, "out", math.ceil(n / per_word), torch.float64, g)
    span, _ = _span(_target("dqsg_encode_fields", g, delta, out), per_word)
    counts = _histogram(n, span, 2 * levels + 1, g)
    _launch("dqsg_encode_fields", n, g, delta, bucket, levels, radix, per_word, out, counts, *key.words(), span=span)
    return out, counts.sum(0)


def dqsg_decode_fields(words: torch.Tensor, n: int, factor: float, radix: int, per_word: int, offset: int,
                       delta: torch.Tensor, bucket: int, key: DitherKey, senders: int = 1,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Δ_b (Σ_p k_p − Σ_p u_p) (float32) straight from the reduced summable words, in one pass.

    Equal to :func:`unpack_sum_fields` (``factor``: what the reduction scaled the words by;
    ``offset``: the summed field offset, P·s) then :func:`dqsg_decode` over senders
    key.sender … key.sender + senders − 1."""
    n = _int("n", n, 0, MAX_ELEMENTS)
    radix, per_word = _fields(radix, per_word)
    _vec("words", words, torch.float64, math.ceil(n / per_word))
    bucket = _int("bucket", bucket, 1, 1 << 31)
    _scales("delta", delta, n, bucket)
    senders = _int("senders", senders, 1, 1 << 24)
    _check_senders(key, senders)
    out = _out(out, "out", n, torch.float32, words)
    span, _ = _span(_target("dqsg_decode_fields", words, delta, out), per_word)
    step, tid, first, ranks, k0, k1 = key.words()
    _launch("dqsg_decode_fields", n, words, np.float64(factor), radix, _radix_inverses(radix, per_word, words.device),
            per_word, int(offset), delta, bucket, int(first), senders, out, step, tid, ranks, k0, k1, span=span)
    return out


def pack_sum_fields(codes: torch.Tensor, offset: int, radix: int, per_word: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Word w = Σ_j (codes[w·F + j] + offset)·R^j, F = per_word, R = radix (R^F ≤ 2^50), as an exact
    float64: the sum of P such words is the word of the digit sums as long as every digit sum stays
    below R."""
    _vec("codes", codes, torch.int8)
    radix, per_word = _fields(radix, per_word)
    nw = math.ceil(codes.numel() / per_word)
    out = _out(out, "out", nw, torch.float64, codes)
    _launch("pack_sum_fields", nw, codes, int(offset), radix, per_word, out)
    return out


def unpack_sum_fields(words: torch.Tensor, n: int, offset: int, radix: int, per_word: int,
                      factor: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_sum_fields` after a reduction that returned ``factor`` × the sum:
    each word / factor is rounded to the exact integer sum (< 2^50), split, minus ``offset``."""
    radix, per_word = _fields(radix, per_word)
    _vec("words", words, torch.float64, math.ceil(n / per_word))
    out = _out(out, "out", n, torch.int32, words)
    _launch("unpack_sum_fields", words.numel(), words, np.float64(factor), radix,
            _radix_inverses(radix, per_word, words.device), per_word, int(offset), out)
    return out
