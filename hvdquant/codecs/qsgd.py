"""QSGD: stochastic quantization to s levels per bucket (Alistarh et al., QSGD; docs/ALGORITHMS.md §4).

    Q_s(v)_i = ‖v_b‖ · sgn(v_i) · ξ_i / s,   ξ_i = ⌊s|v_i|/‖v_b‖ + U⌋,  U ~ U(0, 1)

with ‖·‖ the bucket's L2 norm (``norm="l2"``, the paper) or max norm (``norm="max"``). Unbiased;
E‖Q(v)‖² ≤ (1 + min(d/s², √d/s))‖v‖². The U are drawn from the keyed Philox stream (added, not
subtracted: this is QSGD, not dithered quantization).

Payload: one float32 norm per bucket, then the levels either as fixed-width symbols k + s
(``coding="fixed"``) or as the Elias recursive stream of the QSGD paper (``coding="elias"``: ω(nnz+1),
then per nonzero ω(gap), a sign bit, ω(level); variable length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hvdquant.codecs.base import Codec, Encoded, Layout, TensorContext, all_finite, check_int, each_finite, flat32
from hvdquant.codecs.grouped import GroupDecoding
from hvdquant.kernels import elias, ops, sizes
from hvdquant.kernels.segments import Segments


@dataclass(frozen=True)
class QSGD(GroupDecoding, Codec):
    levels: int = 1
    bucket_size: int = 512
    norm: str = "l2"
    coding: str = "elias"

    scheme = "qsgd"

    def __post_init__(self) -> None:
        check_int("QSGD", "levels", self.levels, 1, 127)
        check_int("QSGD", "bucket_size", self.bucket_size, 1, 1 << 30)
        if self.norm not in ("l2", "max"):
            raise ValueError(f"QSGD norm={self.norm!r} must be 'l2' or 'max'")
        if self.coding not in ("elias", "fixed"):
            raise ValueError(f"QSGD coding={self.coding!r} must be 'elias' or 'fixed'")

    @property
    def symbols(self) -> int:
        return 2 * self.levels + 1

    def layout(self, n: int, ctx: TensorContext | None = None) -> Layout:
        nb = sizes.num_buckets(n, self.bucket_size)
        tail = None if self.coding == "elias" else sizes.symbol_bytes(n, self.symbols)
        return [("norm", torch.float32, nb), ("levels", torch.uint8, tail)]

    def formula_bits(self, n: int, ctx: TensorContext | None = None) -> float:
        """Fixed coding: exact. Elias: the QSGD paper's bound on the expected size for one bucket of n
        (sublinear regime), F + (3 + 1.5·log2(2(s²+n)/(s²+√n)))·(s²+√n), F = 32."""
        if not n:
            return 0.0
        nb = sizes.num_buckets(n, self.bucket_size)
        if self.coding == "fixed":
            return 8.0 * (4 * nb + sizes.symbol_bytes(n, self.symbols)) / n
        total = 0.0
        for b in range(nb):
            d = min(self.bucket_size, n - b * self.bucket_size)
            s2 = self.levels ** 2
            m = s2 + d ** 0.5
            total += 32 + (3 + 1.5 * torch.log2(torch.tensor(2 * (s2 + d) / m)).item()) * m
        return total / n

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        flat = flat32(g)
        scale = (ops.bucket_l2 if self.norm == "l2" else ops.bucket_absmax)(flat, self.bucket_size)
        if not all_finite(scale):
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        codes = ops.qsgd_encode(flat, scale, self.bucket_size, self.levels, ctx.key)
        sym = (codes + self.levels).view(torch.uint8)
        if self.coding == "fixed":
            levels = ops.pack_symbols(sym, self.symbols)
        else:
            levels, _ = elias.encode(codes)
        return Encoded(flat.numel(), {"norm": scale, "levels": levels}, symbols=sym, alphabet=self.symbols,
                       side_bits=32.0 * scale.numel())

    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        if self.coding == "fixed":
            codes = (ops.unpack_symbols(enc.fields["levels"], self.symbols, enc.n).view(torch.int8) - self.levels)
        else:
            codes = elias.decode(enc.fields["levels"], enc.n)
        return ops.scale_decode(codes.contiguous(), enc.fields["norm"], self.bucket_size, self.levels)

    # ------------------------------------------------------------- a fused group at once
    def encode_group(self, parts: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """:meth:`encode` of every part with the same bits in a constant number of launches (norms,
        levels, packing: :mod:`hvdquant.kernels.ops_segments`); Elias streams are coded tensor by
        tensor on the host, from one copy of the group's levels."""
        if not self.grouped(ctxs):
            return super().encode_group(parts, ctxs)
        flats = [flat32(g) for g in parts]
        lengths = tuple(f.numel() for f in flats)
        segs = Segments(lengths, tuple(c.key for c in ctxs), self.bucket_size)
        source = torch.cat(flats)
        scale = (ops.bucket_l2_segments if self.norm == "l2" else ops.bucket_absmax_segments)(source, segs)
        scales = scale.split(segs.buckets)
        finite = each_finite(scale, scales)
        codes = ops.qsgd_encode_segments(source, scale, segs, self.levels)
        sym = (codes + self.levels).view(torch.uint8)
        if self.coding == "fixed":
            streams = ops.pack_symbols_segments(sym, segs, self.symbols).split(
                [sizes.symbol_bytes(n, self.symbols) for n in lengths])
        else:
            host = [elias.encode(c)[0] if ok else torch.empty(0, dtype=torch.uint8)  # refused below
                    for c, ok in zip(codes.cpu().split(lengths), finite)]
            streams = torch.cat(host).to(source.device).split([h.numel() for h in host])
        counts = ops.segment_histograms(sym, segs, self.symbols).cpu()  # the entropy statistic's, in one pass
        return [Encoded(n, {"norm": sc, "levels": st}, counts=ct, side_bits=32.0 * sc.numel())
                if ok else None for n, sc, st, ct, ok in zip(lengths, scales, streams, counts, finite)]

    def decode_flat(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext], sender: int | None = None
                    ) -> torch.Tensor:
        """Every payload decoded, end to end (two launches; Elias streams decoded on the host from
        one copy, the levels copied back at once); no dither, so the same for every ``sender``."""
        segs = Segments(tuple(e.n for e in encs), tuple(c.key for c in ctxs), self.bucket_size)
        levels = torch.cat([e.fields["levels"] for e in encs])
        if self.coding == "fixed":
            codes = ops.unpack_symbols_segments(levels, segs, self.symbols).view(torch.int8) - self.levels
        else:
            streams = levels.cpu().split([e.fields["levels"].numel() for e in encs])
            codes = torch.cat([elias.decode(st, e.n) for st, e in zip(streams, encs)]).to(levels.device)
        return ops.scale_decode_segments(codes.contiguous(), torch.cat([e.fields["norm"] for e in encs]), segs,
                                         self.levels)
