"""The summable-allreduce exchange: DQSG indices (and nested coset indices) in summable fields.

With one step Δ_b per bucket common to all ranks (docs/ALGORITHMS.md §3), every rank packs its
integer indices into summable float64 fields (:class:`SumMessage`); a SUM allreduce of the words
gives the exact index sums, from which one decoder returns Σ_p ĝ_p.

**Fused, and never waiting in the gradient hook.** ``start(buffer)`` only queues the buffer's
compressed segments. The first finisher called exchanges every buffer started since the last
exchange as one group: its tensors laid end to end, rotated (if the codec rotates) and their
per-bucket max|g| taken, one MAX allreduce of all maxima, then every tensor quantized with its
common step straight into its fields, and the fields of *all* tensors summed in **one** allreduce
(plus, for nested decoding, one fused recovery round). Each phase is one kernel launch for the whole
group (:mod:`hvdquant.kernels.ops_segments`), however many tensors it holds (the nested scheme
too: its cosets, checksums, side-information decoding, probes and recovery round);
uncompressed segments travel in one allgather and are summed in rank order. A step costs a fixed
number of rounds however many tensors the model has; tensors go in sorted name order, so every
rank packs the same layout whatever order the hooks fired in. With ``group_threshold`` (Horovod's
stock path) the same rounds run per rank-agreed group while backward still runs
(:mod:`hvdquant.transports.groups`). A non-finite gradient shows as a non-finite agreed maximum on
every rank, and every rank raises ``FloatingPointError`` naming the tensor. What the rounds carry
and how their sums decode is the scheme's (:mod:`hvdquant.transports.sum_schemes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hvdquant.codecs.base import all_finite
from hvdquant.kernels import ops
from hvdquant.kernels.segments import Segments
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import Collectives, Started, check_finite_output, raise_if_poisoned, rank_order_sum
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.groups import GroupPlan, group_tag
from hvdquant.transports.nested_sum import NestedSum
from hvdquant.transports.payload import check_kind, statistics
from hvdquant.transports.sum_batch import Batch, Pending, Quantized
from hvdquant.transports.sum_schemes import DQSGSum
from hvdquant.transports.summable import SumMessage


@dataclass
class _Group:
    """Compressed tensors exchanged together (sorted by name), end to end in one flat ``source``
    (rotated if the codec rotates) cut by ``segments``: the MAX allreduce of their bucket maxima,
    then the scheme's rounds (``sums`` waits for them and decodes), or the error every rank raises
    for it."""

    tensors: list[Pending]
    tag: str
    source: torch.Tensor
    segments: Segments
    maxima: Started[torch.Tensor]
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
        self._sources: dict[str, torch.Tensor] = {}  # per group tag, the buffer its source reuses

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
        """Queue ``buffer`` for the next exchange; with a plan, launch the groups it completes and
        send those whose maxima have arrived."""
        queued = {s.name for entry in self._open for s in entry.buffer.segments}
        twice = [s.name for s in buffer.segments if s.name in queued]
        if twice:
            raise ValueError(f"'{twice[0]}' was started twice before its exchange finished: finish it first")
        compressed = buffer.compressed()
        for s in compressed:
            self._pending[s.name] = Pending(s.name, s.key.step, s.key, buffer.part(s))
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

    def send(self) -> None:
        """The tensors started since the last call become a group whose MAX round starts now; the
        groups launched at earlier calls are sent (their maxima waited for, their fields quantized,
        their SUM rounds started). Which rounds start when depends on the calls alone (no polling),
        so collectives matched by order (torch.distributed: the DDP hook) see the same sequence on
        every rank. The results are the same bits as without it."""
        earlier = list(self._groups)
        if self._pending:
            self._launch(list(self._pending))
        for group in earlier:
            self._send(group, wait=True)

    def _workspace(self, tag: str, n: int, device: torch.device) -> torch.Tensor:
        """The buffer group ``tag``'s source is written into, kept from step to step (a fresh one of
        every step's size costs page faults: docs/BENCHMARKS.md). The previous step's buffer is no
        longer read once that step's exchange finished."""
        buf = self._sources.get(tag)
        if buf is None or buf.numel() != n or buf.device != device:
            buf = self._sources[tag] = torch.empty(n, dtype=torch.float32, device=device)
        return buf

    def _launch(self, names: list[str] | tuple[str, ...]) -> None:
        """Lay the pending tensors ``names`` end to end, rotate them (if the codec rotates) and take
        their bucket maxima, one launch each for the whole group; start one MAX allreduce of the maxima."""
        pending = [self._pending.pop(name) for name in sorted(names)]
        tag = group_tag(names)
        segments = Segments(tuple(t.source.numel() for t in pending), tuple(t.key for t in pending),
                            self.codec.bucket_size)
        device, rotate = pending[0].source.device, self.codec.rotator.active
        if len(pending) == 1:  # a lone tensor is its own source, or rotates straight into the workspace
            source = pending[0].source
            if rotate:
                source = ops.hadamard_rotate_segments(source, segments,
                                                      out=self._workspace(tag, segments.elements, device))
        else:  # several: laid end to end, then rotated in place
            source = torch.cat([t.source for t in pending], out=self._workspace(tag, segments.elements, device))
            if rotate:
                ops.hadamard_rotate_segments(source, segments, out=source)
        tensors = [Pending(t.name, t.step, t.key, part)
                   for t, part in zip(pending, source.split(list(segments.lengths)))]
        maxima = self.coll.allreduce(ops.bucket_absmax_segments(source, segments), f"hvdquant.scale.{tag}", op="max")
        self.stats.record(0, maxima.nbytes)
        self.payload.record(0, maxima.nbytes)
        self._groups.append(_Group(tensors, tag, source, segments, maxima))

    def _send(self, group: _Group, wait: bool) -> None:
        """Once ``group``'s maxima are in (``wait``: wait for them), Δ_b = max / s per tensor and
        the scheme's rounds started; a non-finite maximum (the same on every rank) marks the group
        failed instead, so every rank skips the same rounds and raises at the finisher."""
        if group.sums is not None or group.error is not None or (not wait and not group.maxima.done()):
            return
        reduced = group.maxima.wait()
        if not all_finite(reduced):
            maxima = reduced.split(group.segments.buckets)
            bad = next(t for t, m in zip(group.tensors, maxima) if not all_finite(m))
            group.error = (bad.name, f"non-finite gradient (NaN or Inf) in '{bad.name}' on at least one rank "
                                     f"at step {bad.step}; hvdquant refuses to quantize it")
            return
        delta = self.codec.step_size(reduced)  # every tensor's Δ_b in one launch
        keys = [self.codec.keyed(t.key, self.coll.size) for t in group.tensors]
        rounds = [Quantized(t, d, k) for t, d, k in zip(group.tensors, delta.split(group.segments.buckets), keys)]
        batch = Batch(rounds, group.source, delta, Segments(group.segments.lengths, tuple(keys), group.segments.bucket))
        group.sums = self.scheme.send(self, batch, group.tag)

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
            sums.update(raw)
            check_finite_output(list(sums.values()))  # Σ_p finite: so is the mean
        except FloatingPointError as err:
            for entry in batch:
                entry.error = str(err)
            raise
        for entry in batch:
            out = entry.buffer.join([sums.pop(s.name) for s in entry.buffer.segments])
            entry.result = out / self.coll.size if self.average else out
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

