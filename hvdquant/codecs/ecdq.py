"""ECDQ: entropy-coded dithered quantization, the symbols coded under a model that knows the dither
(docs/ALGORITHMS.md §12; R. Zamir and M. Feder, "On universal quantization by randomized
uniform/lattice quantizers", IEEE Trans. Inf. Theory, 1992).

Per bucket b of ``bucket_size`` (d) coordinates of the (by default rotated) gradient x:

    σ_b = bf16(‖x_b‖₂ · d^-½)                   (sent: 16 bits per bucket)
    Δ_b = step · σ_b                              (float32; ``step`` is the codec's one knob)
    k_i = round(x_i / Δ_b + u_i)                  (u_i ~ U(−½, ½), the keyed dither of DQSG)
    x̂_i = Δ_b (k_i − u_i)

As in DQSG the error x̂ − x is uniform on (−Δ/2, Δ/2], independent of x, unbiased, of variance
Δ²/12 = step²σ_b²/12 per coordinate (in the rotated coordinates; the normalised error of the
decoded gradient is step²/12 either way); ``step`` trades bits for error continuously. No index is
clipped: |x_i| ≤ ‖x_b‖₂ bounds |k_i| by :attr:`ECDQ.half_width`.

The symbols k + K are entropy coded with rANS, symbol i with a table chosen by which of 16 equal
intervals its dither u_i falls in (the receiver regenerates u_i before decoding it). The tables hold
P(k | u) for a coordinate x ~ N(0, σ²), the distribution of a rotated bucket's coordinates:

    P(k | u) = Φ(step·(k − u + ½)) − Φ(step·(k − u − ½))      (u at the interval's centre)

so a symbol costs about −log₂ P(k | u) bits: the conditional entropy H(k | u), which is below the
entropy H(k) that a coder ignoring the dither pays (docs/BENCHMARKS.md; 0.1–0.25 bits per
coordinate at 1–2 bits). The tables depend on ``step`` only; they are computed once per process
from ``math.erfc`` in float64 and never travel. (Ranks whose C library rounded erfc differently
could disagree on a table; the rANS decoder's end-of-chunk check then refuses the stream.)
"""

from __future__ import annotations

import functools
import math
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
    counts_entropy,
    flat32,
)
from hvdquant.codecs.dqsg import DITHERS
from hvdquant.codecs.rotation import ROTATIONS, Rotation
from hvdquant.kernels import DitherKey, ops, sizes
from hvdquant.stats import DecodeStats

CONTEXTS = 16  # intervals of the dither that select a symbol's table (a power of 2)
SCALE_BITS = 16  # σ_b travels as bfloat16


def _phi(t: float) -> float:
    """The standard normal distribution function, from erfc (accurate in both tails)."""
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


@functools.lru_cache(maxsize=32)
def model(step: float, half_width: int) -> ops.RansTables:
    """:func:`model_tables` checked once, with the kernels' forms of them made once per device."""
    return ops.RansTables(model_tables(step, half_width))


@functools.lru_cache(maxsize=32)
def model_tables(step: float, half_width: int) -> torch.Tensor:
    """The rANS tables (int16, CONTEXTS × (2K + 1), rows summing to 2^14, K = ``half_width``): row j
    holds P(k | u) for u at the centre of the j-th interval of (−½, ½) and k ∈ [−K, K], for
    x ~ N(0, σ²) quantized with Δ = step·σ; every symbol keeps a frequency of at least 1."""
    rows = []
    scale = float(1 << 40)
    for j in range(CONTEXTS):
        u = (j + 0.5) / CONTEXTS - 0.5
        p = [_phi(step * (k - u + 0.5)) - _phi(step * (k - u - 0.5)) for k in range(-half_width, half_width + 1)]
        rows.append(ops.rans_table(torch.tensor([max(1, round(q * scale)) for q in p], dtype=torch.int64)))
    return torch.stack(rows)


