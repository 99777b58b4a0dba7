"""Payload transports, for codecs whose payloads cannot be summed (docs/ALGORITHMS.md §3).

``start(name, tensor, seed, step)`` encodes this rank's gradient at once (in the framework's
gradient hook, overlapping the backward pass) and queues it; ``start_raw(name, tensor)`` queues an
uncompressed tensor (small ones: their float32 values are summed in rank order). Each returns a
callable that finishes the exchange and returns the averaged (or summed) gradient. **Fusion:** the
first finisher called sends everything queued, sorted by name and cut into groups of at most
``fusion_threshold`` gradient bytes (like Horovod's fusion buffer); each group travels in one
collective round per phase, so the number of rounds per step does not grow with the number of
tensors. Every rank queues the same tensors between two flushes (an optimizer step), so every
rank builds the same groups whatever order the hooks fired in. A group's buffer from one rank is a
header of int64 sizes (−1 where that rank's gradient was not finite: every rank then raises
``FloatingPointError`` naming the tensor and the ranks) followed by the payloads.

- ``allgather``: every rank gathers every rank's group buffer and aggregates each tensor's payloads
  with the codec (paper-faithful NDQSG, QSGD-Elias, 1-bit SGD); a codec's second round (NDQSG
  recovery) runs per tensor when its finisher is called. Wire cost per rank ≈ b·n·(P−1) bits.
- ``scatter_reduce``: each tensor is split into P bucket-aligned chunks; chunk c of every tensor
  of the group goes to rank c in one all-to-all; its owner aggregates the P payloads, re-encodes
  the mean with the codec, **decodes its own re-encoding**, and one allgather of the group's
  re-encodings gives every rank the same bits. Two quantizations per coordinate; wire cost
  ≈ 2b·n·(P−1)/P bits.

Both are written once against :class:`~hvdquant.transports.collectives.Collectives`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hvdquant.codecs.base import Codec, Encoded, TensorContext, all_finite
from hvdquant.codecs.feedback import ErrorFeedback
from hvdquant.codecs.state import CodecState
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import (
    Collectives,
    Parts,
    Started,
    check_finite_output,
    chunk_bounds,
    raise_if_poisoned,
)
from hvdquant.transports.fused import FusedBuffer, Segment
from hvdquant.transports.session import dither_key

REDUCERS = ("allgather", "scatter_reduce")
FUSION_THRESHOLD = 64 << 20  # gradient bytes per fused group (Horovod's fusion buffer is 64 MiB too)
SIZE = torch.empty(0, dtype=torch.int64).element_size()


def rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Σ_p of float32 values sent as bytes, in rank order (bit-identical on every rank)."""
    total = parts[0].clone().view(torch.float32)
    for part in parts[1:]:
        total += part.clone().view(torch.float32)  # a copy: a part need not be 4-byte aligned
    return total


def _innermost(codec: Codec) -> Codec:
    return codec.codec if isinstance(codec, ErrorFeedback) else codec


@dataclass
class _Item:
    """One queued tensor. ``sent``: what this rank sends of it, one uint8 buffer per destination
    chunk (allgather: one chunk, the whole tensor), or None where its gradient was not finite."""

    name: str
    shape: tuple[int, ...]
    raw: bool
    seed: int
    step: int
    chunks: list[tuple[int, int]]
    sent: list[torch.Tensor] | None
    device: torch.device = torch.device("cpu")  # the gradient's: payloads, buffers and results live there
    encodings: list[Encoded] = field(default_factory=list)  # this rank's payloads (recovery rounds)
    group: _Group | None = None

    @property
    def numel(self) -> int:
        return self.chunks[-1][1]


@dataclass
class _Group:
    """Tensors that travel together; ``results`` (per name: the output, or the error every rank
    raises) once the group is finished."""

    items: list[_Item]
    started: Started[Parts] | None = None
    results: dict[str, torch.Tensor | str] | None = None


def _header(sizes: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64, device=device).view(torch.uint8)


def _split(buf: torch.Tensor, count: int) -> list[torch.Tensor | None]:
    """A group buffer (header of ``count`` sizes, then the payloads) as one entry per tensor."""
    if not count:
        return []
    sizes = buf[:count * SIZE].clone().view(torch.int64).tolist()
    body = torch.split(buf[count * SIZE:], [max(s, 0) for s in sizes])
    return [None if s < 0 else part for s, part in zip(sizes, body)]


