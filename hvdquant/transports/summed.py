"""The summable-allreduce exchange: DQSG indices (and nested coset indices) in summable fields.

With one step Δ_b per bucket common to all ranks (docs/ALGORITHMS.md §3), every rank packs its
integer indices into summable float64 fields (:class:`SumMessage`); a SUM allreduce of the words
gives the exact index sums, from which one decoder returns Σ_p ĝ_p.

**Fused, and never waiting in the gradient hook.** ``start(buffer)`` only rotates (if the codec
rotates) and takes the per-bucket max|g| of the buffer's compressed segments. The first finisher
called exchanges every buffer started since the last exchange: one MAX allreduce of all maxima, then
each tensor quantized with its common step straight into its fields, and the fields of *all*
tensors summed in **one** allreduce (plus, for nested decoding, one fused recovery round);
uncompressed segments travel in one allgather and are summed in rank order. A step costs a fixed
number of rounds however many tensors the model has; tensors go in sorted name order, so every
rank packs the same layout whatever order the hooks fired in. With ``group_threshold`` (Horovod's
stock path) the same rounds run per rank-agreed group while backward still runs
(:mod:`hvdquant.transports.groups`). A non-finite gradient shows as a non-finite agreed maximum on
every rank, and every rank raises ``FloatingPointError`` naming the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hvdquant.codecs.base import all_finite, counts_entropy, empirical_entropy
from hvdquant.codecs.coset_resolver import bucket_coordinates
from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.ndqsg import NDQSG
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.kernels import DitherKey, ops
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import Collectives, Started, check_finite_output, raise_if_poisoned, rank_order_sum
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.groups import GroupPlan, group_tag
from hvdquant.transports.payload import check_kind, statistics
from hvdquant.transports.summable import SumFieldLayout, SumMessage


@dataclass(frozen=True)
class Pending:
    """One compressed tensor waiting for its group: name, step, this rank's key, what is quantized
    (the flat float32 gradient, rotated if the codec rotates) and its per-bucket max|·|."""

    name: str
    step: int
    key: DitherKey
    source: torch.Tensor
    absmax: torch.Tensor


@dataclass(frozen=True)
class Quantized:
    """One tensor of a round after its step is agreed: Δ_b and this rank's dither key."""

    item: Pending
    delta: torch.Tensor
    key: DitherKey


@dataclass
class _Group:
    """Compressed tensors exchanged together (sorted by name): the MAX allreduce of their bucket
    maxima, then the scheme's rounds (``sums`` waits for them and decodes), or the error every rank
    raises for it."""

    tensors: list[Pending]
    tag: str
    maxima: Started[torch.Tensor]
    rounds: list[Quantized] | None = None
    sums: Callable[[], dict[str, torch.Tensor]] | None = None
    error: tuple[str, str] | None = None  # (first non-finite tensor's name, message)


@dataclass
class _Started:
    """A started buffer and, once exchanged, its flat result (or the error every rank raised)."""

    buffer: FusedBuffer
    result: torch.Tensor | None = None
    error: str | None = None
    finished: bool = False


