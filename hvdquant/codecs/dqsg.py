"""DQSG: subtractive dithered quantization of stochastic gradients (docs/ALGORITHMS.md §1, §3).

Per bucket b of ``bucket_size`` (d) coordinates, with ``levels`` (s) levels:

    Δ_b = max_i |g_i| / s                        (own bucket; or common to all ranks, §3)
    k_i = round(g_i / Δ_b + u_i) ∈ {-s, …, s}    (u_i ~ U(-1/2, 1/2) from the keyed Philox stream)
    ĝ_i = Δ_b (k_i − u_i)                        (decoder regenerates u_i from the same key)

The error ĝ − g is uniform on (−Δ/2, Δ/2], independent of g, unbiased, of variance Δ²/12.
With one Δ_b shared by P ranks, Σ_p ĝ_p = Δ_b (Σ_p k_p − Σ_p u_p): integer indices can be summed
by any transport and decoded once (variance of the mean Δ²/(12P)).

``dither="stratified"`` (the default; docs/ALGORITHMS.md §9) gives rank p of P the dither
u_p = (π(p) + v)/P − ½ (v and the permutation π shared per coordinate): every u_p is still uniform,
so each rank's error keeps the properties above, and Σ_p u_p = v − ½ is one stream whatever P; the
ranks' errors partly cancel in the mean (docs/BENCHMARKS.md, "Dither families").
``dither="independent"`` is the paper's dither: one Philox stream per sender, so decoding a sum
regenerates P streams.

``rotation="hadamard"`` (docs/ALGORITHMS.md §10) quantizes R g instead of g, R a randomized
Hadamard transform of each bucket whose signs every rank draws from the stream (seed, step, tensor),
and decodes R⁻¹(ĝ'): a heavy-tailed bucket's peak-to-average ratio, and with it Δ_b, shrinks to
that of a Gaussian one. R is linear and shared, so a mean over senders is rotated back once.

Payload (one sender): Δ_b as float32 per bucket, then the symbols k + s packed densely
(base 3 for s = 1: 1.6 bits; otherwise ⌈log2(2s+1)⌉ bits or base-(2s+1) bytes, whichever is
smaller); or with ``coding="rans"`` (docs/ALGORITHMS.md §11) entropy coded: the table of the
symbols' frequencies (2s + 1 int16), the byte count of each chunk of 8192 symbols (int32) and the
rANS stream, about the symbols' zeroth-order entropy per coordinate — fewer bytes wherever the
symbols are far from uniform, as they are after a rotation. Fixed-rate encoding (scales, dither,
indices, packing) and decoding (unpacking, Δ(k − u)) each run as one fused kernel pass; the
arithmetic lives in :mod:`hvdquant.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from hvdquant.codecs.base import (
    Codec,
    Encoded,
    Layout,
    Recover,
    TensorContext,
    all_finite,
    check_int,
    each_finite,
    flat32,
)
from hvdquant.codecs.grouped import GroupDecoding
from hvdquant.codecs.rotation import ROTATIONS, Rotation
from hvdquant.kernels import DitherKey, ops, sizes
from hvdquant.kernels.segments import Segments
from hvdquant.stats import DecodeStats

DITHERS = ("independent", "stratified")
CODINGS = ("fixed", "rans")
MAX_RANS_GROUP = 256  # tensors of one rANS launch over a group (a symbol's context, its tensor, is one byte)


class DitheredBuckets:
    """What the dithered quantizers (DQSG, ECDQ) share: buckets of ``bucket_size``, a dither family
    and a shared rotation of the buckets."""

    bucket_size: int
    dither: str
    rotation: str

    def keyed(self, key: DitherKey, ranks: int) -> DitherKey:
        """The key of this sender's dither among ``ranks`` ranks: ``key`` itself for the independent
        dither, its stratified form otherwise (the stratified dither depends on P)."""
        return key.stratified(ranks) if self.dither == "stratified" else key

    @property
    def rotator(self) -> Rotation:
        """The shared rotation of the buckets (:class:`~hvdquant.codecs.rotation.Rotation`)."""
        return Rotation(self.rotation, self.bucket_size)

    def num_buckets(self, n: int) -> int:
        return sizes.num_buckets(n, self.bucket_size)

    # a fused group's segment tables (:mod:`hvdquant.kernels.ops_segments`)
    def segments(self, ctxs: Sequence[TensorContext], lengths: Sequence[int], sender: int | None = None,
                 keyed: bool = True) -> Segments:
        """The group's segment table: each tensor's dither key (of ``sender`` where given; its
        stratified form with ``keyed``, as the quantizer draws it; as it is for the rotation)."""
        keys = [c.key if sender is None else c.key.for_sender(sender) for c in ctxs]
        return Segments(tuple(lengths), tuple(self.keyed(k, c.ranks) if keyed else k for k, c in zip(keys, ctxs)),
                        self.bucket_size)

    def rotate_group(self, flat: torch.Tensor, ctxs: Sequence[TensorContext], lengths: Sequence[int]) -> torch.Tensor:
        """R of every tensor of ``flat`` (the group's tensors end to end; one launch), or ``flat``."""
        if self.rotation == "none":
            return flat
        return ops.hadamard_rotate_segments(flat, self.segments(ctxs, lengths, keyed=False))

    def unrotate_group(self, flat: torch.Tensor, ctxs: Sequence[TensorContext], lengths: list[int]
                       ) -> list[torch.Tensor]:
        """R⁻¹ of every tensor of ``flat`` in place (one launch), as one flat tensor each."""
        if self.rotation != "none":
            ops.hadamard_rotate_segments(flat, self.segments(ctxs, lengths, keyed=False), inverse=True, out=flat)
        return list(flat.split(lengths))


@dataclass(frozen=True)
class DQSG(DitheredBuckets, GroupDecoding, Codec):
    """Dithered quantizer with ``levels`` = s (2s+1 symbols) and buckets of ``bucket_size`` = d."""

    levels: int = 1
    bucket_size: int = 512
    dither: str = "stratified"
    rotation: str = "none"
    coding: str = "fixed"

    scheme = "dqsg"
    summable = True

    def __post_init__(self) -> None:
        check_int("DQSG", "levels", self.levels, 1, 127)
        check_int("DQSG", "bucket_size", self.bucket_size, 1, 1 << 30)
        if self.dither not in DITHERS:
            raise ValueError(f"DQSG dither must be one of {DITHERS}, got {self.dither!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"DQSG rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.coding not in CODINGS:
            raise ValueError(f"DQSG coding must be one of {CODINGS}, got {self.coding!r}")

    def rotate(self, g: torch.Tensor, key: DitherKey) -> torch.Tensor:
        """R g (a rotated copy; float32, flat) with the signs of (key.seed, key.step, key.tensor_id),
        or ``g`` itself without rotation."""
        return self.rotator.rotate(flat32(g), key)

    def unrotate(self, x: torch.Tensor, key: DitherKey) -> torch.Tensor:
        """R⁻¹ x in place (x: flat float32, owned by the caller); ``x`` unchanged without rotation."""
        return self.rotator.unrotate(x, key)

    @property
    def symbols(self) -> int:
        """Alphabet size 2s + 1."""
        return 2 * self.levels + 1

    def entropy_bound_bits(self) -> float:
        """log2(2s+1) + 32/d: the nominal bits per coordinate of one sender (docs/ALGORITHMS.md §1)."""
        return math.log2(self.symbols) + 32.0 / self.bucket_size

    # ------------------------------------------------------------- common-scale (summable) form
    def bucket_absmax(self, g: torch.Tensor) -> torch.Tensor:
        """max |g_i| per bucket (float32; NaN reported as +inf so a max-reduction keeps it)."""
        return ops.bucket_absmax(flat32(g), self.bucket_size)

    def step_size(self, absmax: torch.Tensor) -> torch.Tensor:
        """Δ_b = absmax_b / s (float32, by the kernels: the same bits on CPU and GPU). Callers check
        finiteness first."""
        return ops.bucket_step(absmax.to(torch.float32).contiguous().reshape(-1), self.levels)

    def quantize(self, g: torch.Tensor, delta: torch.Tensor, key: DitherKey, symbols: bool = False) -> torch.Tensor:
        """Indices k ∈ [-s, s] (int8, flat), or k + s as uint8 with ``symbols=True``."""
        return ops.dqsg_encode(flat32(g), delta.contiguous(), self.bucket_size, self.levels, key, symbols=symbols)

    def decode_sum(self, ksum: torch.Tensor, delta: torch.Tensor, key: DitherKey, senders: int = 1,
                   factor: float = 1.0) -> torch.Tensor:
        """factor · Σ_p ĝ_p for senders key.sender … key.sender+senders−1 from their summed indices."""
        return ops.dqsg_decode(ksum.to(torch.int32).contiguous(), delta.contiguous(), self.bucket_size, key,
                               senders=senders, factor=factor)

    # ------------------------------------------------------------- payload form (own scale)
    def layout(self, n: int, ctx: TensorContext | None = None) -> Layout:
        if self.coding == "rans":
            return [("delta", torch.float32, self.num_buckets(n)), ("freq", torch.int16, self.symbols),
                    ("lengths", torch.int32, ops.rans_chunks(n)), ("stream", torch.uint8, None)]
        return [("delta", torch.float32, self.num_buckets(n)),
                ("symbols", torch.uint8, sizes.symbol_bytes(n, self.symbols))]

    def formula_bits(self, n: int, ctx: TensorContext | None = None) -> float:
        """The fixed-rate payload's bits per coordinate (exact for ``coding="fixed"``; the entropy-coded
        payload's size depends on the symbols: measured, it undercuts this wherever their entropy is
        below the packing's rate)."""
        return 8.0 * (4 * self.num_buckets(n) + sizes.symbol_bytes(n, self.symbols)) / n if n else 0.0

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        """Scales, dithered indices and packing in one pass (:func:`ops.dqsg_encode_packed`); or, with
        ``coding="rans"``, the symbols k + s and their histogram, entropy coded with it
        (:func:`ops.rans_encode`)."""
        flat = self.rotate(flat32(g), ctx.key)
        key = self.keyed(ctx.key, ctx.ranks)
        if self.coding == "rans":
            delta = self.step_size(self.bucket_absmax(flat))
            if not all_finite(delta):
                raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
            symbols = self.quantize(flat, delta, key, symbols=True)
            counts = torch.bincount(symbols, minlength=self.symbols)
            freq, lengths, stream = ops.rans_encode(symbols, counts)
            return Encoded(flat.numel(), {"delta": delta, "freq": freq.to(flat.device), "lengths": lengths,
                                          "stream": stream}, counts=counts, side_bits=32.0 * delta.numel())
        delta, packed, counts = ops.dqsg_encode_packed(flat, self.bucket_size, self.levels, key)
        if not all_finite(delta):
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        return Encoded(flat.numel(), {"delta": delta, "symbols": packed}, counts=counts,
                       side_bits=32.0 * delta.numel())

    def symbols_of(self, enc: Encoded) -> torch.Tensor:
        """The payload's symbols k + s (uint8, one per coordinate), unpacked or entropy decoded."""
        if self.coding == "rans":
            return ops.rans_decode(enc.fields["freq"], enc.fields["lengths"], enc.fields["stream"], enc.n)
        return ops.unpack_symbols(enc.fields["symbols"], self.symbols, enc.n)

    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        """Unpacking and Δ(k − u) in one pass (:func:`ops.dqsg_decode_packed`), rotated back; entropy
        coded symbols are decoded first, then Δ(k − u) (:func:`ops.dqsg_decode` with offset s)."""
        key, delta = self.keyed(ctx.key, ctx.ranks), enc.fields["delta"].contiguous()
        if self.coding == "rans":
            out = ops.dqsg_decode(self.symbols_of(enc), delta, self.bucket_size, key, offset=self.levels)
        else:
            out = ops.dqsg_decode_packed(enc.fields["symbols"], delta, self.bucket_size, self.levels, key, enc.n)
        return self.unrotate(out, ctx.key)

    # ------------------------------------------------------------- a fused group at once
    def grouped(self, ctxs: Sequence[TensorContext]) -> bool:
        """A group runs the segmented kernels (:class:`GroupDecoding`)."""
        return super().grouped(ctxs)

    def aggregates_by_sender(self, ranks: int) -> bool:
        """Not under the stratified dither with P not a power of 2 (:meth:`aggregate`'s joint pass)."""
        return self.dither == "independent" or ranks & (ranks - 1) == 0

    def encode_group(self, parts: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """:meth:`encode` of every part with the same bits, in one launch per phase for the whole
        group (rotation, scales, the fused quantize-and-pack pass:
        :func:`ops.dqsg_encode_packed_segments`)."""
        if not self.grouped(ctxs):
            return super().encode_group(parts, ctxs)
        flats = [flat32(g) for g in parts]
        lengths = [f.numel() for f in flats]
        source = self.rotate_group(torch.cat(flats), ctxs, lengths)
        segs = self.segments(ctxs, lengths)
        if self.coding == "rans":
            delta = self.step_size(ops.bucket_absmax_segments(source, segs))
            if not all_finite(delta):  # its symbols could not be coded: tensor by tensor, refusing it alone
                return super().encode_group(parts, ctxs)
            return self._rans_group(source, delta, segs)
        delta, packed, counts = ops.dqsg_encode_packed_segments(source, segs, self.levels)
        deltas = delta.split(segs.buckets)
        symbols = packed.split([sizes.symbol_bytes(n, self.symbols) for n in lengths])
        finite = each_finite(delta, deltas)
        return [Encoded(n, {"delta": d, "symbols": k}, counts=torch.tensor(c), side_bits=32.0 * d.numel()) if ok
                else None for n, d, k, c, ok in zip(lengths, deltas, symbols, counts, finite)]

    def _rans_group(self, source: torch.Tensor, delta: torch.Tensor, segs: Segments) -> list[Encoded]:
        """The entropy-coded payloads of a group (:meth:`encode` with ``coding="rans"``): symbols, each
        tensor's histogram and table, and one rANS launch whose contexts name the tensors."""
        symbols = ops.dqsg_encode_segments(source, delta, segs, self.levels)
        counts = ops.segment_histograms(symbols, segs, self.symbols)
        freq = torch.stack([ops.rans_table(c) for c in counts.cpu()])
        lengths, streams = [], []
        for members, sub, (lo, hi) in _table_groups(segs):
            chunk_lengths, stream = ops.rans_encode_modelled(symbols[lo:hi], self._tables(freq[members]),
                                                             ops.segment_ids(sub, source.device, torch.uint8), sub)
            for acc, part in zip((lengths, streams), ops.rans_split(chunk_lengths, stream, sub)):
                acc += part
        return [Encoded(n, {"delta": d, "freq": f, "lengths": ln, "stream": st}, counts=c, side_bits=32.0 * d.numel())
                for n, d, f, ln, st, c in zip(segs.lengths, delta.split(segs.buckets), freq.to(source.device),
                                              lengths, streams, counts)]

    def _tables(self, freq: torch.Tensor) -> ops.RansTables:
        """The group's rANS tables, one row of ``freq`` per tensor (an empty tensor's all-zero row,
        which codes nothing, replaced by a valid one)."""
        rows = freq.cpu()
        empty = rows.to(torch.int64).sum(1, keepdim=True) == 0
        return ops.RansTables(torch.where(empty, ops.rans_table(torch.ones(self.symbols)), rows))

    def decode_flat(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext], sender: int | None = None
                    ) -> torch.Tensor:
        """Every payload's Δ(k − u), not rotated back, end to end (one launch; entropy-coded
        payloads: their rANS chunks in one launch first)."""
        segs = self.segments(ctxs, [e.n for e in encs], sender)
        delta = torch.cat([e.fields["delta"] for e in encs])
        if self.coding == "rans":
            symbols = torch.cat([
                ops.rans_decode(self._tables(torch.stack([encs[i].fields["freq"] for i in members])),
                                torch.cat([encs[i].fields["lengths"] for i in members]),
                                torch.cat([encs[i].fields["stream"] for i in members]), hi - lo,
                                contexts=ops.segment_ids(sub, delta.device, torch.uint8), segments=sub)
                for members, sub, (lo, hi) in _table_groups(segs)])
            return ops.dqsg_decode_segments(symbols, delta, segs, self.levels)
        packed = torch.cat([e.fields["symbols"] for e in encs])
        return ops.dqsg_decode_packed_segments(packed, delta, segs, self.levels)

    def finish_flat(self, flat: torch.Tensor, ctxs: Sequence[TensorContext], lengths: list[int]
                    ) -> list[torch.Tensor]:
        return self.unrotate_group(flat, ctxs, lengths)

    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        """Mean of all senders' reconstructions Δ_p(k_p − u_p), summed in sender order. Each sender
        has its own scales, so every u_p is formed: one vectorized decode per sender, except under
        the stratified dither with P not a power of 2, where one kernel pass generating the shared
        words once per coordinate for all senders is faster (docs/BENCHMARKS.md, dither families).
        With a rotation the mean is formed in the rotated coordinates and rotated back once."""
        if self.rotation != "none":
            mean, stats = replace(self, rotation="none").aggregate(payloads, ctx, recover)
            return self.unrotate(mean, ctx.key), stats
        if self.dither == "independent" or ctx.ranks & (ctx.ranks - 1) == 0:
            return super().aggregate(payloads, ctx, recover)
        sym = torch.stack([self.symbols_of(e) for e in payloads])
        delta = torch.stack([e.fields["delta"] for e in payloads])
        key = self.keyed(ctx.key.for_sender(0), ctx.ranks)
        mean = ops.dqsg_aggregate(sym, delta, self.bucket_size, key, factor=1.0 / len(payloads), offset=self.levels)
        return mean, DecodeStats()


def _table_groups(segs: Segments) -> list[tuple[list[int], Segments, tuple[int, int]]]:
    """The tensors of ``segs`` in runs of at most MAX_RANS_GROUP (one rANS launch each: a symbol's
    context names its tensor's table in one byte): each run's members, their segments and their
    elements' range end to end."""
    starts = segs.offsets(list(segs.lengths))
    out = []
    for first in range(0, len(segs.lengths), MAX_RANS_GROUP):
        members = list(range(first, min(first + MAX_RANS_GROUP, len(segs.lengths))))
        out.append((members, segs.subset(members), (starts[members[0]], starts[members[-1] + 1])))
    return out