class PayloadExchange:
    """Moves one codec's payloads with one reducer over ``collectives``, fused per group.

    ``stats`` counts the bytes handed to the collectives (headers, payloads, size and status words,
    second rounds); ``payload`` only what the codec produced; ``decode`` what nested decoding
    recovered. ``codec_state``: what the codec keeps between steps (error-feedback residuals, adaptive
    nesting's decisions), passed in every context and checkpointed here."""

    kind = "payload"

    def __init__(self, codec: Codec, reducer: str, average: bool, collectives: Collectives,
                 fusion_threshold: int = FUSION_THRESHOLD) -> None:
        if reducer not in REDUCERS:
            raise ValueError(f"reducer={reducer!r} must be one of {REDUCERS}")
        if reducer == "scatter_reduce" and hasattr(_innermost(codec), "recovery_payload"):
            raise ValueError(f"{type(_innermost(codec)).__name__} needs reducer='allgather': its side-information "
                             "decoder and recovery round need every sender's payload on every rank")
        if isinstance(fusion_threshold, bool) or not isinstance(fusion_threshold, int) or fusion_threshold < 0:
            raise ValueError(f"fusion_threshold={fusion_threshold!r} must be a non-negative int (bytes)")
        self.codec, self.reducer, self.average = codec, reducer, average
        self.fusion_threshold = fusion_threshold
        self.coll = collectives
        self.stats = CommStats()
        self.payload = CommStats()
        self.decode = DecodeStats()
        self.codec_state = CodecState()
        self.entropy_bits = 0.0  # Σ over tensors of n·(entropy + side bits per coordinate)
        self._queue: list[_Item] = []

    def config(self) -> dict:
        return {"codec": self.codec.config(), "reducer": self.reducer, "average": self.average,
                "fusion_threshold": self.fusion_threshold}

    def _record(self, enc: Encoded, coordinates: int) -> None:
        self.payload.record(coordinates, enc.nbytes())
        entropy = enc.entropy()
        if entropy is not None:
            self.entropy_bits += enc.n * entropy + enc.side_bits

    def statistics(self) -> dict:
        return statistics(self.stats, self.payload, self.entropy_bits, self.decode)

    def state_dict(self) -> dict:
        """This rank's codec state: error-feedback residuals and adaptive nesting's decisions."""
        return {"kind": self.kind, "codec_state": self.codec_state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_kind(self.kind, state)
        if "codec_state" not in state:
            raise ValueError("checkpoint holds no 'codec_state' (written by an older hvdquant?)")
        self.codec_state.load_state_dict(state["codec_state"])

    # ------------------------------------------------------------------ queueing (in the gradient hook)
    def _chunks(self, n: int) -> list[tuple[int, int]]:
        if self.reducer == "allgather":
            return [(0, n)]
        # P contiguous ranges cut at bucket boundaries where the codec has buckets
        return chunk_bounds(n, self.coll.size, getattr(_innermost(self.codec), "bucket_size", 1))

    def _context(self, item: _Item, c: int, sender: int, phase: str = "") -> TensorContext:
        """The codec's context of chunk ``c`` (allgather: the tensor) as sent by ``sender``."""
        if self.reducer == "allgather":
            return TensorContext(item.name, item.shape, dither_key(item.seed, item.step, item.name, sender),
                                 self.coll.size, self.codec_state)
        lo, hi = item.chunks[c]
        cname = f"{item.name}#{c}{phase}"
        return TensorContext(cname, (hi - lo,), dither_key(item.seed, item.step, cname, sender), self.coll.size,
                             self.codec_state)

    def start(self, buffer: FusedBuffer) -> Callable[[], torch.Tensor]:
        """Encode the buffer's compressed segments with the codec, queue every segment, and return
        the finisher of the whole buffer."""
        items = [self._encoded(buffer, s) if s.compressed else self._raw(buffer, s) for s in buffer.segments]
        for item in items:
            self.stats.record(item.numel, 0)
        self._queue += items

        def finish() -> torch.Tensor:
            out = torch.empty(buffer.numel, dtype=torch.float32, device=buffer.device)
            for item, s in zip(items, buffer.segments):
                if item.group is None:
                    self._flush()
                if item.group.results is None:
                    self._finish(item.group)
                result = item.group.results.pop(item.name)
                if isinstance(result, str):
                    raise FloatingPointError(result)
                out[s.offset:s.end] = result
            return out

        return finish

    def _encoded(self, buffer: FusedBuffer, seg: Segment) -> _Item:
        """A compressed segment, encoded (``sent`` stays None where its gradient is not finite: every
        rank then raises instead of leaving the others waiting)."""
        flat = buffer.part(seg)
        item = _Item(seg.name, seg.shape, False, seg.key.seed, seg.key.step, self._chunks(seg.length), None,
                     buffer.device)
        if self.reducer == "scatter_reduce" and not all_finite(flat):
            return item
        try:
            for c, (lo, hi) in enumerate(item.chunks):
                source = flat.view(seg.shape) if self.reducer == "allgather" else flat[lo:hi]
                item.encodings.append(self.codec.encode(source, self._context(item, c, self.coll.rank)))
        except FloatingPointError:
            item.encodings = []
            return item
        for enc in item.encodings:
            self._record(enc, enc.n)
        item.sent = [enc.to_bytes() for enc in item.encodings]
        return item

    def _raw(self, buffer: FusedBuffer, seg: Segment) -> _Item:
        """An uncompressed segment: its float32 values are summed in rank order (exact and
        reproducible, unlike a float allreduce whose order may change with the framework's fusion)."""
        flat = buffer.part(seg)
        item = _Item(seg.name, seg.shape, True, 0, 0, self._chunks(seg.length), None, buffer.device)
        if all_finite(flat):
            item.sent = [flat[lo:hi].contiguous().view(torch.uint8) for lo, hi in item.chunks]
        return item

    # ------------------------------------------------------------------ sending (at the first finisher)
    def _flush(self) -> None:
        """Cut everything queued into groups (sorted by name) and start every group's first round."""
        items, self._queue = sorted(self._queue, key=lambda it: it.name), []
        groups, size = [], 0
        for item in items:
            nbytes = 4 * item.numel
            if not groups or (size + nbytes > self.fusion_threshold and groups[-1].items):
                groups.append(_Group([]))
                size = 0
            groups[-1].items.append(item)
            item.group = groups[-1]
            size += nbytes
        for g, group in enumerate(groups):
            tag = f"hvdquant.group{g}"
            if self.reducer == "allgather":
                group.started = self.coll.allgather_bytes(self._buffer(group.items, 0), tag)
            else:
                group.started = self.coll.alltoall_bytes([self._buffer(group.items, c) for c in range(self.coll.size)],
                                                         f"{tag}.scatter")
            self.stats.record(0, group.started.nbytes)

    @staticmethod
    def _buffer(items: list[_Item], c: int) -> torch.Tensor:
        """This rank's buffer of chunk ``c`` of every item: header of sizes, then the payloads."""
        parts = [item.sent[c] for item in items if item.sent is not None]
        header = _header([-1 if item.sent is None else item.sent[c].numel() for item in items], items[0].device)
        return torch.cat([header, *parts])

    def _output(self, mean: torch.Tensor) -> torch.Tensor:
        out = mean if self.average else mean * self.coll.size
        check_finite_output(out)
        return out

    @staticmethod
    def _poisoned(item: _Item, received: list[torch.Tensor | None]) -> str | None:
        bad = [p for p, part in enumerate(received) if part is None]
        if not bad:
            return None
        return (f"non-finite gradient (NaN or Inf) in '{item.name}' on rank(s) {bad}; hvdquant refuses to "
                "quantize it (every rank raises)")

    def _finish(self, group: _Group) -> None:
        per_rank = [_split(buf, len(group.items)) for buf in raise_if_poisoned(group.started.wait(), "group")]
        received = [[per_rank[p][i] for p in range(self.coll.size)] for i in range(len(group.items))]
        if self.reducer == "allgather":
            group.results = {item.name: self._gathered(item, parts) for item, parts in zip(group.items, received)}
        else:
            group.results = self._reduce_and_gather(group, received)

    # ------------------------------------------------------------------ allgather
    def _gathered(self, item: _Item, parts: list[torch.Tensor | None]) -> torch.Tensor | str:
        error = self._poisoned(item, parts)
        if error is not None:
            return error
        if item.raw:
            total = rank_order_sum(parts)
            return self._output(total / self.coll.size)
        rank, ctx = self.coll.rank, self._context(item, 0, self.coll.rank)
        enc = item.encodings[0]

        def recover(failed: dict[int, list[int]]) -> dict[int, torch.Tensor]:
            mine = (self.codec.recovery_payload(enc, ctx, failed[rank]) if rank in failed
                    else torch.empty(0, dtype=torch.uint8, device=item.device))
            round_ = self.coll.allgather_bytes(mine, f"hvdquant.{item.name}.recovery")
            self.stats.record(0, round_.nbytes)  # recovery traffic is on the wire too
            self.decode.recovery_bytes += round_.nbytes
            got = raise_if_poisoned(round_.wait(), item.name)
            return {p: got[p] for p in failed}

        payloads = [self.codec.from_bytes(parts[p], item.numel, ctx.sender(p)) for p in range(self.coll.size)]
        mean, st = self.codec.aggregate(payloads, ctx, recover)
        self.decode.add(st)
        return self._output(mean)

    # ------------------------------------------------------------------ scatter-reduce-allgather
    def _reduce_and_gather(self, group: _Group, received: list[list[torch.Tensor | None]]
                           ) -> dict[str, torch.Tensor | str]:
        rank, ranks = self.coll.rank, self.coll.size
        second = _innermost(self.codec)  # the owner re-encodes without error feedback
        results: dict[str, torch.Tensor | str] = {}
        live, mine = [], []
        for item, parts in zip(group.items, received):
            error = self._poisoned(item, parts)
            if error is not None:
                results[item.name] = error
                continue
            lo, hi = item.chunks[rank]
            if item.raw:
                mine.append(rank_order_sum(parts).view(torch.uint8))
            else:
                payloads = [self.codec.from_bytes(parts[p], hi - lo, self._context(item, rank, p))
                            for p in range(ranks)]
                mean, st = self.codec.aggregate(payloads, self._context(item, rank, 0))
                self.decode.add(st)
                renc = second.encode(mean, self._context(item, rank, rank, "@reduced"))
                self._record(renc, 0)  # these coordinates were counted when scattered
                mine.append(renc.to_bytes())
            live.append(item)
        home = group.items[0].device
        gathered = self.coll.allgather_bytes(torch.cat([_header([b.numel() for b in mine], home), *mine]),
                                             f"hvdquant.{live[0].name if live else 'none'}.gather")
        self.stats.record(0, gathered.nbytes)
        owned = [_split(buf, len(live)) for buf in raise_if_poisoned(gathered.wait(), "group")]
        for i, item in enumerate(live):
            result = torch.empty(item.numel, dtype=torch.float32, device=item.device)
            for c, (clo, chi) in enumerate(item.chunks):
                if item.raw:
                    result[clo:chi] = owned[c][i].clone().view(torch.float32)
                else:
                    cctx = self._context(item, c, c, "@reduced")
                    result[clo:chi] = second.decode(second.from_bytes(owned[c][i], chi - clo, cctx), cctx)
            results[item.name] = self._output(result if not item.raw else result / ranks)
        return results


def statistics(handed: CommStats, payload: CommStats, entropy_bits: float, decode: DecodeStats) -> dict:
    """What every exchange reports: measured bits per coordinate (bytes handed, second rounds
    included), the bits of the codec's payloads alone, the empirical entropy of the symbols and
    what nested decoding recovered."""
    pc = payload.coordinates
    return {"bits_per_coordinate": handed.bits_per_coordinate,
            "payload_bits_per_coordinate": payload.bits_per_coordinate,
            "entropy_bits_per_coordinate": entropy_bits / pc if pc else float("nan"),
            "bytes_handed": handed.bytes_handed,
            "coordinates": handed.coordinates,  # every coordinate exchanged (compressed or not)
            "compressed_coordinates": pc,  # those a codec encoded (the rest: float32)
            "failed_buckets": decode.failed_buckets,
            "failed_coordinates": decode.failed_coordinates,
            "recovery_rounds": decode.recovery_rounds,
            "recovery_bytes": decode.recovery_bytes}


def check_kind(kind: str, state: dict) -> None:
    """Refuse a checkpoint written by another kind of exchange, before anything is restored."""
    theirs = state.get("kind")
    if theirs == kind:
        return
    if "lgc" in (kind, theirs):
        raise ValueError("checkpoint and optimizer disagree on LGC: the checkpoint "
                         + ("has no LGC state, the optimizer's codec is hvdquant.LGC" if kind == "lgc"
                            else "has LGC state, the optimizer's codec is not hvdquant.LGC"))
    raise ValueError(f"checkpoint holds {theirs!r} exchange state; this optimizer's exchange is {kind!r}")
