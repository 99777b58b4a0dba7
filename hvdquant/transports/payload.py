"""Payload transports, for codecs whose payloads cannot be summed (docs/ALGORITHMS.md §3).

:class:`PayloadExchange` queues one item per segment of ``start(buffer)``; uncompressed segments
are queued as float32 bytes (summed in rank order). The finisher returns the averaged (or summed)
gradient. **Fusion** (:mod:`~hvdquant.transports.fusion`): ``send()`` (a DDP bucket's hook) or the
first finisher called sends everything queued, sorted by name and cut into groups of at most
``fusion_threshold`` gradient bytes (like Horovod's fusion buffer); each group is encoded by one
call of the codec's group encoder (:meth:`~hvdquant.codecs.base.Codec.encode_group`: one kernel
launch per phase for the whole group where the codec has segmented kernels, as DQSG, 1-bit SGD,
QSGD and ECDQ do), travels in one collective round per phase, and is aggregated by one call of the
codec's group aggregation, so neither the rounds nor the launches per step grow with the number of
tensors. A group's buffer from one rank is a header of int64 sizes (−1 where that rank's gradient
was not finite: every rank then raises ``FloatingPointError`` naming the tensor and the ranks)
followed by the payloads.

The reducer (:mod:`~hvdquant.transports.reductions`) decides how a group travels and is aggregated:
``allgather`` (every rank aggregates every rank's payloads) or ``scatter_reduce`` (each rank owns
one chunk of every tensor, aggregates and re-encodes it, then the re-encodings are allgathered).
Both are written once against :class:`~hvdquant.transports.collectives.Collectives`.

This module also holds what every exchange reports and checks: :func:`statistics`, :func:`check_kind`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hvdquant.codecs.base import Codec, Encoded, all_finite
from hvdquant.codecs.state import CodecState
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import Collectives, check_finite_output
from hvdquant.transports.fused import FusedBuffer, Segment
from hvdquant.transports.fusion import FusionQueue, Group, Item
from hvdquant.transports.reductions import REDUCTIONS, innermost

REDUCERS = tuple(REDUCTIONS)
FUSION_THRESHOLD = 64 << 20  # gradient bytes per fused group (Horovod's fusion buffer is 64 MiB too)


class PayloadExchange:
    """Moves one codec's payloads with one reducer over ``collectives``, fused per group.

    ``stats`` counts the bytes handed to the collectives (headers, payloads, size and status words,
    second rounds); ``payload`` only what the codec produced; ``decode`` what nested decoding
    recovered. ``codec_state``: what the codec keeps between steps (error-feedback residuals, adaptive
    nesting's decisions), passed in every context and checkpointed here. ``reduction``: the
    reducer's rules (chunks, contexts, rounds); ``fusion``: the items queued since the last flush."""

    kind = "payload"

    def __init__(self, codec: Codec, reducer: str, average: bool, collectives: Collectives,
                 fusion_threshold: int = FUSION_THRESHOLD) -> None:
        if reducer not in REDUCERS:
            raise ValueError(f"reducer={reducer!r} must be one of {REDUCERS}")
        if reducer == "scatter_reduce" and hasattr(innermost(codec), "recovery_payload"):
            raise ValueError(f"{type(innermost(codec)).__name__} needs reducer='allgather': its side-information "
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
        self.reduction = REDUCTIONS[reducer](self)
        self.fusion = FusionQueue(fusion_threshold)

    def config(self) -> dict:
        return {"codec": self.codec.config(), "reducer": self.reducer, "average": self.average,
                "fusion_threshold": self.fusion_threshold}

    def record_payload(self, enc: Encoded, coordinates: int) -> None:
        """Count a payload the codec produced (its bytes, and its entropy where the codec has one)."""
        self.payload.record(coordinates, enc.nbytes())
        entropy = enc.entropy()
        if entropy is not None:
            self.entropy_bits += enc.n * entropy + enc.side_bits

    def outputs(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A group's means over ranks (per tensor name) as this exchange returns them (the sums where
        not ``average``), checked finite in one check."""
        outs = means if self.average else {name: mean * self.coll.size for name, mean in means.items()}
        check_finite_output(list(outs.values()))
        return outs

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
    def start(self, buffer: FusedBuffer) -> Callable[[], torch.Tensor]:
        """Queue every segment of the buffer (its group encodes the compressed ones when it is sent)
        and return the finisher of the whole buffer."""
        items = [self._item(buffer, s) if s.compressed else self._raw(buffer, s) for s in buffer.segments]
        for item in items:
            self.stats.record(item.numel, 0)
        self.fusion.add(items)

        def finish() -> torch.Tensor:
            return buffer.join([self._result(item) for item in items])

        return finish

    def send(self) -> None:
        """Start the rounds of the segments queued since the last call (their groups' first rounds)."""
        self._flush()

    def _result(self, item: Item) -> torch.Tensor:
        """``item``'s output, sending and finishing its group first if that has not happened."""
        if item.group is None:
            self._flush()
        if item.group.results is None:
            item.group.results = self.reduction.finish(item.group)
        result = item.group.results.pop(item.name)
        if isinstance(result, str):
            raise FloatingPointError(result)
        return result

    def _item(self, buffer: FusedBuffer, seg: Segment) -> Item:
        """A compressed segment's queue entry, holding its gradient until its group is encoded."""
        return Item(seg.name, seg.shape, False, seg.key.seed, seg.key.step, self.reduction.chunks(seg.length), None,
                    buffer.device, source=buffer.part(seg))

    def _encode(self, items: list[Item]) -> None:
        """Encode every chunk of a group's compressed items in one call of the codec's group encoder
        (a constant number of kernel launches where the codec has segmented kernels); ``sent`` stays
        None where a gradient is not finite (every rank then raises instead of leaving the others
        waiting)."""
        compressed = [item for item in items if not item.raw]
        parts, ctxs, owners = [], [], []
        for item in compressed:
            flat, item.source = item.source, None
            try:
                chunks = self.reduction.parts(item, flat)
            except FloatingPointError:
                continue
            for part, ctx in chunks:
                parts.append(part)
                ctxs.append(ctx)
                owners.append(item)
        for item, enc in zip(owners, self.codec.encode_group(parts, ctxs), strict=True):
            item.encodings.append(enc)
        for item in compressed:
            if not item.encodings or any(enc is None for enc in item.encodings):
                item.encodings = []
                continue
            for enc in item.encodings:
                self.record_payload(enc, enc.n)
            item.sent = [enc.byte_views() for enc in item.encodings]

    def _raw(self, buffer: FusedBuffer, seg: Segment) -> Item:
        """An uncompressed segment: its float32 values are summed in rank order (exact and
        reproducible, unlike a float allreduce whose order may change with the framework's fusion)."""
        flat = buffer.part(seg)
        item = Item(seg.name, seg.shape, True, 0, 0, self.reduction.chunks(seg.length), None, buffer.device)
        if all_finite(flat):
            item.sent = [[flat[lo:hi].contiguous().view(torch.uint8)] for lo, hi in item.chunks]
        return item

    # ------------------------------------------------------------------ sending (at the first finisher)
    def _flush(self) -> None:
        """Cut everything queued into groups and start every group's first round."""
        groups: list[Group] = self.fusion.flush()
        for g, group in enumerate(groups):
            self._encode(group.items)
            group.started = self.reduction.send(group, f"hvdquant.group{g}")
            self.stats.record(0, group.started.nbytes)


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
