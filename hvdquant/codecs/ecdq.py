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
from hvdquant.kernels import DitherKey, ops
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

    def bucket_rms(self, x: torch.Tensor) -> torch.Tensor:
        """‖x_b‖₂ · d^-½ per bucket (float32, from the kernels' norm: the same bits on every device). A
        short last bucket is scaled by the full d too, which keeps |x_i| ≤ √d·σ_b."""
        return ops.bucket_l2(x, self.bucket_size) * (1.0 / math.sqrt(self.bucket_size))

    def scales(self, rms: torch.Tensor) -> torch.Tensor:
        """What the scope sends as bfloat16, from the buckets' σ_b (:meth:`bucket_rms`): σ = √(mean_b σ_b²)
        (one value; 0 for an empty tensor) in the tensor scope, σ_b per bucket in the bucket scope."""
        if self.scope == "bucket":
            return rms.to(torch.bfloat16)
        if not rms.numel():
            return torch.zeros(1, dtype=torch.bfloat16, device=rms.device)
        return (ops.bucket_l2(rms, rms.numel()) * (1.0 / math.sqrt(rms.numel()))).to(torch.bfloat16)

    def steps(self, sigma: torch.Tensor, exponents: torch.Tensor | None = None) -> torch.Tensor:
        """Δ = step · σ (float32: one correctly rounded product of two float32 values), per bucket in
        the bucket scope; in the tensor scope times 4^e_b per bucket (exact)."""
        delta = sigma.to(torch.float32) * torch.tensor(self.step, dtype=torch.float32, device=sigma.device)
        return delta if exponents is None else delta * _powers_of_four(delta.device)[exponents]

    def exponents(self, x: torch.Tensor, delta: torch.Tensor, name: str) -> torch.Tensor:
        """e_b (int64 per bucket): the least e ≤ MAX_EXPONENT with max_i |x_i| ≤ TENSOR_CAP·Δ·4^e in the
        bucket, so that no index leaves the byte; ValueError naming the tensor where 4^7 is not enough
        (a step far too fine for a coordinate that holds nearly all the tensor's energy)."""
        peak = ops.bucket_absmax(x, self.bucket_size)
        limits = delta * TENSOR_CAP * _powers_of_four(x.device)
        e = torch.zeros(peak.numel(), dtype=torch.int64, device=x.device)
        for _ in range(MAX_EXPONENT):
            e += peak > limits[e]
        if bool((peak > limits[e]).any()):
            raise ValueError(f"ECDQ step={self.step} is too fine for '{name}': a coordinate exceeds "
                             f"{TENSOR_CAP}·4^{MAX_EXPONENT} steps (use a larger step or scope='bucket')")
        return e

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
        """The scales (and, in the tensor scope, each bucket's byte), the dithered indices as symbols
        k + K (:func:`ops.dqsg_encode` with Δ_b and K levels: never clipped), and their rANS stream
        with the dither's (and class's) contexts; the symbols' histogram per context is kept for the
        (conditional) entropy statistic."""
        x = self.rotator.rotate(flat32(g), ctx.key)
        rms = self.bucket_rms(x)
        sigma = self.scales(rms)
        delta = self.steps(sigma)
        if not all_finite(delta):
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        fields = {"sigma": sigma}
        classes = None
        if self.scope == "tensor":
            exponents = self.exponents(x, delta, ctx.name)
            codes = self.classes(rms, self.steps(sigma, exponents)) + exponents * CLASSES
            fields["codes"] = torch.where(rms > 0, codes.clamp(max=ZERO_BUCKET - 1), ZERO_BUCKET).to(torch.uint8)
            delta, classes = self.payload_steps(Encoded(x.numel(), fields))
        key, half = self.keyed(ctx.key, ctx.ranks), self.half_width
        symbols = ops.dqsg_encode(x, delta, self.bucket_size, half, key, symbols=True)
        contexts = self._contexts(x.numel(), key, classes, x.device)
        fields["lengths"], fields["stream"] = ops.rans_encode_modelled(symbols, self.model, contexts)
        alphabet, rows = 2 * half + 1, self.model.freq.shape[0]
        counts = torch.bincount(contexts.to(torch.int32).mul_(alphabet).add_(symbols), minlength=rows * alphabet)
        return Encoded(x.numel(), fields, counts=counts.reshape(rows, alphabet), side_bits=self.side_bits(x.numel()))

    def _contexts(self, n: int, key: DitherKey, classes: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Each symbol's table (uint8): its dither's interval, after its bucket's class in the tensor scope."""
        bins = ops.dither_bins(n, key, self.bins, device)
        if classes is None:
            return bins
        return (classes.to(torch.uint8) * self.bins).repeat_interleave(self.bucket_size)[:n].add_(bins)

    def payload_steps(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Δ_b per bucket, each bucket's class or None in the bucket scope) from a payload's side
        information: what the decoder uses, equal to what the encoder used."""
        if self.scope == "bucket":
            return self.steps(enc.fields["sigma"]), None
        codes = enc.fields["codes"].to(torch.int64)
        delta = self.steps(enc.fields["sigma"], codes // CLASSES)
        return delta.masked_fill_(codes == ZERO_BUCKET, 0.0), codes % CLASSES

    def _rotated(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        """Δ_b (k − u) in the rotated coordinates."""
        key, n = self.keyed(ctx.key, ctx.ranks), enc.n
        delta, classes = self.payload_steps(enc)
        contexts = self._contexts(n, key, classes, enc.device)
        symbols = ops.rans_decode(self.model, enc.fields["lengths"], enc.fields["stream"], n, contexts=contexts)
        return ops.dqsg_decode(symbols, delta, self.bucket_size, key, offset=self.half_width)

    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        return self.rotator.unrotate(self._rotated(enc, ctx), ctx.key)

    # ------------------------------------------------------------- a fused group at once
    def grouped(self, ctxs: Sequence[TensorContext]) -> bool:
        """The bucket scope runs the segmented kernels (:class:`GroupDecoding`; the tensor scope's
        scales and exponents go tensor by tensor)."""
        return self.scope == "bucket" and super().grouped(ctxs)

    def encode_group(self, parts: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """:meth:`encode` of every part with the same bytes in a constant number of launches (rotation,
        norms, indices, dither bins, rANS chunks and their gathering: :mod:`hvdquant.kernels.ops_segments`).
        A group holding a non-finite tensor is encoded tensor by tensor (its symbols could not be coded)."""
        if not self.grouped(ctxs):
            return super().encode_group(parts, ctxs)
        flats = [flat32(g) for g in parts]
        lengths = [f.numel() for f in flats]
        x = self.rotate_group(torch.cat(flats), ctxs, lengths)
        segs = self.segments(ctxs, lengths)
        rms = ops.bucket_l2_segments(x, segs) * (1.0 / math.sqrt(self.bucket_size))
        sigma = self.scales(rms)
        delta = self.steps(sigma)
        if not all_finite(delta):
            return super().encode_group(parts, ctxs)
        half, rows = self.half_width, self.model.freq.shape[0]
        symbols = ops.dqsg_encode_segments(x, delta, segs, half)
        contexts = ops.dither_bins(segs.elements, segs.key, self.bins, x.device, segments=segs)
        chunk_lengths, streams = ops.rans_split(*ops.rans_encode_modelled(symbols, self.model, contexts, segs), segs)
        alphabet = 2 * half + 1
        counts = ops.segment_histograms(contexts.to(torch.int64).mul_(alphabet).add_(symbols), segs,
                                        rows * alphabet).reshape(-1, rows, alphabet)
        return [Encoded(n, {"sigma": sg, "lengths": ln, "stream": st}, counts=ct, side_bits=self.side_bits(n))
                for n, sg, ln, st, ct in zip(lengths, sigma.split(segs.buckets), chunk_lengths, streams, counts)]

    def decode_flat(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext], sender: int | None = None
                    ) -> torch.Tensor:
        """Every payload's Δ_b (k − u) in the rotated coordinates, end to end (sender ``sender``'s keys
        where given): dither bins, rANS chunks and reconstruction, one launch each."""
        segs = self.segments(ctxs, [e.n for e in encs], sender)
        contexts = ops.dither_bins(segs.elements, segs.key, self.bins, encs[0].device, segments=segs)
        symbols = ops.rans_decode(self.model, torch.cat([e.fields["lengths"] for e in encs]),
                                  torch.cat([e.fields["stream"] for e in encs]), segs.elements, contexts=contexts,
                                  segments=segs)
        delta = self.steps(torch.cat([e.fields["sigma"] for e in encs]))
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
            total += self._rotated(enc, ctx.sender(p))
        return self.rotator.unrotate(total / len(payloads), ctx.key), DecodeStats()