class SummedExchange:
    """A summable scheme (:class:`DQSGSum` or :class:`NestedSum`) over a summable allreduce: fused
    rounds and measured statistics; the scheme decides what the rounds send and how their sums decode.

    ``group_threshold`` (gradient bytes; ``None``: no groups) sends the compressed tensors in
    rank-agreed groups (:class:`~hvdquant.transports.groups.GroupPlan`) while the hooks still run:
    a completed group starts its MAX round at once, and its fields are quantized and their SUM
    round started at the first later ``start`` that finds the maxima arrived (a poll: it never
    waits). Only for collectives matched by name (Horovod): when a group is sent then depends on
    timing, which differs between ranks. Groups change when fields travel, not what is summed:
    every sum is exact, so the results are the same bits as without groups."""

    kind = "summed"

    def __init__(self, scheme: DQSGSum | NestedSum, average: bool, collectives: Collectives,
                 group_threshold: int | None = None) -> None:
        if group_threshold is not None and (isinstance(group_threshold, bool) or not isinstance(group_threshold, int)
                                            or group_threshold <= 0):
            raise ValueError(f"group_threshold must be a positive int (gradient bytes) or None, "
                             f"got {group_threshold!r}")
        self.scheme, self.average, self.coll = scheme, average, collectives
        self.codec = scheme.fine
        self.group_threshold = group_threshold
        self.plan: GroupPlan | None = None  # agreed at the first exchange when grouping
        self.stats = CommStats()  # every byte handed to the collectives
        self.payload = CommStats()  # those of the compressed tensors (maxima, fields, recovery)
        self.decode_stats = DecodeStats()
        self.entropy_bits = 0.0  # Σ n·(empirical entropy of the symbols sent) + side bits
        self._open: list[_Started] = []
        self._pending: dict[str, Pending] = {}  # started, not yet in a launched group
        self._groups: list[_Group] = []  # launched since the last exchange
        self._order: list[tuple[str, int]] = []  # compressed tensors in start order, until the plan
        self._rotated: dict[str, torch.Tensor] = {}  # per name, the buffer its rotated copy reuses

    @property
    def entropy_bits_per_coordinate(self) -> float:
        pc = self.payload.coordinates
        return self.entropy_bits / pc if pc else float("nan")

    def config(self) -> dict[str, Any]:
        return {"exchange": self.kind, "scheme": self.scheme.config(), "average": self.average,
                "group_threshold": self.group_threshold}

    def statistics(self) -> dict:
        return statistics(self.stats, self.payload, self.entropy_bits, self.decode_stats)

    def state_dict(self) -> dict[str, Any]:
        """The scheme's state (nested side information and nesting decisions)."""
        return {"kind": self.kind, "scheme": self.scheme.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_kind(self.kind, state)
        self.scheme.load_state_dict(state["scheme"])

    def count_handed(self, nbytes: int) -> None:
        """Bytes an adapter handed to its framework on the exchange's behalf (Horovod's word)."""
        self.stats.record(0, nbytes)
        self.payload.record(0, nbytes)

    # ------------------------------------------------------------------ in the gradient hook
    def start(self, buffer: FusedBuffer) -> Callable[[], torch.Tensor]:
        """Queue ``buffer`` for the next exchange: rotate its compressed segments (if the codec
        rotates) and take their per-bucket maxima; with a plan, launch the groups it completes and
        send those whose maxima have arrived."""
        queued = {s.name for entry in self._open for s in entry.buffer.segments}
        twice = [s.name for s in buffer.segments if s.name in queued]
        if twice:
            raise ValueError(f"'{twice[0]}' was started twice before its exchange finished: finish it first")
        compressed = buffer.compressed()
        for s in compressed:
            source = self.codec.rotate(buffer.part(s), s.key, self._workspace(s.name, buffer.part(s)))
            self._pending[s.name] = Pending(s.name, s.key.step, s.key, source, self.codec.bucket_absmax(source))
            if self.group_threshold is not None and self.plan is None:
                self._order.append((s.name, s.length))
        entry = _Started(buffer)
        self._open.append(entry)
        if self.plan is not None:
            for members in self.plan.completed([s.name for s in compressed], self._pending):
                self._launch(members)
            for group in self._groups:
                self._send(group, wait=False)

        def finish() -> torch.Tensor:
            """The buffer's result, handed over once (the exchange keeps no reference to it)."""
            if entry.result is None and entry.error is None:
                if entry.finished:
                    raise RuntimeError("this exchange's result was already taken: a finisher runs once")
                self._exchange()
            if entry.error is not None:
                raise FloatingPointError(entry.error)
            result, entry.result, entry.finished = entry.result, None, True
            return result

        return finish

    def _workspace(self, name: str, g: torch.Tensor) -> torch.Tensor | None:
        """The buffer ``name``'s rotated copy is written into, kept from step to step (a fresh one of
        every step's size costs page faults: docs/BENCHMARKS.md); None without rotation. The previous
        step's copy is no longer read once that step's exchange finished."""
        if not self.codec.rotator.active:
            return None
        buf = self._rotated.get(name)
        if buf is None or buf.numel() != g.numel() or buf.device != g.device:
            buf = self._rotated[name] = torch.empty(g.numel(), dtype=torch.float32, device=g.device)
        return buf

    def _launch(self, names: list[str] | tuple[str, ...]) -> None:
        """Start one MAX allreduce of the bucket maxima of the pending tensors ``names``."""
        tensors = [self._pending.pop(name) for name in sorted(names)]
        tag = group_tag(names)
        parts = [t.absmax for t in tensors]
        maxima = self.coll.allreduce(torch.cat(parts) if len(parts) > 1 else parts[0], f"hvdquant.scale.{tag}",
                                     op="max")
        self.stats.record(0, maxima.nbytes)
        self.payload.record(0, maxima.nbytes)
        self._groups.append(_Group(tensors, tag, maxima))

    def _send(self, group: _Group, wait: bool) -> None:
        """Once ``group``'s maxima are in (``wait``: wait for them), Δ_b = max / s per tensor and
        the scheme's rounds started; a non-finite maximum (the same on every rank) marks the group
        failed instead, so every rank skips the same rounds and raises at the finisher."""
        if group.sums is not None or group.error is not None or (not wait and not group.maxima.done()):
            return
        reduced = group.maxima.wait()
        maxima = reduced.split([t.absmax.numel() for t in group.tensors])
        bad = [] if all_finite(reduced) else [t for t, m in zip(group.tensors, maxima) if not all_finite(m)]
        if bad:
            group.error = (bad[0].name, f"non-finite gradient (NaN or Inf) in '{bad[0].name}' on at least one rank "
                                        f"at step {bad[0].step}; hvdquant refuses to quantize it")
            return
        group.rounds = [Quantized(t, self.codec.step_size(m), self.codec.keyed(t.key, self.coll.size))
                        for t, m in zip(group.tensors, maxima)]
        group.sums = self.scheme.send(self, group.rounds, group.tag)

    # ------------------------------------------------------------------ at the first finisher
    def _exchange(self) -> None:
        """Exchange every started buffer: the launched groups and one group of the other pending
        tensors through the scheme's rounds, uncompressed segments in one allgather; then each
        buffer's flat result. Every round is started before any error is raised."""
        batch, self._open = self._open, []
        if self._pending:
            self._launch(list(self._pending))
        groups, self._groups = self._groups, []
        try:
            for group in groups:
                self._send(group, wait=True)
            raw = self._raw_sums(batch)
            errors = sorted(group.error for group in groups if group.error is not None)
            if errors:  # every rank sees the same reduced maxima, so every rank raises: no hang, no NaN spread
                raise FloatingPointError(errors[0][1])
            sums: dict[str, torch.Tensor] = {}
            for group in groups:
                sums.update(group.sums())
                for q in group.rounds:  # a shared rotation is linear: the sum is rotated back once
                    self.codec.unrotate(sums[q.item.name], q.key)
            sums.update(raw)
        except FloatingPointError as err:
            for entry in batch:
                entry.error = str(err)
            raise
        for entry in batch:
            out = entry.buffer.join([sums.pop(s.name) for s in entry.buffer.segments])
            if self.average:
                out = out / self.coll.size
            check_finite_output(out)
            entry.result = out
        if self.group_threshold is not None and self.plan is None:
            self._agree_plan()

    def _agree_plan(self) -> None:
        """The groups of the next steps, cut from rank 0's first-step order (every rank takes it)."""
        order, self._order = self._order, []
        everyone = self.coll.allgather_object(order, "hvdquant.groups")
        self.plan = GroupPlan.from_order(everyone[0], self.group_threshold)

    def _raw_sums(self, batch: list[_Started]) -> dict[str, torch.Tensor]:
        """Σ_p of the uncompressed segments' float32 values, in rank order (one allgather of all)."""
        raw = sorted(((s, entry.buffer) for entry in batch for s in entry.buffer.uncompressed()),
                     key=lambda sb: sb[0].name)
        if not raw:
            return {}
        flat = torch.cat([buf.part(s) for s, buf in raw])
        started = self.coll.allgather_bytes(flat.view(torch.uint8) if all_finite(flat) else None, "hvdquant.raw")
        self.stats.record(flat.numel(), started.nbytes)
        total = rank_order_sum(raise_if_poisoned(started.wait(), "uncompressed tensors"))
        return {s.name: part for (s, _), part in zip(raw, total.split([s.length for s, _ in raw]))}

    def start_sum(self, message: SumMessage, values: list, device: torch.device, coordinates: int,
                  name: str) -> Started[torch.Tensor]:
        """Start one SUM allreduce of every segment of ``message`` (:meth:`SumMessage.pack` takes
        ``values``, packed on ``device``, the gradients'); ``wait()`` gives the reduced words, there.
        ``coordinates`` are counted in the statistics (0 for second rounds). The names repeat from
        step to step (Horovod caches their negotiation)."""
        started = self.coll.allreduce(message.pack(values, device), name)
        self.stats.record(coordinates, started.nbytes)
        self.payload.record(coordinates, started.nbytes)
        return started

    def sum_fields(self, message: SumMessage, values: list[torch.Tensor], device: torch.device, coordinates: int,
                   name: str) -> list[torch.Tensor]:
        """:meth:`start_sum`, waited and unpacked: per segment Σ_p v_p (int32) or the raw words' sum."""
        parts, _ = message.unpack(self.start_sum(message, values, device, coordinates, name).wait())
        return parts


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

    def send(self, ex: SummedExchange, rounds: list[Quantized], tag: str) -> Callable[[], dict[str, torch.Tensor]]:
        """Quantize every tensor straight into its summable fields (one fused pass per tensor) and
        start one SUM allreduce of all of them; the returned function waits for it and decodes
        Σ_p ĝ_p per tensor straight from the reduced words."""
        codec, ranks = ex.codec, ex.coll.size
        layout = SumFieldLayout.for_levels(codec.levels, ranks)

        def writer(q: Quantized) -> Callable[[torch.Tensor], None]:
            def write(words: torch.Tensor) -> None:
                _, counts = ops.dqsg_encode_fields(q.item.source, q.delta, codec.bucket_size, codec.levels, q.key,
                                                   layout.radix, layout.per_word, out=words)
                ex.entropy_bits += q.item.source.numel() * counts_entropy(counts) + 32.0 * q.delta.numel()
            return write

        sizes = [q.item.source.numel() for q in rounds]
        message = SumMessage(ranks, tuple((layout, n) for n in sizes))
        started = ex.start_sum(message, [writer(q) for q in rounds], rounds[0].item.source.device, sum(sizes),
                               f"hvdquant.sum.{tag}")

        def decode() -> dict[str, torch.Tensor]:
            words, factor = message.split(started.wait())
            return {q.item.name: ops.dqsg_decode_fields(w, n, factor, layout.radix, layout.per_word,
                                                        layout.offset * ranks, q.delta, codec.bucket_size,
                                                        q.key.for_sender(0), senders=ranks)
                    for q, w, n in zip(rounds, words, sizes)}

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

    def send(self, ex: SummedExchange, rounds: list[Quantized], tag: str) -> Callable[[], dict[str, torch.Tensor]]:
        """Pack every tensor's cosets and checksums (or, while not nested, its DQSG(s₁) indices) and
        start one SUM allreduce of all; the returned function waits for it, resolves the index sums
        with the side information, recovers failed buckets in one more round and decodes."""
        path, nested = ex, self.nested
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

    def _decode(self, path: SummedExchange, rounds: list[Quantized], parts: Iterator[torch.Tensor],
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
