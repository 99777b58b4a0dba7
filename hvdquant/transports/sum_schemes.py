"""What the summable-allreduce exchange's rounds carry, and how their sums decode: the schemes.

:class:`DQSGSum` sums DQSG indices in summable fields and decodes Σ_p ĝ_p once; :class:`NestedSum`
sums nested coset indices and checksums, resolves them with side information and recovers failed
buckets (docs/ALGORITHMS.md §3). A scheme's ``send(host, rounds, tag)`` packs and starts its first
round through the host exchange (:class:`~hvdquant.transports.summed.SummedExchange`) and returns a
function that waits for it and decodes; :func:`scheme_for` picks the scheme of a summable codec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from hvdquant.codecs.base import counts_entropy, empirical_entropy
from hvdquant.codecs.coset_resolver import bucket_coordinates
from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.ndqsg import NDQSG
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.kernels import DitherKey, ops
from hvdquant.kernels.segments import Segments
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import Collectives, Started
from hvdquant.transports.summable import SumFieldLayout, SumMessage


@dataclass(frozen=True)
class Pending:
    """One compressed tensor: name, step, this rank's key and what is quantized (the flat float32
    gradient until its group is launched; then its view of the group's source, rotated if the
    codec rotates)."""

    name: str
    step: int
    key: DitherKey
    source: torch.Tensor


@dataclass(frozen=True)
class Quantized:
    """One tensor of a round after its step is agreed: Δ_b and this rank's dither key."""

    item: Pending
    delta: torch.Tensor
    key: DitherKey


@dataclass(frozen=True)
class Batch:
    """A group's tensors once their steps are agreed (sorted by name), also as flat buffers end to
    end: the source, the steps Δ_b, and the segments keyed by each tensor's dither key, for kernels
    that take every tensor in one launch (:mod:`hvdquant.kernels.ops_segments`)."""

    rounds: list[Quantized]
    source: torch.Tensor
    delta: torch.Tensor
    segments: Segments


