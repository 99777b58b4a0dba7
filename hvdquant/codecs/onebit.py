"""1-bit SGD (Seide et al. 2014; docs/ALGORITHMS.md §5): one bit per coordinate (g ≥ 0), each bit
reconstructed as the mean of its bin in its column, two float32 per column.

The tensor is viewed as (rows, cols) with rows = shape[0] (a 1-D tensor is one column). Without
error feedback it does not converge: :class:`OneBitSGD` is this quantizer wrapped in
:class:`~hvdquant.codecs.feedback.ErrorFeedback`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hvdquant.codecs.base import Codec, Encoded, Layout, TensorContext, all_finite, each_finite, flat32
from hvdquant.codecs.feedback import ErrorFeedback
from hvdquant.codecs.grouped import GroupDecoding
from hvdquant.kernels import ops, sizes
from hvdquant.kernels.segments import Segments


def columns(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) >= 2 else 1


@dataclass(frozen=True)
class OneBitQuantizer(GroupDecoding, Codec):
    scheme = "onebit-quantizer"

    def layout(self, n: int, ctx: TensorContext) -> Layout:
        c = columns(ctx.shape)
        return [("pos_mean", torch.float32, c), ("neg_mean", torch.float32, c),
                ("bits", torch.uint8, sizes.packed_bytes(n, 1))]

    def formula_bits(self, n: int, ctx: TensorContext) -> float:
        return (64.0 * columns(ctx.shape) + 8 * sizes.packed_bytes(n, 1)) / n if n else 0.0

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        flat = flat32(g)
        if not all_finite(flat):
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        c = columns(ctx.shape) if flat.numel() else 1
        pos, neg = ops.onebit_column_means(flat, c)
        bits = ops.onebit_encode(flat)
        return Encoded(flat.numel(), {"pos_mean": pos, "neg_mean": neg, "bits": ops.bitpack(bits, 1)},
                       symbols=bits, alphabet=2, side_bits=64.0 * c)

    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        bits = ops.bitunpack(enc.fields["bits"], 1, enc.n)
        return ops.onebit_decode(bits, max(1, enc.fields["pos_mean"].numel()), enc.fields["pos_mean"],
                                 enc.fields["neg_mean"])

    # ------------------------------------------------------------- a fused group at once
    def encode_group(self, parts: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """:meth:`encode` of every part with the same bits in a constant number of launches (column
        means, bits, packing: :mod:`hvdquant.kernels.ops_segments`)."""
        if not self.grouped(ctxs):
            return super().encode_group(parts, ctxs)
        flats = [flat32(g) for g in parts]
        lengths = tuple(f.numel() for f in flats)
        cols = tuple(columns(c.shape) if n else 1 for c, n in zip(ctxs, lengths))
        source = torch.cat(flats)
        finite = each_finite(source, flats)
        segs = Segments(lengths, tuple(c.key for c in ctxs), 1)
        pos, neg = ops.onebit_column_means_segments(source, segs, cols)
        bits = ops.onebit_encode(source)
        packed = ops.bitpack_segments(bits, segs, 1)
        counts = ops.segment_histograms(bits, segs, 2).cpu()  # the entropy statistic's, in one pass
        return [Encoded(n, {"pos_mean": p, "neg_mean": q, "bits": b}, counts=k, side_bits=64.0 * c)
                if ok else None
                for n, c, p, q, b, k, ok in zip(lengths, cols, pos.split(cols), neg.split(cols),
                                                packed.split([sizes.packed_bytes(n, 1) for n in lengths]),
                                                counts, finite)]

    def decode_flat(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext], sender: int | None = None
                    ) -> torch.Tensor:
        """Every payload decoded, end to end (two launches); no dither, so the same for every ``sender``."""
        segs = Segments(tuple(e.n for e in encs), tuple(c.key for c in ctxs), 1)
        bits = ops.bitunpack_segments(torch.cat([e.fields["bits"] for e in encs]), segs, 1)
        cols = tuple(max(1, e.fields["pos_mean"].numel()) for e in encs)
        return ops.onebit_decode_segments(bits, segs, cols, torch.cat([e.fields["pos_mean"] for e in encs]),
                                          torch.cat([e.fields["neg_mean"] for e in encs]))


@dataclass(frozen=True)
class OneBitSGD(ErrorFeedback):
    """Seide's 1-bit SGD: sign bits, per-column bin means, error feedback."""

    codec: Codec = field(default_factory=OneBitQuantizer, init=False)

    scheme = "onebit"

    def config(self) -> dict:
        return {"scheme": "onebit"}
