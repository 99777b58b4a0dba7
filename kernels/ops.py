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

The layer under this module is :mod:`.dispatch` (target, launch, checks); each function launches a
kernel of :mod:`.table` by its entry (``launch(table.dqsg_encode, ...)``). The packers
(:mod:`.ops_packing`), the summable fields (:mod:`.ops_fields`) and the sizing functions
(:mod:`.sizes`) are imported here, so ``ops.<name>`` reaches every function of the API.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from . import table
from .dispatch import (
    check_senders,
    force_target,
    histogram,
    launch,
    launches,
    output,
    range_span,
    scales,
    target,
    vec,
)
from .key import MAX_ELEMENTS, DitherKey
from .ops_entropy import (
    RANS_CHUNK,
    RansTables,
    dither_bins,
    rans_chunks,
    rans_decode,
    rans_encode,
    rans_encode_modelled,
    rans_split,
    rans_table,
)
from .ops_fields import dqsg_decode_fields, dqsg_encode_fields, pack_sum_fields, unpack_sum_fields
from .ops_packing import (
    bitpack,
    bitunpack,
    fused_packing,
    modadd_cosets,
    pack_cosets,
    pack_symbols,
    radixpack,
    radixunpack,
    unpack_cosets,
    unpack_symbols,
)
from .ops_segments import (
    bitpack_segments,
    bitunpack_segments,
    bucket_absmax_segments,
    bucket_checksum_segments,
    bucket_l2_segments,
    dqsg_decode_fields_segments,
    dqsg_decode_packed_segments,
    dqsg_decode_segments,
    dqsg_encode_fields_segments,
    dqsg_encode_packed_segments,
    dqsg_encode_segments,
    hadamard_rotate_segments,
    nested_decode_segments,
    nested_encode_segments,
    onebit_column_means_segments,
    onebit_decode_segments,
    pack_cosets_segments,
    pack_sum_fields_segments,
    pack_symbols_segments,
    qsgd_encode_segments,
    scale_decode_segments,
    segment_histograms,
    segment_ids,
    unpack_cosets_segments,
    unpack_sum_fields_segments,
    unpack_symbols_segments,
)
from .segments import Segments
from .sizes import (
    SUM_WORD_BITS,
    coset_bits,
    coset_bytes,
    integer,
    num_buckets,
    onebit_lanes,
    packed_bytes,
    radix_per_byte,
    symbol_bytes,
    symbol_packing,
)

__all__ = [
    "bitpack", "bitpack_segments", "bitunpack", "bitunpack_segments", "bucket_absmax", "bucket_absmax_segments",
    "bucket_checksum", "bucket_checksum_segments", "bucket_l2", "bucket_l2_segments", "bucket_step", "coset_bits",
    "coset_bytes", "dither", "dither_bins", "dqsg_aggregate", "dqsg_decode", "dqsg_decode_fields",
    "dqsg_decode_fields_segments", "dqsg_decode_packed", "dqsg_decode_packed_segments", "dqsg_decode_segments",
    "dqsg_encode", "dqsg_encode_fields", "dqsg_encode_fields_segments", "dqsg_encode_packed",
    "dqsg_encode_packed_segments", "dqsg_encode_segments", "force_target", "hadamard_rotate",
    "hadamard_rotate_segments", "launches", "modadd_cosets", "nested_decode", "nested_decode_segments",
    "nested_encode_segments", "nested_encode", "num_buckets", "onebit_column_means", "onebit_column_means_segments",
    "onebit_decode", "onebit_decode_segments", "onebit_encode", "onebit_lanes", "pack_cosets",
    "pack_cosets_segments", "pack_sum_fields", "pack_sum_fields_segments", "pack_symbols", "pack_symbols_segments",
    "packed_bytes", "qsgd_encode", "qsgd_encode_segments", "radix_per_byte", "radixpack", "radixunpack",
    "RANS_CHUNK", "rans_chunks", "rans_decode", "rans_encode", "rans_encode_modelled", "rans_split", "rans_table",
    "RansTables", "scale_decode", "scale_decode_segments", "segment_histograms", "segment_ids", "Segments",
    "SUM_WORD_BITS", "symbol_bytes", "symbol_packing", "topk_indices", "unpack_cosets", "unpack_cosets_segments",
    "unpack_sum_fields", "unpack_sum_fields_segments", "unpack_symbols", "unpack_symbols_segments",
]


