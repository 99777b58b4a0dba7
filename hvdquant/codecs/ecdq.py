"""ECDQ: entropy-coded dithered quantization, the symbols coded under a model that knows the dither
(docs/ALGORITHMS.md §12; R. Zamir and M. Feder, "On universal quantization by randomized
uniform/lattice quantizers", IEEE Trans. Inf. Theory, 1992).

Per bucket b of ``bucket_size`` (d) coordinates of the (by default rotated) gradient x, with
σ_b = ‖x_b‖₂·d^-½ and u_i ~ U(−½, ½) the keyed dither of DQSG:

    k_i = round(x_i / Δ_b + u_i),   x̂_i = Δ_b (k_i − u_i)

As in DQSG the error x̂ − x is uniform on (−Δ_b/2, Δ_b/2], independent of x, unbiased, of variance
Δ_b²/12 per coordinate, and no index is ever clipped. ``step`` trades bits for error continuously;
``scope`` says what it scales:

- ``"tensor"``: Δ_b = step·σ·4^e_b, σ = bf16(√(mean_b σ_b²)) the tensor's RMS (sent:
  16 bits per tensor), e_b = 0 unless the bucket holds a coordinate beyond TENSOR_CAP·step·σ (then
  the least e_b ≤ 7 that brings it within). Every bucket but those few gets the same absolute error
  step²σ²/12: the allocation that minimises the total error for the bits (reverse water-filling:
  quiet buckets cost almost nothing, loud ones pay for their energy), and the normalised error
  is step²/12 as in the bucket scope. Each bucket sends one byte, its exponent e_b and the class
  of its relative step Δ_b/σ_b, which picks the tables its symbols are coded with
  (:mod:`.ecdq_model`); a bucket of zeros sends ZERO_BUCKET and decodes to exact zeros (Δ_b = 0),
  as in the bucket scope. The price of the allocation: a quiet coordinate's error is as large as a
  loud one's, which an optimizer that divides each coordinate's step by its own gradient history
  (Adam) turns into steps of noise: on the language-model job (AdamW) the same step trains worse
  than the bucket scope's, while SGD trains as well with either (docs/RESULTS.md, "ECDQ's step
  scope and the time to quality").
- ``"bucket"`` (the default): Δ_b = step·σ_b with σ_b sent as bfloat16 (16 bits per bucket): the
  same relative error in every bucket, one set of tables.

The symbols are entropy coded with rANS, symbol i with a table chosen by which interval its dither
u_i falls in (and, in the tensor scope, its bucket's class); the receiver regenerates u_i before
decoding it. Its cost is about the conditional entropy H(k | u), below the entropy H(k) that a
coder ignoring the dither pays (docs/ALGORITHMS.md §12: 0.1–0.25 bits per coordinate at 1–2 bits). The
tables are computed once per process from ``math.erfc`` in float64 and never travel. (Ranks whose
C library rounded erfc differently could disagree on a table; the rANS decoder's end-of-chunk check
then refuses the stream.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hvdquant.codecs.base import (
    Codec,
    Encoded,
    Layout,
    Recover,
    TensorContext,
    all_finite,
    check_int,
    flat32,
)
from hvdquant.codecs.dqsg import DITHERS, DitheredBuckets
from hvdquant.codecs.ecdq_model import (
    BUCKET_BINS,
    CLASSES,
    TENSOR_BINS,
    TENSOR_CAP,
    TENSOR_HALF_WIDTH,
    bucket_half_width,
    class_edges,
    code_length,
    rans_model,
)
from hvdquant.codecs.grouped import GroupDecoding
from hvdquant.codecs.rotation import ROTATIONS
from hvdquant.kernels import ops
from hvdquant.kernels.segments import Segments, by_segment
from hvdquant.stats import DecodeStats

SCOPES = ("bucket", "tensor")
SCALE_BITS = 16  # σ_b (bucket scope) or σ (tensor scope) travels as bfloat16
MAX_EXPONENT = 7  # the tensor scope's Δ_b = step·σ·4^e_b, e_b ≤ 7 (3 bits of the bucket's byte)
ZERO_BUCKET = 255  # the tensor scope's byte of a bucket of zeros: Δ_b = 0, decoded as exact zeros


@functools.lru_cache(maxsize=8)
def _powers_of_four(device: torch.device) -> torch.Tensor:
    """4^e for e = 0 … MAX_EXPONENT (float32, exact; made once per device, read only): multiplying by
    one is exact on every device (unlike a pow or ldexp kernel, whose accuracy a device's math
    library decides)."""
    return torch.tensor([4.0 ** e for e in range(MAX_EXPONENT + 1)], dtype=torch.float32, device=device)


@dataclass(frozen=True)
class ECDQ(DitheredBuckets, GroupDecoding, Codec):
    """Dithered quantizer of step Δ_b per bucket of ``bucket_size`` coordinates (``scope``: ``step``
    times the tensor's RMS, or times the bucket's), its symbols entropy coded under the Gaussian
    model conditioned on the dither. Payload (one sender): in the tensor scope σ (bfloat16) and one
    byte per bucket (its exponent and class), in the bucket scope σ_b (bfloat16) per bucket; then
    the byte count of each rANS chunk (int32) and the rANS stream."""

    step: float = 1.0
    bucket_size: int = 512
    dither: str = "stratified"
    rotation: str = "hadamard"
    scope: str = "bucket"

    scheme = "ecdq"
    summable = False

    def __post_init__(self) -> None:
        check_int("ECDQ", "bucket_size", self.bucket_size, 1, 1 << 30)
        if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or not math.isfinite(self.step) \
                or self.step <= 0:
            raise ValueError(f"ECDQ step must be a positive finite number (Δ = step·σ), got {self.step!r}")
        if self.dither not in DITHERS:
            raise ValueError(f"ECDQ dither must be one of {DITHERS}, got {self.dither!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"ECDQ rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"ECDQ scope must be one of {SCOPES}, got {self.scope!r}")
        if 2 * self.half_width + 1 > 255:
            least = math.sqrt(self.bucket_size) * 1.01 / 126
            raise ValueError(f"ECDQ step={self.step} is too fine for buckets of {self.bucket_size} in the bucket "
                             f"scope: the indices would not fit a byte (step ≥ {least:.3g} needed)")

    @property
    def half_width(self) -> int:
        """K with |k_i| ≤ K always (the symbols are k + K): the bucket scope's bound from the bucket's
        norm (:func:`.ecdq_model.bucket_half_width`), the tensor scope's byte (its encoder caps
        |x_i| ≤ TENSOR_CAP·Δ_b)."""
        if self.scope == "tensor":
            return TENSOR_HALF_WIDTH
        return bucket_half_width(self.step, self.bucket_size)

    @property
    def bins(self) -> int:
        """Equal intervals of the dither that select a symbol's table (within its class)."""
        return TENSOR_BINS if self.scope == "tensor" else BUCKET_BINS

    def tensor_scales(self, rms: torch.Tensor, segs: Segments) -> torch.Tensor:
        """The tensor scope's σ per tensor of ``segs`` (bfloat16): √(mean_b σ_b²) over its buckets'
        σ_b (the segments' buckets end to end), one launch for the group; 0 for
        an empty tensor."""
        sigma = torch.zeros(len(segs.lengths), dtype=torch.float32, device=rms.device)
        filled = [i for i, nb in enumerate(segs.buckets) if nb]
        if filled:
            counts = tuple(segs.buckets[i] for i in filled)
            norms = ops.bucket_l2_segments(rms, Segments(counts, tuple(segs.keys[i] for i in filled), max(counts)))
            inverse = torch.tensor([1.0 / math.sqrt(nb) for nb in counts], dtype=torch.float32, device=rms.device)
            sigma[torch.tensor(filled, device=rms.device)] = norms * inverse
        return sigma.to(torch.bfloat16)

    def steps(self, sigma: torch.Tensor, exponents: torch.Tensor | None = None) -> torch.Tensor:
        """Δ = step · σ (float32: one correctly rounded product of two float32 values), per bucket in
        the bucket scope; in the tensor scope times 4^e_b per bucket (exact)."""
        delta = sigma.to(torch.float32) * torch.tensor(self.step, dtype=torch.float32, device=sigma.device)
        return delta if exponents is None else delta * _powers_of_four(delta.device)[exponents]

    def exponents(self, peak: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e_b (int64 per bucket): the least e ≤ MAX_EXPONENT with ``peak`` = max_i |x_i| ≤
        TENSOR_CAP·Δ·4^e in the bucket (``delta``: Δ = step·σ of its tensor, per bucket), so that no
        index leaves the byte; and where even 4^7 is not enough (bool per bucket: a step far too fine
        for a coordinate that holds nearly all its tensor's energy)."""
        limits = delta[:, None] * TENSOR_CAP * _powers_of_four(peak.device)
        e = torch.zeros(peak.numel(), dtype=torch.int64, device=peak.device)
        for _ in range(MAX_EXPONENT):
            e += peak > limits.gather(1, e[:, None])[:, 0]
        return e, peak > limits.gather(1, e[:, None])[:, 0]

    def classes(self, rms: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Each bucket's class (int64): where its relative step Δ_b/σ_b lies among the class edges;
        the silent class where σ_b = 0."""
        ratio = torch.where(rms > 0, delta / rms, torch.full_like(rms, math.inf))
        return torch.bucketize(ratio, class_edges(rms.device), right=True)

    @property
    def model(self) -> ops.RansTables:
        """The scope's rANS tables (the same object for every codec of this scope, step and bucket)."""
        return rans_model(self.scope, float(self.step) if self.scope == "bucket" else 0.0, self.bucket_size)

    def layout(self, n: int, ctx: TensorContext | None = None) -> Layout:
        nb = self.num_buckets(n)
        side = [("sigma", torch.bfloat16, 1), ("codes", torch.uint8, nb)] if self.scope == "tensor" else \
            [("sigma", torch.bfloat16, nb)]
        return [*side, ("lengths", torch.int32, ops.rans_chunks(n)), ("stream", torch.uint8, None)]

    def side_bits(self, n: int) -> int:
        """The scales and classes: 16 bits per tensor and 8 per bucket, or 16 per bucket."""
        nb = self.num_buckets(n)
        return SCALE_BITS + 8 * nb if self.scope == "tensor" else SCALE_BITS * nb

    def formula_bits(self, n: int, ctx: TensorContext | None = None) -> float:
        """The expected bits per coordinate for Gaussian coordinates (every bucket at relative step
        ``step``): the mean code length of the tables those symbols meet, plus the side information
        and the chunks' lengths."""
        if not n:
            return 0.0
        rows = self.model.freq
        if self.scope == "tensor":
            c = int(torch.bucketize(torch.tensor([self.step], dtype=torch.float32), class_edges(), right=True))
            rows = rows[c * self.bins:(c + 1) * self.bins]
        code = code_length(float(self.step), rows, self.half_width)
        return code + (self.side_bits(n) + 32 * ops.rans_chunks(n)) / n

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        """One tensor's payload: a group of one (:meth:`encode_segments`)."""
        return self.encode_segments([flat32(g)], [ctx])[0]

    def encode_group(self, parts: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """:meth:`encode` of every part with the same bytes in a constant number of launches. A group
        holding a non-finite tensor is encoded tensor by tensor (its symbols could not be coded)."""
        if not self.grouped(ctxs):
            return super().encode_group(parts, ctxs)
        try:
            return list(self.encode_segments([flat32(g) for g in parts], ctxs))
        except FloatingPointError:
            return super().encode_group(parts, ctxs)

    def encode_segments(self, flats: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded]:
        """Every tensor's payload, the tensors end to end in one launch per phase
        (:mod:`hvdquant.kernels.ops_segments`): rotation, bucket norms, the scales (the tensor scope:
        σ per tensor, the buckets' maxima, exponents and classes), the dithered indices as symbols
        k + K (:func:`ops.dqsg_encode_segments` with Δ_b and K levels: never clipped), the dither
        bins, and the rANS chunks under the dither's (and class's) contexts and their gathering; each
        tensor's histogram of symbols per context is kept for the (conditional) entropy statistic.
        FloatingPointError names the first non-finite tensor; ValueError the first whose
        coordinate no exponent brings within the byte (the tensor scope)."""
        lengths = [f.numel() for f in flats]
        x = self.rotate_group(torch.cat(flats), ctxs, lengths)
        segs = self.segments(ctxs, lengths)
        rms = ops.bucket_l2_segments(x, segs) * (1.0 / math.sqrt(self.bucket_size))  # σ_b; a short last
        # bucket is scaled by the full d too, which keeps |x_i| ≤ √d·σ_b
        if self.scope == "tensor":
            sigma, codes = self._tensor_side(x, rms, segs, ctxs)
            delta, classes = self.tensor_steps(sigma, codes, segs.buckets)
            fields = [{"sigma": sg, "codes": cd} for sg, cd in zip(sigma.split(1), codes.split(segs.buckets))]
        else:
            sigma, classes = rms.to(torch.bfloat16), None
            delta = self.steps(sigma)
            _refuse_non_finite(delta, ctxs, segs.buckets)
            fields = [{"sigma": sg} for sg in sigma.split(segs.buckets)]
        half, rows = self.half_width, self.model.freq.shape[0]
        symbols = ops.dqsg_encode_segments(x, delta, segs, half)
        contexts = self._contexts(segs, classes, x.device)
        chunk_lengths, streams = ops.rans_split(*ops.rans_encode_modelled(symbols, self.model, contexts, segs), segs)
        alphabet = 2 * half + 1
        counts = ops.segment_histograms(contexts.to(torch.int64).mul_(alphabet).add_(symbols), segs,
                                        rows * alphabet).reshape(-1, rows, alphabet)
        return [Encoded(n, {**f, "lengths": ln, "stream": st}, counts=ct, side_bits=self.side_bits(n))
                for n, f, ln, st, ct in zip(lengths, fields, chunk_lengths, streams, counts)]

    def _tensor_side(self, x: torch.Tensor, rms: torch.Tensor, segs: Segments, ctxs: Sequence[TensorContext]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensor scope's side information of a group: σ per tensor (bfloat16) and one byte per
        bucket, its exponent e_b and the class of its relative step Δ_b/σ_b (ZERO_BUCKET where σ_b = 0)."""
        sigma = self.tensor_scales(rms, segs)
        delta = self.steps(sigma)
        _refuse_non_finite(delta, ctxs)
        buckets = torch.tensor(segs.buckets, device=x.device)
        exponents, over = self.exponents(ops.bucket_absmax_segments(x, segs), delta.repeat_interleave(buckets))
        if bool(over.any()):
            raise ValueError(f"ECDQ step={self.step} is too fine for '{ctxs[_first(over, segs.buckets)].name}': a "
                             f"coordinate exceeds {TENSOR_CAP}·4^{MAX_EXPONENT} steps (use a larger step or "
                             f"scope='bucket')")
        codes = self.classes(rms, self.steps(sigma.repeat_interleave(buckets), exponents)) + exponents * CLASSES
        return sigma, torch.where(rms > 0, codes.clamp(max=ZERO_BUCKET - 1), ZERO_BUCKET).to(torch.uint8)

    def _contexts(self, segs: Segments, classes: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Each symbol's table (uint8): its dither's interval, after its bucket's class in the tensor scope."""
        bins = ops.dither_bins(segs.elements, segs.key, self.bins, device, segments=segs)
        if classes is None:
            return bins
        sizes = torch.tensor(segs.bucket_lengths(), device=device)
        return (classes.to(torch.uint8) * self.bins).repeat_interleave(sizes).add_(bins)

    def tensor_steps(self, sigma: torch.Tensor, codes: torch.Tensor, buckets: Sequence[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensor scope's (Δ_b, class) per bucket of tensors of ``buckets`` buckets from their side
        information (σ per tensor, a byte per bucket): what the decoder uses, equal to what the
        encoder used."""
        codes = codes.to(torch.int64)
        per_bucket = sigma.repeat_interleave(torch.tensor(buckets, device=sigma.device))
        delta = self.steps(per_bucket, codes // CLASSES)
        return delta.masked_fill_(codes == ZERO_BUCKET, 0.0), codes % CLASSES

    def payload_steps(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Δ_b per bucket, each bucket's class or None in the bucket scope) of one payload."""
        if self.scope == "bucket":
            return self.steps(enc.fields["sigma"]), None
        return self.tensor_steps(enc.fields["sigma"], enc.fields["codes"], [self.num_buckets(enc.n)])

    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        return self.rotator.unrotate(self.decode_flat([enc], [ctx]), ctx.key)

    def decode_flat(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext], sender: int | None = None
                    ) -> torch.Tensor:
        """Every payload's Δ_b (k − u) in the rotated coordinates, end to end (sender ``sender``'s keys
        where given): dither bins, rANS chunks and reconstruction, one launch each."""
        segs = self.segments(ctxs, [e.n for e in encs], sender)
        sigma = torch.cat([e.fields["sigma"] for e in encs])
        if self.scope == "tensor":
            delta, classes = self.tensor_steps(sigma, torch.cat([e.fields["codes"] for e in encs]), segs.buckets)
        else:
            delta, classes = self.steps(sigma), None
        contexts = self._contexts(segs, classes, encs[0].device)
        symbols = ops.rans_decode(self.model, torch.cat([e.fields["lengths"] for e in encs]),
                                  torch.cat([e.fields["stream"] for e in encs]), segs.elements, contexts=contexts,
                                  segments=segs)
        return ops.dqsg_decode_segments(symbols, delta, segs, self.half_width)

    def finish_flat(self, flat: torch.Tensor, ctxs: Sequence[TensorContext], lengths: list[int]
                    ) -> list[torch.Tensor]:
        return self.unrotate_group(flat, ctxs, lengths)

    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        """Mean of the senders' reconstructions, summed in sender order in the rotated coordinates and
        rotated back once (the rotation is linear and shared)."""
        total = torch.zeros(payloads[0].n, dtype=torch.float32, device=payloads[0].device)
        for p, enc in enumerate(payloads):
            total += self.decode_flat([enc], [ctx], sender=p)
        return self.rotator.unrotate(total / len(payloads), ctx.key), DecodeStats()


def _first(flags: torch.Tensor, buckets: Sequence[int] | None = None) -> int:
    """The index of the first tensor with a set flag: ``flags`` per tensor, or per bucket of tensors of
    ``buckets`` buckets each (end to end)."""
    first = int(torch.nonzero(flags)[0, 0])
    return first if buckets is None else next(t for t, mine in enumerate(by_segment([first], list(buckets))) if mine)


def _refuse_non_finite(delta: torch.Tensor, ctxs: Sequence[TensorContext], buckets: Sequence[int] | None = None
                       ) -> None:
    """FloatingPointError naming the first tensor whose step Δ (per tensor, or per bucket) is not
    finite: its gradient holds a NaN or an Inf."""
    if not all_finite(delta):
        name = ctxs[_first(~torch.isfinite(delta), buckets)].name
        raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{name}'")