@dataclass(frozen=True)
class ECDQ(Codec):
    """Dithered quantizer of step Δ_b = ``step``·σ_b per bucket of ``bucket_size`` coordinates, its
    symbols entropy coded under the Gaussian model conditioned on the dither. Payload (one sender):
    σ_b as bfloat16 per bucket, the byte count of each rANS chunk (int32), the rANS stream."""

    step: float = 1.0
    bucket_size: int = 512
    dither: str = "stratified"
    rotation: str = "hadamard"

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
        if 2 * self.half_width + 1 > 255:
            least = math.sqrt(self.bucket_size) * 1.01 / 126
            raise ValueError(f"ECDQ step={self.step} is too fine for buckets of {self.bucket_size}: the indices "
                             f"would not fit a byte (step ≥ {least:.3g} needed)")

    @property
    def half_width(self) -> int:
        """K with |k_i| ≤ K always: |x_i| ≤ ‖x_b‖₂ = √d·σ_b, so |x_i/Δ_b| ≤ √d/step up to the
        rounding of σ_b to bfloat16 (2^-9) and float32 (1% covers both), and k adds at most 1."""
        return math.floor(math.sqrt(self.bucket_size) * 1.01 / float(torch.tensor(self.step, dtype=torch.float32))) + 1

    @property
    def rotator(self) -> Rotation:
        return Rotation(self.rotation, self.bucket_size)

    def keyed(self, key: DitherKey, ranks: int) -> DitherKey:
        """This sender's dither key among ``ranks`` ranks (stratified or independent, as DQSG)."""
        return key.stratified(ranks) if self.dither == "stratified" else key

    def num_buckets(self, n: int) -> int:
        return sizes.num_buckets(n, self.bucket_size)

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """σ_b = bf16(‖x_b‖₂ · d^-½) per bucket (bfloat16): a norm by the kernels, one float32 product and
        one rounding by the framework, the same bits on every device. A short last bucket is scaled by
        the full d too, which keeps |x_i| ≤ √d·σ_b."""
        return (ops.bucket_l2(x, self.bucket_size) * (1.0 / math.sqrt(self.bucket_size))).to(torch.bfloat16)

    def steps(self, sigma: torch.Tensor) -> torch.Tensor:
        """Δ_b = step · σ_b (float32: one correctly rounded product of two float32 values)."""
        return sigma.to(torch.float32) * torch.tensor(self.step, dtype=torch.float32, device=sigma.device)

    @property
    def model(self) -> ops.RansTables:
        """The rANS tables of this step (the same object for every codec of this step)."""
        return model(float(self.step), self.half_width)

    def layout(self, n: int, ctx: TensorContext | None = None) -> Layout:
        return [("sigma", torch.bfloat16, self.num_buckets(n)), ("lengths", torch.int32, ops.rans_chunks(n)),
                ("stream", torch.uint8, None)]

    def formula_bits(self, n: int, ctx: TensorContext | None = None) -> float:
        """The expected bits per coordinate for Gaussian coordinates: the tables' mean code length
        Σ_k P(k|u) log₂(M/f_k) over the contexts, plus the scales and the chunks' lengths."""
        if not n:
            return 0.0
        rows = model_tables(float(self.step), self.half_width).tolist()
        code = sum(counts_entropy(row) for row in rows) / len(rows)
        return code + (SCALE_BITS * self.num_buckets(n) + 32 * ops.rans_chunks(n)) / n

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        """σ_b, the dithered indices as symbols k + K (:func:`ops.dqsg_encode` with Δ_b and K levels:
        never clipped), and their rANS stream with the dither's contexts; the symbols' histogram per
        context is kept for the (conditional) entropy statistic."""
        x = self.rotator.rotate(flat32(g), ctx.key)
        sigma = self.scales(x)
        delta = self.steps(sigma)
        if not all_finite(delta):
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        key, half = self.keyed(ctx.key, ctx.ranks), self.half_width
        symbols = ops.dqsg_encode(x, delta, self.bucket_size, half, key, symbols=True)
        contexts = ops.dither_bins(x.numel(), key, CONTEXTS, x.device)
        lengths, stream = ops.rans_encode_modelled(symbols, self.model, contexts)
        alphabet = 2 * half + 1
        counts = torch.bincount(contexts.to(torch.int32).mul_(alphabet).add_(symbols), minlength=CONTEXTS * alphabet)
        return Encoded(x.numel(), {"sigma": sigma, "lengths": lengths, "stream": stream},
                       counts=counts.reshape(CONTEXTS, alphabet), side_bits=SCALE_BITS * sigma.numel())

    def _rotated(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        """Δ_b (k − u) in the rotated coordinates."""
        key, n = self.keyed(ctx.key, ctx.ranks), enc.n
        contexts = ops.dither_bins(n, key, CONTEXTS, enc.device)
        symbols = ops.rans_decode(self.model, enc.fields["lengths"], enc.fields["stream"], n, contexts=contexts)
        return ops.dqsg_decode(symbols, self.steps(enc.fields["sigma"]), self.bucket_size, key,
                               offset=self.half_width)

    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        return self.rotator.unrotate(self._rotated(enc, ctx), ctx.key)

    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        """Mean of the senders' reconstructions, summed in sender order in the rotated coordinates and
        rotated back once (the rotation is linear and shared)."""
        total = torch.zeros(payloads[0].n, dtype=torch.float32, device=payloads[0].device)
        for p, enc in enumerate(payloads):
            total += self._rotated(enc, ctx.sender(p))
        return self.rotator.unrotate(total / len(payloads), ctx.key), DecodeStats()
