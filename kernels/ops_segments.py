"""The summable exchange's kernels over several tensors in one launch each (see :mod:`.ops` and
:mod:`.segments`): the tensors' elements, bucket scales and summable words lie end to end in flat
buffers, and each function gives, tensor by tensor, the bits of the single-tensor function it names
(:func:`.ops.hadamard_rotate`, :func:`.ops.bucket_absmax`, :func:`.ops_fields.dqsg_encode_fields`,
:func:`.ops_fields.dqsg_decode_fields`, and for the payload exchanges :func:`.ops.dqsg_encode_packed`,
:func:`.ops.dqsg_decode_packed`, the symbol packers, QSGD's :func:`.ops.bucket_l2`,
:func:`.ops.qsgd_encode` and :func:`.ops.scale_decode`, and 1-bit SGD's
:func:`.ops.onebit_column_means` and :func:`.ops.onebit_decode`) in one launch, however many
tensors there are."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import torch

from . import table
from .dispatch import check_senders, launch_segments, output, range_span, target, vec
from .ops_fields import _fields, _radix_inverses, _symbol_fields
from .ops_packing import fused_packing
from .segments import Segments, Shares
from .sizes import coset_packing, integer, onebit_lanes, packed_bytes, symbol_bytes, symbol_packing


def hadamard_rotate_segments(x: torch.Tensor, segments: Segments, inverse: bool = False,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Every segment of ``x`` rotated by its own shared rotation (:func:`.ops.hadamard_rotate` with
    its key), into ``out`` (a new tensor, one given, or ``x`` itself: in place)."""
    vec("x", x, torch.float32, segments.elements)
    if out is not x:
        out = output(out, "out", x.numel(), torch.float32, x)
    *_, k0, k1 = segments.key.words()
    launch_segments(table.hadamard_rotate, segments, x, out, segments.bucket, int(bool(inverse)), k0, k1)
    return out


def _per_bucket(kernel: table.Kernel, g: torch.Tensor, segments: Segments) -> torch.Tensor:
    """A per-bucket statistic ``kernel(b, g, bucket, out)`` of every segment, their buckets end to end."""
    vec("g", g, torch.float32, segments.elements)
    out = torch.empty(sum(segments.buckets), dtype=torch.float32, device=g.device)
    launch_segments(kernel, segments, g, segments.bucket, out)
    return out


def bucket_absmax_segments(g: torch.Tensor, segments: Segments) -> torch.Tensor:
    """max |g_i| per bucket of every segment (:func:`.ops.bucket_absmax`), the segments' buckets end to end."""
    return _per_bucket(table.bucket_absmax, g, segments)


def bucket_l2_segments(g: torch.Tensor, segments: Segments) -> torch.Tensor:
    """‖g_b‖₂ per bucket of every segment (:func:`.ops.bucket_l2`), the segments' buckets end to end."""
    return _per_bucket(table.bucket_l2, g, segments)


