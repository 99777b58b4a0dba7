"""The summable-allreduce reducer: DQSG indices (and nested coset indices) in summable fields.

With one step Δ_b per bucket common to all ranks (docs/ALGORITHMS.md §3), every rank packs its
integer indices into summable float64 fields plus a sentinel word (:class:`SumFieldLayout`); any
SUM or AVERAGE allreduce of the words gives the exact index sums, from which one decoder returns
factor · Σ_p ĝ_p. ``encode`` runs before the allreduce and ``decode`` after it; who runs the
allreduce is the adapter's business (Horovod's stock ``DistributedOptimizer`` does it between
``compress`` and ``decompress``). The transport's own rounds (the first-step agreement, the scale
agreement, nested recovery) go through a :class:`~hvdquant.transports.collectives.Collectives`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from hvdquant.codecs.base import all_finite, empirical_entropy, flat32
from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.ndqsg import NDQSG
from hvdquant.kernels import DitherKey, ops
from hvdquant.keys import StepCounter, dither_key
from hvdquant.stats import CommStats, DecodeStats, nbytes
from hvdquant.transports.agreement import agree, check_seed
from hvdquant.transports.collectives import Collectives, check_finite_output
from hvdquant.transports.summable import SumFieldLayout


@dataclass(frozen=True)
class SumContext:
    """What ``decompress`` needs of a DQSG ``compress``: the tensor's name, shape and dtype, the
    common steps Δ_b, sender 0's dither key (the decoder regenerates senders 0 … P−1) and the field
    layout the indices were packed with."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    delta: torch.Tensor
    key: DitherKey
    layout: SumFieldLayout


@dataclass(frozen=True)
class CosetContext(SumContext):
    """A nested ``compress``: also this rank's DQSG(s₁) indices (for a recovery round) and the side
    information, P × the previous decoded mean."""

    indices: torch.Tensor
    side: torch.Tensor


class SummedDQSG:
    """DQSG over a summable allreduce: the first-step agreement, per-name step counters, the common
    scale (a MAX allreduce of per-bucket max|g|), the field packing and the measured statistics.

    ``collectives`` is a :class:`Collectives` or a callable returning one (made on first use, after
    the framework is initialised). ``config`` is what every rank must agree on at the first step."""

    def __init__(self, levels: int, bucket_size: int, seed: int | None, collectives: Any,
                 config: dict[str, Any] | None = None) -> None:
        check_seed(seed)
        self.codec = DQSG(levels=levels, bucket_size=bucket_size)
        self.seed = seed
        self.config = {"scheme": "dqsg", **asdict(self.codec), "seed": seed} if config is None else config
        self.stats = CommStats()
        self.entropy_bits = 0.0  # Σ n·(empirical entropy of the symbols sent) + side bits
        self.steps = StepCounter()
        self._agreed_seed: int | None = None
        self._coll = collectives

    @property
    def coll(self) -> Collectives:
        if callable(self._coll):
            self._coll = self._coll()
        return self._coll

    def encode(self, tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, SumContext]:
        """The summable words of this rank's indices for ``tensor`` (named alike on every rank)."""
        name, delta, key = self.begin(tensor, name)
        return self.dqsg_payload(tensor, name, delta, key)

    def decode(self, reduced: torch.Tensor, ctx: SumContext) -> torch.Tensor:
        """factor · Σ_p ĝ_p from the reduced words (the mean under AVERAGE, the sum under SUM)."""
        return self.decode_dqsg(reduced, ctx)

    def begin(self, tensor: torch.Tensor, name: str) -> tuple[str, torch.Tensor, DitherKey]:
        """Name, common Δ_b and this rank's dither key for one exchange of ``tensor``."""
        if self._agreed_seed is None:  # exchange configurations once; every rank uses rank 0's seed
            self._agreed_seed = agree(self.coll, self.config, self.seed, "hvdquant.config")
        step = self.steps.next(name)
        absmax = self.codec.bucket_absmax(tensor)
        started = self.coll.allreduce(absmax, f"hvdquant.scale.{name}", op="max")
        self.stats.record(0, started.nbytes)
        common = started.wait()
        if not all_finite(common):
            # Every rank sees the same reduced maxima, so every rank raises: no hang, no NaN spread.
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{name}' on at least one rank "
                                     f"at step {step}; hvdquant refuses to quantize it")
        return name, self.codec.step_size(common), dither_key(self._agreed_seed, step, name, self.coll.rank)

    def dqsg_payload(self, tensor: torch.Tensor, name: str, delta: torch.Tensor, key: DitherKey
                     ) -> tuple[torch.Tensor, SumContext]:
        layout = SumFieldLayout.for_levels(self.codec.levels, self.coll.size)
        codes = self.codec.quantize(tensor, delta, key)
        words = layout.pack(codes)
        self.record(tensor.numel(), words, codes.numel() * empirical_entropy(
            (codes + self.codec.levels).view(torch.uint8), self.codec.symbols) + 32.0 * delta.numel())
        return words, SumContext(name, tensor.shape, tensor.dtype, delta, key.for_sender(0), layout)

    def record(self, coordinates: int, words: torch.Tensor, entropy_bits: float) -> None:
        self.stats.record(coordinates, nbytes(words))
        self.entropy_bits += entropy_bits

    def decode_dqsg(self, reduced: torch.Tensor, ctx: SumContext) -> torch.Tensor:
        ksum, factor = ctx.layout.unpack(reduced, ctx.shape.numel())
        out = self.codec.decode_sum(ksum, ctx.delta, ctx.key, senders=ctx.layout.ranks, factor=factor)
        check_finite_output(out)
        return out.reshape(ctx.shape).to(ctx.dtype)

    @property
    def entropy_bits_per_coordinate(self) -> float:
        return self.entropy_bits / self.stats.coordinates if self.stats.coordinates else float("nan")