class SumHost(Protocol):
    """What a scheme uses of its exchange: the codec and collectives, the statistics it adds to,
    and the SUM rounds."""

    codec: DQSG
    coll: Collectives
    entropy_bits: float
    stats: CommStats
    decode_stats: DecodeStats

    def start_sum(self, message: SumMessage, values: list, device: torch.device, coordinates: int,
                  name: str) -> Started[torch.Tensor]: ...

    def sum_fields(self, message: SumMessage, values: list[torch.Tensor], device: torch.device, coordinates: int,
                   name: str) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class DQSGSum:
    """DQSG(s) indices in summable fields: Σ_p k_p decoded once, with the sum of every sender's
    dither (P streams under the independent dither, one under the stratified dither)."""

    levels: int = 1
    bucket_size: int = 512
    dither: str = "stratified"
    rotation: str = "none"

    @property
    def fine(self) -> DQSG:
        return DQSG(self.levels, self.bucket_size, self.dither, self.rotation)

    def config(self) -> dict[str, Any]:
        return {"scheme": "dqsg", **asdict(self.fine)}

    def state_dict(self) -> dict[str, Any]:
        """DQSG keeps nothing between steps."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""

    def send(self, ex: SumHost, batch: Batch, tag: str) -> Callable[[], dict[str, torch.Tensor]]:
        """Quantize every tensor of the batch straight into its summable fields (one fused pass over
        all of them) and start one SUM allreduce; the returned function waits for it, decodes
        Σ_p ĝ_p of every tensor straight from the reduced words (one pass) and rotates the sums back
        (one pass: the rotation is linear and shared)."""
        codec, ranks, segs = ex.codec, ex.coll.size, batch.segments
        layout = SumFieldLayout.for_levels(codec.levels, ranks)

        def write(words: torch.Tensor) -> None:
            _, counts = ops.dqsg_encode_fields_segments(batch.source, batch.delta, segs, codec.levels, layout.radix,
                                                        layout.per_word, out=words)
            ex.entropy_bits += sum(n * counts_entropy(c) for n, c in zip(segs.lengths, counts)) + \
                32.0 * batch.delta.numel()

        message = SumMessage(ranks, tuple((layout, n) for n in segs.lengths))
        started = ex.start_sum(message, write, batch.source.device, segs.elements, f"hvdquant.sum.{tag}")

        def decode() -> dict[str, torch.Tensor]:
            reduced = started.wait()
            _, factor = message.split(reduced)
            first = Segments(segs.lengths, tuple(k.for_sender(0) for k in segs.keys), segs.bucket)
            total = ops.dqsg_decode_fields_segments(reduced[:-1], factor, layout.radix, layout.per_word,
                                                    layout.offset * ranks, batch.delta, first, senders=ranks)
            if codec.rotator.active:
                ops.hadamard_rotate_segments(total, first, inverse=True, out=total)
            return dict(zip((q.item.name for q in batch.rounds), total.split(list(segs.lengths))))

        return decode


class NestedSum:
    """Allreduce-friendly nested DQSG (docs/ALGORITHMS.md §3).

    With a common Δ_b (s₁ levels), every rank sends its coset symbols (k + ⌊ρ/2⌋) mod ρ as summable
    digits of base P(ρ−1) + 1, plus its per-bucket checksums Σ_j w_j·k_j mod 2^32 (w_j: odd
    hashed weights of the position j; linear, so they sum too). The receiver reduces the field sums
    mod ρ and resolves Σ_p k_p with side information P·ḡ_prev, the previous step's decoded mean of
    the same tensor, which is bit-identical on every rank (:meth:`CosetResolver.resolve`). Buckets
    whose resolved index sums miss the summed checksum are detected on every rank alike and
    **recovered** by one more allreduce of their DQSG(s₁) index sums (all failed buckets of the
    batch together); counts are in the exchange's ``decode_stats``. A tensor's first step (no side
    information yet) is sent as plain DQSG(s₁).

    Decoding succeeds where |Σ_p g_p − P·ḡ_prev| < (ρ − P)Δ/2 (sufficient): the scheme pays off only
    when ρ is well above P and gradients change slowly; otherwise recovery traffic dominates.

    ``adaptive=True`` (``NDQSG``'s switch): a tensor is nested only while it pays, with the cheapest
    nesting ratio. While off, it is sent as DQSG(s₁); after every step its exact index sums are
    *probed* for every candidate ratio (:meth:`NDQSG.candidate_ratios`): their residues mod ρ
    resolved against the same side information, the failed buckets counted (the ratio in use,
    while on: the step's own failures). The next step nests, at the cheapest ratio, iff cosets,
    checksums and recovery would take at most ``NestingPolicy.ADAPTIVE_MARGIN`` × the DQSG(s₁)
    fields' words (:meth:`NestingPolicy.choose`). Every rank sees the same sums, so every rank
    decides alike; the decisions are this scheme's ``policy``, checkpointed with it.
    """

    def __init__(self, levels: tuple[int, int] = (3, 1), bucket_size: int = 512, adaptive: bool = True) -> None:
        self.nested = NDQSG(levels, bucket_size, adaptive=adaptive)
        self.fine = self.nested.fine
        self.policy = NestingPolicy()  # adaptive nesting's decisions, per name
        self._side: dict[str, torch.Tensor] = {}  # per name: P × the last decoded mean

    def config(self) -> dict[str, Any]:
        return {"scheme": "ndqsg-sum", "levels": self.nested.levels, "bucket_size": self.nested.bucket_size,
                "adaptive": self.nested.adaptive}

    def state_dict(self) -> dict[str, Any]:
        """The side information (per name, P × the last decoded mean, copies) and the nesting decisions."""
        return {"side": {name: side.clone() for name, side in self._side.items()},
                "nesting": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        policy = NestingPolicy()
        policy.load_state_dict(state.get("nesting", {}))  # refuses a malformed one before anything changes
        self._side = {str(name): side.clone() for name, side in state["side"].items()}
        self.policy = policy

    def _words(self, n: int, nb: int, failed: list[int], ranks: int, rho: int) -> int:
        """Summable words of one tensor nested with ratio ``rho``: cosets + checksums + the
        recovered buckets' DQSG(s₁) index sums."""
        fine = SumFieldLayout.for_levels(self.nested.levels[0], ranks)
        recovered = bucket_coordinates(failed, self.nested.bucket_size, n).numel()
        words = SumFieldLayout(0, rho - 1, ranks).field_words(n) + nb
        return words + (fine.field_words(recovered) if recovered else 0)

    def _decide(self, q: Quantized, ksum: torch.Tensor, side: torch.Tensor, ranks: int,
                failed: list[int] | None) -> None:
        """Nesting and ratio of ``q``'s tensor at its next step, from its exact index sums ``ksum``:
        every candidate ratio priced in words against the side information (``failed``: the buckets
        that failed at the ratio in use, when this step was nested), against DQSG(s₁)'s fields."""
        nested, name = self.nested, q.item.name
        n, nb, current = ksum.numel(), q.delta.numel(), nested.ratio(name, self.policy)
        probe = nested.resolver.probe
        cost = {rho: self._words(n, nb, failed if failed is not None and rho == current
                                 else probe(ksum, q.delta, side, q.key.for_sender(0), ranks, rho), ranks, rho)
                for rho in nested.candidate_ratios()}
        plain = SumFieldLayout.for_levels(nested.levels[0], ranks).field_words(n)
        self.policy.choose(name, cost, plain, buckets=nb)

    def send(self, ex: SumHost, batch: Batch, tag: str) -> Callable[[], dict[str, torch.Tensor]]:
        """Pack every tensor's cosets and checksums (or, while not nested, its DQSG(s₁) indices) and
        start one SUM allreduce of all; the returned function waits for it, resolves the index sums
        with the side information, recovers failed buckets in one more round and decodes."""
        path, nested, rounds = ex, self.nested, batch.rounds
        ranks, d, s1 = path.coll.size, nested.bucket_size, nested.levels[0]
        device = rounds[0].item.source.device
        fine = SumFieldLayout.for_levels(s1, ranks)
        segments, values, indices, nested_names = [], [], [], set()
        for q in rounds:
            src, n, nb = q.item.source, q.item.source.numel(), q.delta.numel()
            k = path.codec.quantize(src, q.delta, q.key)
            indices.append(k)
            side = self._side.get(q.item.name)
            if side is not None:  # restored from a checkpoint, it may sit on another device
                side = self._side[q.item.name] = side.to(device)
            if side is None or side.numel() != n or not nested.nests(q.item.name, self.policy):
                segments.append((fine, n))
                values.append(k)
                path.entropy_bits += n * empirical_entropy((k + s1).view(torch.uint8), 2 * s1 + 1) + 32.0 * nb
                continue
            nested_names.add(q.item.name)
            rho = nested.ratio(q.item.name, self.policy)
            cosets = ops.nested_encode(src, q.delta, d, s1, rho, q.key)
            segments += [(SumFieldLayout(0, rho - 1, ranks), n), (None, nb)]
            values += [cosets.view(torch.int8), ops.bucket_checksum(k, d).double()]
            path.entropy_bits += n * empirical_entropy(cosets, rho) + 64.0 * nb
        message = SumMessage(ranks, tuple(segments))
        started = path.start_sum(message, values, device, sum(q.item.source.numel() for q in rounds),
                                 f"hvdquant.sum.{tag}")
        return lambda: self._decode(path, rounds, iter(message.unpack(started.wait())[0]), indices, nested_names, tag)

    def _decode(self, path: SumHost, rounds: list[Quantized], parts: Iterator[torch.Tensor],
                indices: list[torch.Tensor], nested_names: set[str], tag: str) -> dict[str, torch.Tensor]:
        """Σ_p ĝ_p per tensor from the reduced fields ``parts`` (see :meth:`send`)."""
        nested = self.nested
        ranks, d, device = path.coll.size, nested.bucket_size, rounds[0].item.source.device
        fine = SumFieldLayout.for_levels(nested.levels[0], ranks)
        resolved, failed = [], []
        for q in rounds:
            key0 = q.key.for_sender(0)
            if q.item.name not in nested_names:
                resolved.append(next(parts))
                failed.append([])
                side = self._side.get(q.item.name)
                if nested.adaptive and side is not None and side.numel() == resolved[-1].numel():  # the probe
                    self._decide(q, resolved[-1], side, ranks, None)
                continue
            sums, checks = next(parts), next(parts)
            rho = nested.ratio(q.item.name, self.policy)
            kout, bad = nested.resolver.resolve((sums % rho).to(torch.uint8), q.delta, self._side[q.item.name], key0,
                                       ranks, torch.round(checks).to(torch.int64), rho)
            resolved.append(kout)
            failed.append(bad)
        if any(failed):  # the same buckets on every rank: one allreduce of their DQSG(s1) index sums
            path.decode_stats.recovery_rounds += 1
            coords = [bucket_coordinates(bad, d, q.item.source.numel(), device) for q, bad in zip(rounds, failed)]
            before = path.stats.bytes_handed
            truths = path.sum_fields(SumMessage(ranks, tuple((fine, idx.numel()) for idx in coords)),
                                     [k[idx].contiguous() for k, idx in zip(indices, coords)], device, 0,
                                     f"hvdquant.sum.{tag}.recovery")
            path.decode_stats.recovery_bytes += path.stats.bytes_handed - before
            for kout, bad, truth in zip(resolved, failed, truths):
                if bad:
                    nested.resolver.patch(kout, bad, truth, path.decode_stats)
        sums = {}
        for q, kout, bad in zip(rounds, resolved, failed):
            if nested.adaptive and q.item.name in nested_names:
                self._decide(q, kout, self._side[q.item.name], ranks, bad)
            total = path.codec.decode_sum(kout, q.delta, q.key.for_sender(0), senders=ranks)
            self._side[q.item.name] = total  # side information for the next step: P × the decoded mean
            sums[q.item.name] = total
        return sums


def scheme_for(codec: object) -> DQSGSum | NestedSum:
    """The summable scheme of a codec that declares its payloads summable (``codec.summable``):
    :class:`NestedSum` for NDQSG, :class:`DQSGSum` for DQSG; other codecs' payloads cannot be summed
    (a TypeError says so)."""
    if getattr(codec, "summable", False):
        if isinstance(codec, NDQSG):
            if codec.rotation != "none":
                raise TypeError("NDQSG(rotation=...) runs on the payload paths only: the summable path's side "
                                "information is the previous step's sum in gradient coordinates; use "
                                "reducer='allgather', or DQSG(rotation='hadamard') on the allreduce")
            return NestedSum(codec.levels, codec.bucket_size, codec.adaptive)
        if isinstance(codec, DQSG):
            if codec.coding != "fixed":
                raise TypeError(f"DQSG(coding={codec.coding!r}) payloads are entropy coded and cannot be summed by an "
                                "allreduce: use reducer='allgather' or 'scatter_reduce' (summable fields stay "
                                "fixed-rate)")
            return DQSGSum(codec.levels, codec.bucket_size, codec.dither, codec.rotation)
    raise TypeError(f"{type(codec).__name__} payloads cannot be summed by an allreduce: use reducer='allgather' "
                    "or 'scatter_reduce'")