# ----------------------------------------------------------------------------- dithers, scales
def dither(n: int, key: DitherKey, device: str | torch.device = "cpu") -> torch.Tensor:
    """The n dithers u ∈ (−½, ½) of stream ``key`` (float32): element i is lane i % 4 of
    Philox-4x32-10(counter = (i // 4, step, tensor id, sender), key = seed)."""
    out = torch.empty(integer("n", n, 0, MAX_ELEMENTS), dtype=torch.float32, device=device)
    launch(table.dither_fill, n, out, *key.words())
    return out


def bucket_absmax(g: torch.Tensor, bucket: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """max |g_i| per bucket of ``bucket`` coordinates (last may be shorter); NaN → +inf."""
    vec("g", g, torch.float32)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    nb = num_buckets(g.numel(), bucket)
    out = output(out, "out", nb, torch.float32, g)
    launch(table.bucket_absmax, nb, g, bucket, out)
    return out


def bucket_step(absmax: torch.Tensor, levels: int) -> torch.Tensor:
    """Δ_b = absmax_b / s per bucket (float32), one correctly rounded division on either device:
    the step decides the codes, so it is computed by the kernels, not by the framework (whose
    division by a scalar may multiply by the reciprocal on a GPU)."""
    vec("absmax", absmax, torch.float32)
    levels = integer("levels", levels, 1, 1 << 24)
    out = torch.empty_like(absmax)
    launch(table.bucket_step, absmax.numel(), absmax, levels, out)
    return out


def bucket_checksum(k: torch.Tensor, bucket: int) -> torch.Tensor:
    """Σ_j w_j·k_j mod 2^32 per bucket (int64 holding the uint32; w_j an odd 32-bit hash of the
    position j inside the bucket): linear in the integer indices k (int8 or int32), so it detects
    a nested decode that is off by a multiple of ρ."""
    if not isinstance(k, torch.Tensor) or k.dtype not in (torch.int8, torch.int32):
        raise TypeError(f"k must be an int8 or int32 tensor, got {getattr(k, 'dtype', type(k).__name__)}")
    vec("k", k, k.dtype)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    nb = num_buckets(k.numel(), bucket)
    out = torch.empty(nb, dtype=torch.int64, device=k.device)
    launch(table.bucket_checksum, nb, k, bucket, out)
    return out


def bucket_l2(g: torch.Tensor, bucket: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """‖g_b‖₂ per bucket (float64 accumulation in index order; NaN propagates)."""
    vec("g", g, torch.float32)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    nb = num_buckets(g.numel(), bucket)
    out = output(out, "out", nb, torch.float32, g)
    launch(table.bucket_l2, nb, g, bucket, out)
    return out


def hadamard_rotate(x: torch.Tensor, bucket: int, key: DitherKey, inverse: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x rotated, bucket by bucket, by the shared randomized Hadamard transform of stream
    (key.seed, key.step, key.tensor_id) (docs/ALGORITHMS.md §10; the sender and dither family of
    ``key`` are not used: every rank draws the same signs), or by its inverse: into ``out`` (a new
    tensor, or one given; each bucket is copied and rotated while in cache, so a rotated copy costs
    one pass), or in place with ``out=x``; returns the rotated tensor.

    Forward: 2^−⌊k/2⌋ H D per power-of-two piece of 2^k coordinates of a bucket (a bucket that is
    not a power of two is split into its binary expansion); inverse: D 2^−⌈k/2⌉ H, so
    inverse(forward(x)) = x up to the butterflies' rounding."""
    vec("x", x, torch.float32)
    bucket = integer("bucket", bucket, 1, 1 << 30)
    if out is not x:
        out = output(out, "out", x.numel(), torch.float32, x)
    step, tid, _, _, k0, k1 = key.words()
    launch(table.hadamard_rotate, num_buckets(x.numel(), bucket), x, out, bucket, int(bool(inverse)), step, tid,
           k0, k1)
    return out


# ----------------------------------------------------------------------------- DQSG
def dqsg_encode(g: torch.Tensor, delta: torch.Tensor, bucket: int, levels: int, key: DitherKey,
                out: torch.Tensor | None = None, symbols: bool = False) -> torch.Tensor:
    """k_i = round(g_i/Δ_b + u_i) ∈ [−s, s] (int8); Δ_b = 0 gives k = 0 (docs/ALGORITHMS.md §1).

    ``symbols=True`` returns k + s as uint8 in [0, 2s] instead, ready for :func:`bitpack` or
    :func:`radixpack` (one pass, no separate offset step).
    """
    vec("g", g, torch.float32)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    scales("delta", delta, g.numel(), bucket)
    levels = integer("levels", levels, 1, 127)
    out = output(out, "out", g.numel(), torch.uint8 if symbols else torch.int8, g)
    launch(table.dqsg_encode, g.numel(), g, delta, bucket, levels, levels if symbols else 0, out, *key.words())
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
    vec("ksum", ksum, ksum.dtype)
    offset = integer("offset", offset, 0, 255)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    scales("delta", delta, ksum.numel(), bucket)
    senders = integer("senders", senders, 1, 1 << 24)
    out = output(out, "out", ksum.numel(), torch.float32, ksum)
    check_senders(key, senders)
    step, tid, first, ranks, k0, k1 = key.words()
    launch(table.dqsg_decode, ksum.numel(), ksum, offset, delta, bucket, int(first), senders, float(factor),
            out, step, tid, ranks, k0, k1)
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
    offset = integer("offset", offset, 0, 255)
    ranks, n = codes.shape
    bucket = integer("bucket", bucket, 1, 1 << 31)
    if not isinstance(delta, torch.Tensor) or delta.dtype != torch.float32 or \
            tuple(delta.shape) != (ranks, num_buckets(n, bucket)):
        raise ValueError(f"delta must be float32 of shape {(ranks, num_buckets(n, bucket))}, got "
                         f"{getattr(delta, 'dtype', None)} {tuple(getattr(delta, 'shape', ()))}")
    if key.ranks != ranks or key.sender != 0:
        raise ValueError(f"dqsg_aggregate needs the stratified key of sender 0 among the {ranks} senders, got {key}")
    if n > MAX_ELEMENTS:
        raise ValueError(f"codes has {n} columns, more than the dither counter's {MAX_ELEMENTS}")
    out = output(out, "out", n, torch.float32, codes)
    step, tid, _, ranks_word, k0, k1 = key.words()
    launch(table.dqsg_aggregate, n, codes.contiguous(), offset, delta.contiguous(), bucket, float(factor), out, step,
            tid, ranks_word, k0, k1)
    return out


# ----------------------------------------------------------------------------- DQSG payloads, fused
def dqsg_encode_packed(g: torch.Tensor, bucket: int, levels: int, key: DitherKey
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An own-scale DQSG payload in one pass over g: (Δ, packed symbols, histogram).

    Δ_b = max|g|/s per bucket (float32; NaN → +inf: check before sending), the symbols k + s of
    :func:`dqsg_encode` packed as :func:`pack_symbols` packs them, and the count of each symbol
    value (int64, 2s + 1 entries) for the entropy statistic. Bit-identical to those functions run
    one after the other; no n-byte symbol array is written or read back. On the GPU the scales are
    a separate pass (a thread's range does not hold whole buckets)."""
    vec("g", g, torch.float32)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    levels = integer("levels", levels, 1, 127)
    alphabet = 2 * levels + 1
    radix, nbits, per_byte, group = fused_packing(alphabet)
    n = g.numel()
    span, scaled = range_span(target(table.dqsg_encode_packed, g), group, bucket)
    delta = torch.empty(num_buckets(n, bucket), dtype=torch.float32, device=g.device)
    if not scaled:
        bucket_absmax(g, bucket, out=delta).div_(float(levels))
    packed = torch.empty(symbol_bytes(n, alphabet), dtype=torch.uint8, device=g.device)
    counts = histogram(n, span, alphabet, g)
    launch(table.dqsg_encode_packed, n, g, delta, int(scaled), bucket, levels, radix, nbits, per_byte, packed, counts,
            *key.words(), span=span)
    return delta, packed, counts.sum(0)


def dqsg_decode_packed(packed: torch.Tensor, delta: torch.Tensor, bucket: int, levels: int, key: DitherKey, n: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`dqsg_encode_packed`: Δ_b(k_i − u_i) (float32) from the packed symbols in one
    pass, equal to :func:`unpack_symbols` then :func:`dqsg_decode` with offset s."""
    vec("packed", packed, torch.uint8)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    levels = integer("levels", levels, 1, 127)
    n = integer("n", n, 0, MAX_ELEMENTS)
    alphabet = 2 * levels + 1
    if packed.numel() != symbol_bytes(n, alphabet):
        raise ValueError(f"packed has {packed.numel()} bytes, {n} symbols of {alphabet} values need "
                         f"{symbol_bytes(n, alphabet)}")
    scales("delta", delta, n, bucket)
    radix, nbits, per_byte, group = fused_packing(alphabet)
    span, _ = range_span(target(table.dqsg_decode_packed, packed, delta), group)
    out = output(out, "out", n, torch.float32, packed)
    launch(table.dqsg_decode_packed, n, packed, levels, radix, nbits, per_byte, delta, bucket, out, *key.words(),
            span=span)
    return out


# ----------------------------------------------------------------------------- NDQSG
def nested_encode(g: torch.Tensor, delta: torch.Tensor, bucket: int, levels: int, nesting_ratio: int,
                  key: DitherKey, out: torch.Tensor | None = None) -> torch.Tensor:
    """Coset symbols (k + ⌊ρ/2⌋) mod ρ ∈ [0, ρ) of the DQSG(s₁) indices k (uint8; docs/ALGORITHMS.md §2)."""
    vec("g", g, torch.float32)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    scales("delta", delta, g.numel(), bucket)
    levels = integer("levels", levels, 1, 127)
    rho = integer("nesting_ratio", nesting_ratio, 2, 255)
    out = output(out, "out", g.numel(), torch.uint8, g)
    launch(table.nested_encode, g.numel(), g, delta, bucket, levels, rho, out, *key.words())
    return out


def nested_decode(symbols: torch.Tensor, delta: torch.Tensor, bucket: int, nesting_ratio: int, side: torch.Tensor,
                  key: DitherKey, senders: int = 1, factor: float = 1.0, out: torch.Tensor | None = None,
                  kout: torch.Tensor | None = None) -> torch.Tensor:
    """Decode coset symbols (or their mod-ρ sum over ``senders`` senders) with side information.

    ``side`` estimates the senders' summed gradient, in gradient units. Returns factor·Σ_p ĝ_p
    (float32), exact whenever |K − (side/Δ + Σu)| < ρ/2. The resolved index sums K̂ (int32) are
    written to ``kout`` when given (for :func:`bucket_checksum`, which detects a wrong K̂).
    """
    vec("symbols", symbols, torch.uint8)
    n = symbols.numel()
    bucket = integer("bucket", bucket, 1, 1 << 31)
    scales("delta", delta, n, bucket)
    rho = integer("nesting_ratio", nesting_ratio, 2, 255)
    vec("side", side, torch.float32, n)
    senders = integer("senders", senders, 1, 1 << 24)
    out = output(out, "out", n, torch.float32, symbols)
    kout = output(kout, "kout", n, torch.int32, symbols)
    check_senders(key, senders)
    step, tid, first, ranks, k0, k1 = key.words()
    launch(table.nested_decode, n, symbols, delta, bucket, rho, side, int(first), senders, float(factor), out, kout,
            step, tid, ranks, k0, k1)
    return out


# ----------------------------------------------------------------------------- QSGD, 1-bit SGD
def qsgd_encode(g: torch.Tensor, norm: torch.Tensor, bucket: int, levels: int, key: DitherKey,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """QSGD levels k = sgn(g)·⌊s|g|/‖g_b‖ + U⌋ ∈ [−s, s] (int8), U ~ U(0,1) from the key's stream."""
    vec("g", g, torch.float32)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    scales("norm", norm, g.numel(), bucket)
    levels = integer("levels", levels, 1, 127)
    out = output(out, "out", g.numel(), torch.int8, g)
    launch(table.qsgd_encode, g.numel(), g, norm, bucket, levels, out, *key.words())
    return out


def scale_decode(codes: torch.Tensor, scale: torch.Tensor, bucket: int, levels: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """ĝ_i = scale_b · k_i / s (the QSGD decoder)."""
    vec("codes", codes, torch.int8)
    bucket = integer("bucket", bucket, 1, 1 << 31)
    scales("scale", scale, codes.numel(), bucket)
    levels = integer("levels", levels, 1, 127)
    out = output(out, "out", codes.numel(), torch.float32, codes)
    launch(table.scale_decode, codes.numel(), codes, scale, bucket, levels, out)
    return out


def onebit_column_means(g: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of g viewed as (rows, cols): mean of entries ≥ 0 and mean of entries < 0 (Seide),
    in two passes: float64 sums over :func:`.sizes.onebit_lanes` lanes of rows per column, then per column
    the lanes added pairwise (kernels/arith/qsgd.py)."""
    vec("g", g, torch.float32)
    cols = integer("cols", cols, 1, max(1, g.numel()))
    if g.numel() % cols:
        raise ValueError(f"g has {g.numel()} elements, not a multiple of cols={cols}")
    pos = torch.zeros(cols, dtype=torch.float32, device=g.device)  # an empty g has empty (0) bins
    neg = torch.zeros(cols, dtype=torch.float32, device=g.device)
    if g.numel():
        lanes = onebit_lanes(g.numel() // cols, cols)
        partial = torch.empty(4 * lanes * cols, dtype=torch.float64, device=g.device)
        launch(table.onebit_lane_sums, lanes * cols, g, cols, lanes, partial)
        launch(table.onebit_column_means, cols, partial, cols, lanes, pos, neg)
    return pos, neg



def onebit_encode(g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """bit = [g ≥ 0] (uint8)."""
    vec("g", g, torch.float32)
    out = output(out, "out", g.numel(), torch.uint8, g)
    launch(table.onebit_encode, g.numel(), g, out)
    return out


def onebit_decode(bits: torch.Tensor, cols: int, pos_mean: torch.Tensor, neg_mean: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """ĝ = pos_mean[col] where bit else neg_mean[col]."""
    vec("bits", bits, torch.uint8)
    cols = integer("cols", cols, 1, max(1, bits.numel()))
    vec("pos_mean", pos_mean, torch.float32, cols)
    vec("neg_mean", neg_mean, torch.float32, cols)
    out = output(out, "out", bits.numel(), torch.float32, bits)
    launch(table.onebit_decode, bits.numel(), bits, cols, pos_mean, neg_mean, out)
    return out


def topk_indices(g: torch.Tensor, k: int | Sequence[int], lengths: Sequence[int] | None = None) -> torch.Tensor:
    """Indices (int64, ascending) of the k entries of largest |g|, ties to the lower index, on g's
    device: a stable sort of −|g| keeps equal magnitudes in index order, so every rank agrees.

    With ``lengths`` (g: segments of those lengths end to end) and ``k`` a count per segment: each
    segment's own top k_s, as indices into g, in the same few operations however many segments there
    are. After the sort by magnitude a stable sort by segment gathers each segment's elements, still
    in that order, at the segment's own place in g; its first k_s positions hold its choice."""
    vec("g", g, torch.float32, None if lengths is None else sum(lengths))
    lengths, ks = ([g.numel()], [k]) if lengths is None else (list(lengths), list(k))  # type: ignore[arg-type]
    if len(ks) != len(lengths):
        raise ValueError(f"{len(ks)} counts k for {len(lengths)} segments")
    ks = [integer("k", c, 0, n) for c, n in zip(ks, lengths)]
    order = torch.sort(g.abs(), descending=True, stable=True).indices
    if len(lengths) == 1:
        return torch.sort(order[:ks[0]]).values
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=g.device), torch.tensor(lengths, device=g.device))
    order = order[torch.sort(ids[order], stable=True).indices]
    starts = torch.tensor([0, *itertools.accumulate(lengths)][:-1], device=g.device)
    rank = torch.arange(g.numel(), device=g.device) - starts[ids]  # position p holds an element of segment ids[p]
    return torch.sort(order[rank < torch.tensor(ks, device=g.device)[ids]]).values