class SummedNested:
    """Allreduce-friendly nested DQSG (docs/ALGORITHMS.md §3) over a summable allreduce.

    With a common Δ_b (s₁ levels), every rank sends its coset symbols (k + ⌊ρ/2⌋) mod ρ in summable
    fields of ⌈log2(P(ρ−1)+1)⌉ bits, plus its per-bucket checksums Σ_j (2j+1)k_j mod 2^32 (linear,
    so they sum too). The receiver reduces the field sums mod ρ and resolves Σ_p k_p with side
    information P·ḡ_prev, the previous step's decoded mean of the same tensor, which is
    bit-identical on every rank (:meth:`hvdquant.NDQSG.decode_sum`). Buckets whose resolved index
    sums miss the summed checksum are detected on every rank alike and **recovered** by a second,
    synchronous allreduce of their DQSG(s₁) index sums; counts are in ``decode_stats``. The first
    step of each tensor (no side information yet) is sent as plain DQSG(s₁).

    Decoding succeeds where |Σ_p g_p − P·ḡ_prev| < (ρ − P)Δ/2 (sufficient): the scheme pays off only
    when ρ is well above P and gradients change slowly; otherwise recovery traffic dominates.
    """

    def __init__(self, levels: tuple[int, int], bucket_size: int, seed: int | None, collectives: Any) -> None:
        self.nested = NDQSG(levels, bucket_size)
        self.plain = SummedDQSG(levels[0], bucket_size, seed, collectives,
                                {"scheme": "ndqsg-sum", "levels": self.nested.levels, "bucket_size": bucket_size,
                                 "seed": seed})  # DQSG(s₁): scales, agreement, statistics, first steps
        self._side: dict[str, torch.Tensor] = {}
        self.decode_stats = DecodeStats()

    def encode(self, tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, SumContext]:
        path = self.plain
        name, delta, key = path.begin(tensor, name)
        side = self._side.get(name)
        if side is None or side.numel() != tensor.numel():
            return path.dqsg_payload(tensor, name, delta, key)
        rho, d, s1 = self.nested.nesting_ratio, self.nested.bucket_size, self.nested.levels[0]
        k = path.codec.quantize(tensor, delta, key)
        cosets = ops.nested_encode(flat32(tensor), delta, d, s1, rho, key)
        layout = SumFieldLayout(0, rho - 1, path.coll.size)
        fields = layout.pack(cosets.view(torch.int8))
        checks = ops.bucket_checksum(k, d).double()
        words = torch.cat([fields[:-1], checks, fields[-1:]])
        path.record(tensor.numel(), words, cosets.numel() * empirical_entropy(cosets, rho) + 64.0 * delta.numel())
        return words, CosetContext(name, tensor.shape, tensor.dtype, delta, key.for_sender(0), layout, k, side)

    def decode(self, reduced: torch.Tensor, ctx: SumContext) -> torch.Tensor:
        if not isinstance(ctx, CosetContext):
            out = self.plain.decode_dqsg(reduced, ctx)
            self._remember(ctx.name, out, reduced[-1])
            return out
        n, ranks, nb = ctx.shape.numel(), ctx.layout.ranks, ctx.delta.numel()
        sums, factor = ctx.layout.unpack(torch.cat([reduced[:-1 - nb], reduced[-1:]]), n)
        checks = torch.round(reduced[-1 - nb:-1] / factor).to(torch.int64)

        def recover(idx: torch.Tensor) -> torch.Tensor:
            """The true index sums at ``idx``: one more allreduce (the same buckets on every rank)."""
            layout = SumFieldLayout.for_levels(self.nested.levels[0], ranks)
            started = self.plain.coll.allreduce(layout.pack(ctx.indices[idx].contiguous()),
                                                f"hvdquant.recover.{ctx.name}")
            self.plain.stats.record(0, started.nbytes)
            self.decode_stats.recovery_bytes += started.nbytes
            return layout.unpack(started.wait(), idx.numel())[0]

        kout = self.nested.decode_sum((sums % self.nested.nesting_ratio).to(torch.uint8), ctx.delta, ctx.side,
                                      ctx.key, ranks, checks, recover=recover,
                                      stats=self.decode_stats)
        out = self.plain.codec.decode_sum(kout, ctx.delta, ctx.key, senders=ranks, factor=factor)
        check_finite_output(out)
        self._remember(ctx.name, out, reduced[-1])
        return out.reshape(ctx.shape).to(ctx.dtype)

    def _remember(self, name: str, out: torch.Tensor, sentinel: torch.Tensor) -> None:
        """Side information for the next step: P × the decoded mean. out = factor·Σĝ and the reduced
        sentinel is factor·P, so the mean is out / sentinel."""
        self._side[name] = (out.reshape(-1) / float(sentinel) * self.plain.coll.size).contiguous()