def segment_ids(segments: Segments, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The index of each element's segment (``dtype``), the segments end to end."""
    return torch.repeat_interleave(torch.arange(len(segments.lengths), dtype=dtype, device=device),
                                   torch.tensor(segments.lengths, device=device))


def segment_histograms(values: torch.Tensor, segments: Segments, size: int) -> torch.Tensor:
    """Each segment's histogram of its ``values`` (integers in [0, size), one per element, end to
    end): int64, segments × size, in one pass."""
    cells = segment_ids(segments, values.device).mul_(size).add_(values)
    return torch.bincount(cells, minlength=len(segments.lengths) * size).reshape(-1, size)


def _counts(where: str, segments: Segments, span: int, alphabet: int, like: torch.Tensor) -> torch.Tensor:
    """Zeroed histogram rows of a segmented fused encoder: one per range on the CPU, one per segment
    on the GPU (whose threads add atomically)."""
    rows = sum(-(-n // span) for n in segments.lengths) if where == "cpu" else len(segments.lengths)
    return torch.zeros((max(1, rows), alphabet), dtype=torch.int64, device=like.device)


def _per_segment(counts: torch.Tensor, where: str, segments: Segments, span: int) -> list[list[int]]:
    """Each segment's symbol counts from the encoder's rows."""
    if where != "cpu":
        return counts.tolist()
    blocks = [-(-n // span) for n in segments.lengths]
    if not sum(blocks):
        return [[0] * counts.shape[1] for _ in blocks]
    owner = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks))  # each row's segment
    summed = torch.zeros(len(blocks), counts.shape[1], dtype=counts.dtype)
    return summed.index_add_(0, owner, counts[:len(owner)]).tolist()


def dqsg_encode_fields_segments(g: torch.Tensor, delta: torch.Tensor, segments: Segments, levels: int, radix: int,
                                per_word: int, out: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, list[list[int]]]:
    """Every segment of ``g`` quantized with its scales into its summable words
    (:func:`.ops_fields.dqsg_encode_fields` with its key), the words end to end in ``out``; and each
    segment's histogram of the symbols k + s."""
    vec("g", g, torch.float32, segments.elements)
    vec("delta", delta, torch.float32, sum(segments.buckets))
    levels, radix, per_word = _symbol_fields(levels, radix, per_word)
    out = output(out, "out", sum(segments.words(per_word)), torch.float64, g)
    where = target(table.dqsg_encode_fields, g, delta, out)
    span, _ = range_span(where, per_word)
    counts = _counts(where, segments, span, 2 * levels + 1, g)
    _, _, sender, ranks, k0, k1 = segments.key.words()
    launch_segments(table.dqsg_encode_fields, segments, g, delta, segments.bucket, levels, radix, per_word, out,
                    counts, sender, ranks, k0, k1, span=span, per_word=per_word)
    return out, _per_segment(counts, where, segments, span)


def dqsg_decode_fields_segments(words: torch.Tensor, factor: float, radix: int, per_word: int, offset: int,
                                delta: torch.Tensor, segments: Segments, senders: int = 1,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """Every segment's Δ_b (Σ_p k_p − Σ_p u_p) from its reduced summable words
    (:func:`.ops_fields.dqsg_decode_fields` with its key, senders key.sender … + senders − 1), the
    segments end to end in the float32 result."""
    radix, per_word = _fields(radix, per_word)
    vec("words", words, torch.float64, sum(segments.words(per_word)))
    vec("delta", delta, torch.float32, sum(segments.buckets))
    senders = integer("senders", senders, 1, 1 << 24)
    check_senders(segments.key, senders)
    out = output(out, "out", segments.elements, torch.float32, words)
    span, _ = range_span(target(table.dqsg_decode_fields, words, delta, out), per_word)
    _, _, first, ranks, k0, k1 = segments.key.words()
    launch_segments(table.dqsg_decode_fields, segments, words, np.float64(factor), radix,
                    _radix_inverses(radix, per_word, words.device), per_word, int(offset), delta, segments.bucket,
                    int(first), senders, out, ranks, k0, k1, span=span, per_word=per_word)
    return out


def _packed_sizes(segments: Segments, levels: int) -> list[int]:
    """Each segment's packed symbol bytes (:func:`.sizes.symbol_bytes` of its length)."""
    return [symbol_bytes(n, 2 * levels + 1) for n in segments.lengths]


def dqsg_encode_packed_segments(g: torch.Tensor, segments: Segments, levels: int
                                ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Every segment of ``g`` as its own-scale DQSG payload (:func:`.ops.dqsg_encode_packed` with its
    key): (the scales Δ of every segment end to end, the packed symbols of every segment end to end
    (:func:`.sizes.symbol_bytes` of its length each), each segment's histogram of the symbols k + s). Two launches
    on the GPU (maxima, then the fused pass), one on the CPU, however many segments."""
    vec("g", g, torch.float32, segments.elements)
    levels = integer("levels", levels, 1, 127)
    alphabet = 2 * levels + 1
    radix, nbits, per_byte, group = fused_packing(alphabet)
    span, scaled = range_span(target(table.dqsg_encode_packed, g), group, segments.bucket)
    if scaled:
        delta = torch.empty(sum(segments.buckets), dtype=torch.float32, device=g.device)
    else:
        delta = bucket_absmax_segments(g, segments).div_(float(levels))
    sizes = _packed_sizes(segments, levels)
    packed = torch.empty(sum(sizes), dtype=torch.uint8, device=g.device)
    where = target(table.dqsg_encode_packed, g)
    counts = _counts(where, segments, span, alphabet, g)
    _, _, sender, ranks, k0, k1 = segments.key.words()
    launch_segments(table.dqsg_encode_packed, segments, g, delta, int(scaled), segments.bucket, levels, radix, nbits,
                    per_byte, packed, counts, sender, ranks, k0, k1, span=span, shares=Shares(words=tuple(sizes)))
    return delta, packed, _per_segment(counts, where, segments, span)


def dqsg_decode_packed_segments(packed: torch.Tensor, delta: torch.Tensor, segments: Segments, levels: int,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`dqsg_encode_packed_segments`: every segment's Δ_b (k_i − u_i) with its key
    (:func:`.ops.dqsg_decode_packed`), the segments end to end in the float32 result; one launch."""
    levels = integer("levels", levels, 1, 127)
    sizes = _packed_sizes(segments, levels)
    vec("packed", packed, torch.uint8, sum(sizes))
    vec("delta", delta, torch.float32, sum(segments.buckets))
    radix, nbits, per_byte, group = fused_packing(2 * levels + 1)
    span, _ = range_span(target(table.dqsg_decode_packed, packed, delta), group)
    out = output(out, "out", segments.elements, torch.float32, packed)
    _, _, sender, ranks, k0, k1 = segments.key.words()
    launch_segments(table.dqsg_decode_packed, segments, packed, levels, radix, nbits, per_byte, delta,
                    segments.bucket, out, sender, ranks, k0, k1, span=span, shares=Shares(words=tuple(sizes)))
    return out


def _packing_shares(segments: Segments, per: int, sizes: tuple[int, ...]) -> Shares:
    """A packer's launch: groups of ``per`` symbols per segment, each segment's ``sizes`` bytes."""
    return Shares(units=tuple(-(-n // per) for n in segments.lengths), words=sizes)


def bitpack_segments(symbols: torch.Tensor, segments: Segments, nbits: int) -> torch.Tensor:
    """Every segment's symbols packed into its own ⌈n·b/8⌉ bytes (:func:`.ops.bitpack`), end to end."""
    vec("symbols", symbols, torch.uint8, segments.elements)
    nbits = integer("nbits", nbits, 1, 8)
    sizes = tuple(packed_bytes(n, nbits) for n in segments.lengths)
    out = torch.empty(sum(sizes), dtype=torch.uint8, device=symbols.device)
    launch_segments(table.bitpack, segments, symbols, nbits, out, shares=_packing_shares(segments, 8, sizes))
    return out


def bitunpack_segments(packed: torch.Tensor, segments: Segments, nbits: int) -> torch.Tensor:
    """Inverse of :func:`bitpack_segments` (:func:`.ops.bitunpack` of every segment)."""
    nbits = integer("nbits", nbits, 1, 8)
    sizes = tuple(packed_bytes(n, nbits) for n in segments.lengths)
    vec("packed", packed, torch.uint8, sum(sizes))
    out = torch.empty(segments.elements, dtype=torch.uint8, device=packed.device)
    launch_segments(table.bitunpack, segments, packed, nbits, out, shares=_packing_shares(segments, 8, sizes))
    return out


def _radixpack_segments(symbols: torch.Tensor, segments: Segments, alphabet: int, per_byte: int) -> torch.Tensor:
    """Every segment's symbols in [0, alphabet) packed ``per_byte`` to a byte as base-``alphabet``
    digits (:func:`.ops.radixpack`), ⌈n/per_byte⌉ bytes each, end to end."""
    vec("symbols", symbols, torch.uint8, segments.elements)
    sizes = tuple(-(-n // per_byte) for n in segments.lengths)
    out = torch.empty(sum(sizes), dtype=torch.uint8, device=symbols.device)
    launch_segments(table.radixpack, segments, symbols, alphabet, per_byte, out,
                    shares=_packing_shares(segments, per_byte, sizes))
    return out


def _radixunpack_segments(packed: torch.Tensor, segments: Segments, alphabet: int, per_byte: int) -> torch.Tensor:
    """Inverse of :func:`_radixpack_segments`."""
    sizes = tuple(-(-n // per_byte) for n in segments.lengths)
    vec("packed", packed, torch.uint8, sum(sizes))
    out = torch.empty(segments.elements, dtype=torch.uint8, device=packed.device)
    launch_segments(table.radixunpack, segments, packed, alphabet, per_byte, out,
                    shares=_packing_shares(segments, per_byte, sizes))
    return out


def _pack(symbols: torch.Tensor, segments: Segments, alphabet: int, packing: tuple[str, int],
          unpack: bool = False) -> torch.Tensor:
    """Every segment's symbols in [0, alphabet) packed (or, ``unpack``, unpacked) the way ``packing``
    says: ("bits", b) or ("radix", symbols per byte)."""
    kind, v = packing
    if kind == "bits":
        return (bitunpack_segments if unpack else bitpack_segments)(symbols, segments, v)
    return (_radixunpack_segments if unpack else _radixpack_segments)(symbols, segments, alphabet, v)


def pack_symbols_segments(symbols: torch.Tensor, segments: Segments, alphabet: int) -> torch.Tensor:
    """Every segment's symbols packed as :func:`.ops.pack_symbols` packs them, end to end."""
    return _pack(symbols, segments, alphabet, symbol_packing(alphabet))


def unpack_symbols_segments(packed: torch.Tensor, segments: Segments, alphabet: int) -> torch.Tensor:
    """Inverse of :func:`pack_symbols_segments` (:func:`.ops.unpack_symbols` of every segment)."""
    return _pack(packed, segments, alphabet, symbol_packing(alphabet), unpack=True)


def pack_cosets_segments(symbols: torch.Tensor, segments: Segments, nesting_ratio: int) -> torch.Tensor:
    """Every segment's coset symbols in [0, ρ) packed as :func:`.ops.pack_cosets` packs them, end to end."""
    return _pack(symbols, segments, nesting_ratio, coset_packing(nesting_ratio))


def unpack_cosets_segments(packed: torch.Tensor, segments: Segments, nesting_ratio: int) -> torch.Tensor:
    """Inverse of :func:`pack_cosets_segments` (:func:`.ops.unpack_cosets` of every segment)."""
    return _pack(packed, segments, nesting_ratio, coset_packing(nesting_ratio), unpack=True)


def qsgd_encode_segments(g: torch.Tensor, norm: torch.Tensor, segments: Segments, levels: int) -> torch.Tensor:
    """Every segment's QSGD levels with its scales and key (:func:`.ops.qsgd_encode`), end to end."""
    vec("g", g, torch.float32, segments.elements)
    vec("norm", norm, torch.float32, sum(segments.buckets))
    levels = integer("levels", levels, 1, 127)
    out = torch.empty(segments.elements, dtype=torch.int8, device=g.device)
    _, _, sender, ranks, k0, k1 = segments.key.words()
    launch_segments(table.qsgd_encode, segments, g, norm, segments.bucket, levels, out, sender, ranks, k0, k1)
    return out


def scale_decode_segments(codes: torch.Tensor, scale: torch.Tensor, segments: Segments, levels: int) -> torch.Tensor:
    """Every segment's scale_b · k_i / s (:func:`.ops.scale_decode`), end to end."""
    vec("codes", codes, torch.int8, segments.elements)
    vec("scale", scale, torch.float32, sum(segments.buckets))
    levels = integer("levels", levels, 1, 127)
    out = torch.empty(segments.elements, dtype=torch.float32, device=codes.device)
    launch_segments(table.scale_decode, segments, codes, scale, segments.bucket, levels, out)
    return out


def onebit_column_means_segments(g: torch.Tensor, segments: Segments, cols: tuple[int, ...]
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every segment's 1-bit column means (:func:`.ops.onebit_column_means` with its ``cols``; an
    empty segment has one column of zeros), the segments' columns end to end; two launches."""
    vec("g", g, torch.float32, segments.elements)
    for n, c in zip(segments.lengths, cols, strict=True):
        if c < 1 or n % c:
            raise ValueError(f"a segment of {n} elements cannot have {c} columns")
    lanes = tuple(onebit_lanes(n // c, c) if n else 0 for n, c in zip(segments.lengths, cols))
    slots = tuple(lane * c for lane, c in zip(lanes, cols))
    pos = torch.zeros(sum(cols), dtype=torch.float32, device=g.device)  # an empty segment's bins stay 0
    neg = torch.zeros(sum(cols), dtype=torch.float32, device=g.device)
    partial = torch.empty(4 * sum(slots), dtype=torch.float64, device=g.device)
    shares = Shares(buckets=cols, words=tuple(4 * m for m in slots), args=tuple(zip(cols, lanes)))
    launch_segments(table.onebit_lane_sums, segments, g, partial, shares=replace(shares, units=slots))
    launch_segments(table.onebit_column_means, segments, partial, pos, neg,
                    shares=replace(shares, units=tuple(c if n else 0 for n, c in zip(segments.lengths, cols))))
    return pos, neg


def onebit_decode_segments(bits: torch.Tensor, segments: Segments, cols: tuple[int, ...], pos_mean: torch.Tensor,
                           neg_mean: torch.Tensor) -> torch.Tensor:
    """Every segment's ĝ = pos_mean[col] where bit else neg_mean[col] (:func:`.ops.onebit_decode`
    with its ``cols`` and its columns' means), end to end; one launch."""
    vec("bits", bits, torch.uint8, segments.elements)
    vec("pos_mean", pos_mean, torch.float32, sum(cols))
    vec("neg_mean", neg_mean, torch.float32, sum(cols))
    out = torch.empty(segments.elements, dtype=torch.float32, device=bits.device)
    launch_segments(table.onebit_decode, segments, bits, pos_mean, neg_mean, out,
                    shares=Shares(units=segments.lengths, buckets=cols, args=tuple((c, 0) for c in cols)))
    return out


def dqsg_encode_segments(g: torch.Tensor, delta: torch.Tensor, segments: Segments, levels: int) -> torch.Tensor:
    """Every segment's DQSG symbols k + s with its scales and key (:func:`.ops.dqsg_encode` with
    ``symbols=True``), end to end."""
    vec("g", g, torch.float32, segments.elements)
    vec("delta", delta, torch.float32, sum(segments.buckets))
    levels = integer("levels", levels, 1, 127)
    out = torch.empty(segments.elements, dtype=torch.uint8, device=g.device)
    _, _, sender, ranks, k0, k1 = segments.key.words()
    launch_segments(table.dqsg_encode, segments, g, delta, segments.bucket, levels, levels, out, sender, ranks, k0, k1)
    return out


def dqsg_decode_segments(symbols: torch.Tensor, delta: torch.Tensor, segments: Segments, offset: int,
                         senders: int = 1) -> torch.Tensor:
    """Every segment's Δ_b (k − u) from its symbols k + ``offset`` (uint8), or Δ_b (Σ_p k_p − Σ_p u_p)
    from its index sums (int32) over senders key.sender … + ``senders`` − 1 (:func:`.ops.dqsg_decode`
    with its key), end to end."""
    if not isinstance(symbols, torch.Tensor) or symbols.dtype not in (torch.uint8, torch.int32):
        raise TypeError(f"symbols must be a uint8 or int32 tensor, got {getattr(symbols, 'dtype', type(symbols))}")
    vec("symbols", symbols, symbols.dtype, segments.elements)
    vec("delta", delta, torch.float32, sum(segments.buckets))
    offset = integer("offset", offset, 0, 255)
    senders = integer("senders", senders, 1, 1 << 24)
    check_senders(segments.key, senders)
    out = torch.empty(segments.elements, dtype=torch.float32, device=symbols.device)
    _, _, sender, ranks, k0, k1 = segments.key.words()
    launch_segments(table.dqsg_decode, segments, symbols, offset, delta, segments.bucket, int(sender), senders, 1.0,
                    out, ranks, k0, k1)
    return out


def bucket_checksum_segments(k: torch.Tensor, segments: Segments, chosen: tuple[bool, ...] | None = None
                             ) -> torch.Tensor:
    """Σ_j w_j·k_j mod 2^32 per bucket (:func:`.ops.bucket_checksum`) of every segment, or of the
    ``chosen`` ones (one flag per segment) only: their buckets end to end (int64); one launch."""
    if not isinstance(k, torch.Tensor) or k.dtype not in (torch.int8, torch.int32):
        raise TypeError(f"k must be an int8 or int32 tensor, got {getattr(k, 'dtype', type(k).__name__)}")
    vec("k", k, k.dtype, segments.elements)
    chosen = chosen if chosen is not None else (True,) * len(segments.lengths)
    buckets = tuple(nb if keep else 0 for nb, keep in zip(segments.buckets, chosen, strict=True))
    out = torch.empty(sum(buckets), dtype=torch.int64, device=k.device)
    launch_segments(table.bucket_checksum, segments, k, segments.bucket, out, shares=Shares(units=buckets,
                                                                                           buckets=buckets))
    return out


def _ratio_shares(segments: Segments, ratios: tuple[int, ...]) -> Shares:
    """A nested launch over the segments whose nesting ratio (``ratios``, one per segment) is not 0,
    each ratio in arg0."""
    if len(ratios) != len(segments.lengths):
        raise ValueError(f"{len(ratios)} nesting ratios for {len(segments.lengths)} segments")
    ratios = tuple(integer("nesting_ratio", r, 2, 255) if r else 0 for r in ratios)
    return Shares(units=tuple(n if r else 0 for n, r in zip(segments.lengths, ratios)),
                  args=tuple((r or 2, 0) for r in ratios))


def nested_encode_segments(g: torch.Tensor, delta: torch.Tensor, segments: Segments, levels: int,
                           ratios: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
    """The coset symbols (k + ⌊ρ/2⌋) mod ρ of every segment whose nesting ratio ρ (``ratios``) is not
    0 (:func:`.ops.nested_encode` with its key and ρ), into its part of ``out`` (uint8; the other
    segments' parts are left as they are); one launch."""
    vec("g", g, torch.float32, segments.elements)
    vec("delta", delta, torch.float32, sum(segments.buckets))
    vec("out", out, torch.uint8, segments.elements)
    levels = integer("levels", levels, 1, 127)
    _, _, sender, ranks, k0, k1 = segments.key.words()
    launch_segments(table.nested_encode, segments, g, delta, segments.bucket, levels, out, sender, ranks, k0, k1,
                    shares=_ratio_shares(segments, ratios))
    return out


def nested_decode_segments(residues: torch.Tensor, delta: torch.Tensor, segments: Segments, ratios: tuple[int, ...],
                           side: torch.Tensor, senders: int = 1, kout: torch.Tensor | None = None) -> torch.Tensor:
    """The resolved index sums K̂ (int32) of every segment whose nesting ratio ρ (``ratios``, one per
    segment) is not 0, from its residues mod ρ (uint8, or int32: any integers congruent to them) and
    side information (:func:`.ops.nested_decode` with its key and ρ, over senders key.sender … +
    ``senders`` − 1), end to end, into ``kout`` if given; a segment of ratio 0 is not resolved (its
    part of ``kout`` stays as it was: 0 in a new one). One launch."""
    if not isinstance(residues, torch.Tensor) or residues.dtype not in (torch.uint8, torch.int32):
        raise TypeError(f"residues must be a uint8 or int32 tensor, got {getattr(residues, 'dtype', type(residues))}")
    vec("residues", residues, residues.dtype, segments.elements)
    vec("delta", delta, torch.float32, sum(segments.buckets))
    vec("side", side, torch.float32, segments.elements)
    shares = _ratio_shares(segments, ratios)
    senders = integer("senders", senders, 1, 1 << 24)
    check_senders(segments.key, senders)
    resolved = torch.empty(segments.elements, dtype=torch.float32, device=residues.device)  # Σ_p ĝ_p: unused
    if kout is None:
        kout = torch.zeros(segments.elements, dtype=torch.int32, device=residues.device)
    vec("kout", kout, torch.int32, segments.elements)
    _, _, first, ranks, k0, k1 = segments.key.words()
    launch_segments(table.nested_decode, segments, residues, delta, segments.bucket, side, int(first), senders, 1.0,
                    resolved, kout, ranks, k0, k1, shares=shares)
    return kout


def _field_shares(segments: Segments, fields: tuple[tuple[int, int], ...]) -> tuple[tuple[tuple[int, int], ...],
                                                                                 tuple[int, ...]]:
    """Each segment's (radix, fields per word), checked, and its summable words."""
    if len(fields) != len(segments.lengths):
        raise ValueError(f"{len(fields)} field layouts for {len(segments.lengths)} segments")
    fields = tuple(_fields(radix, per_word) for radix, per_word in fields)
    return fields, tuple(-(-n // f) for n, (_, f) in zip(segments.lengths, fields))


def pack_sum_fields_segments(codes: torch.Tensor, segments: Segments, fields: tuple[tuple[int, int], ...],
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Every segment's codes (uint8, each below its radix) in summable words of its own radix and
    fields per word (``fields``, one (R, F) per segment; :func:`.ops_fields.pack_sum_fields` with
    offset 0), the words end to end in ``out``; one launch."""
    vec("codes", codes, torch.uint8, segments.elements)
    fields, words = _field_shares(segments, fields)
    out = output(out, "out", sum(words), torch.float64, codes)
    launch_segments(table.pack_sum_fields, segments, codes, 0, out, shares=Shares(units=words, words=words,
                                                                                   args=fields))
    return out


@functools.lru_cache(maxsize=64)
def _inverse_tables(fields: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """The digit splitter's tables fl(1/R^j), j ≤ F, of every segment's (R, F), end to end (made once)."""
    return torch.cat([_radix_inverses(radix, per_word, device) for radix, per_word in fields])


def unpack_sum_fields_segments(words: torch.Tensor, segments: Segments, fields: tuple[tuple[int, int], ...],
                               factor: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`pack_sum_fields_segments` after a reduction that returned ``factor`` × the
    sum: every segment's sums of codes (int32, :func:`.ops_fields.unpack_sum_fields` with offset 0),
    end to end; one launch."""
    fields, counts = _field_shares(segments, fields)
    vec("words", words, torch.float64, sum(counts))
    out = torch.empty(segments.elements, dtype=torch.int32, device=words.device)
    inverses = _inverse_tables(fields, words.device)
    launch_segments(table.unpack_sum_fields, segments, words, np.float64(factor), inverses, 0, out,
                    shares=Shares(units=counts, words=counts, buckets=tuple(f + 1 for _, f in fields), args=fields))
    return out
