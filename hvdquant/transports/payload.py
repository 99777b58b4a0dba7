"""Payload transports, for codecs whose payloads cannot be summed (docs/ALGORITHMS.md §3).

``start(name, tensor, seed, step)`` encodes this rank's gradient and starts the collectives
asynchronously (in the framework's gradient hook, overlapping the backward pass); it returns a
callable that waits, decodes and returns the averaged (or summed) gradient. The adapter runs those
callables in sorted tensor-name order, so any second round a codec asks for (NDQSG recovery, the
scatter-reduce allgather) starts in the same order on every rank.

- ``allgather``: every rank gathers every rank's payload and aggregates all of them with the codec
  (paper-faithful NDQSG, QSGD-Elias, 1-bit SGD). Wire cost per rank ≈ b·n·(P−1) bits.
- ``scatter_reduce``: the tensor is split into P bucket-aligned chunks; chunk c goes to rank c by
  all-to-all; its owner aggregates the P payloads, re-encodes the mean with the codec, **decodes its
  own re-encoding** and allgathers it, so every rank ends with the same bits. Two quantizations per
  coordinate; wire cost ≈ 2b·n·(P−1)/P bits.

Both are written once against :class:`~hvdquant.transports.collectives.Collectives`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hvdquant.codecs.base import Codec, Encoded, TensorContext, all_finite, empirical_entropy
from hvdquant.codecs.feedback import ErrorFeedback
from hvdquant.keys import dither_key
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import Collectives, check_finite_output, chunk_bounds, raise_if_poisoned

REDUCERS = ("allgather", "scatter_reduce")


def _innermost(codec: Codec) -> Codec:
    return codec.codec if isinstance(codec, ErrorFeedback) else codec


class PayloadExchange:
    """Moves one codec's payloads with one reducer over ``collectives``.

    ``stats`` counts the bytes handed to the collectives (payloads, size and status words, second
    rounds); ``payload`` only what the codec produced; ``decode`` what nested decoding recovered."""

    kind = "payload"

    def __init__(self, codec: Codec, reducer: str, average: bool, collectives: Collectives) -> None:
        if reducer not in REDUCERS:
            raise ValueError(f"reducer={reducer!r} must be one of {REDUCERS}")
        if reducer == "scatter_reduce" and hasattr(_innermost(codec), "recovery_payload"):
            raise ValueError(f"{type(_innermost(codec)).__name__} needs reducer='allgather': its side-information "
                             "decoder and recovery round need every sender's payload on every rank")
        self.codec, self.reducer, self.average = codec, reducer, average
        self.coll = collectives
        self.stats = CommStats()
        self.payload = CommStats()
        self.decode = DecodeStats()
        self.entropy_bits = 0.0  # Σ over tensors of n·(entropy + side bits per coordinate)

    def config(self) -> dict:
        return {"codec": self.codec.config(), "reducer": self.reducer, "average": self.average}

    def _record(self, enc: Encoded, coordinates: int, handed: int) -> None:
        self.stats.record(coordinates, handed)
        self.payload.record(coordinates, enc.nbytes())
        if enc.symbols is not None:
            self.entropy_bits += enc.n * empirical_entropy(enc.symbols, enc.alphabet) + enc.side_bits

    def statistics(self) -> dict:
        return statistics(self.stats, self.payload, self.entropy_bits, self.decode)

    def state_dict(self) -> dict:
        """Error-feedback residuals of this rank (empty for codecs without state)."""
        return {"kind": self.kind, "residuals": self.codec.state_dict() if hasattr(self.codec, "state_dict") else {}}

    def load_state_dict(self, state: dict) -> None:
        check_kind(self.kind, state)
        if hasattr(self.codec, "load_state_dict"):
            self.codec.load_state_dict(state["residuals"])

    def start(self, name: str, tensor: torch.Tensor, seed: int, step: int) -> Callable[[], torch.Tensor]:
        if self.reducer == "allgather":
            return self._allgather(name, tensor, seed, step)
        return self._scatter_reduce(name, tensor, seed, step)

    def _output(self, mean: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = mean if self.average else mean * self.coll.size
        check_finite_output(out)
        return out.reshape(shape).to(dtype)

    # ------------------------------------------------------------------ allgather
    def _allgather(self, name: str, tensor: torch.Tensor, seed: int, step: int) -> Callable[[], torch.Tensor]:
        rank, ranks = self.coll.rank, self.coll.size
        shape, dtype = tuple(tensor.shape), tensor.dtype
        ctx = TensorContext(name, shape, dither_key(seed, step, name, rank), ranks)
        tag = f"hvdquant.{name}"
        try:
            enc = self.codec.encode(tensor, ctx)
        except FloatingPointError:  # tell every rank instead of leaving them waiting
            poisoned = self.coll.allgather_bytes(None, tag)
            return lambda: raise_if_poisoned(poisoned.wait(), name)
        gathered = self.coll.allgather_bytes(enc.to_bytes(), tag)
        self._record(enc, enc.n, gathered.nbytes)

        def recover(failed: dict[int, list[int]]) -> dict[int, torch.Tensor]:
            mine = (self.codec.recovery_payload(enc, ctx, failed[rank]) if rank in failed
                    else torch.empty(0, dtype=torch.uint8))
            round_ = self.coll.allgather_bytes(mine, f"{tag}.recovery")
            self.stats.record(0, round_.nbytes)  # recovery traffic is on the wire too
            self.decode.recovery_bytes += round_.nbytes
            parts = raise_if_poisoned(round_.wait(), name)
            return {p: parts[p] for p in failed}

        def finish() -> torch.Tensor:
            parts = raise_if_poisoned(gathered.wait(), name)
            payloads = [self.codec.from_bytes(parts[p], enc.n, ctx.sender(p)) for p in range(ranks)]
            mean, st = self.codec.aggregate(payloads, ctx, recover)
            self.decode.add(st)
            return self._output(mean, shape, dtype)

        return finish

    # ------------------------------------------------------------------ scatter-reduce-allgather
    def _scatter_reduce(self, name: str, tensor: torch.Tensor, seed: int, step: int) -> Callable[[], torch.Tensor]:
        rank, ranks = self.coll.rank, self.coll.size
        shape, dtype = tuple(tensor.shape), tensor.dtype
        flat = tensor.detach().reshape(-1)
        # P contiguous ranges cut at bucket boundaries where the codec has buckets
        chunks = chunk_bounds(flat.numel(), ranks, getattr(_innermost(self.codec), "bucket_size", 1))
        tag = f"hvdquant.{name}"

        def chunk_ctx(c: int, sender: int, phase: str) -> TensorContext:
            lo, hi = chunks[c]
            cname = f"{name}#{c}{phase}"
            return TensorContext(cname, (hi - lo,), dither_key(seed, step, cname, sender), ranks)

        encs = [self.codec.encode(flat[lo:hi], chunk_ctx(c, rank, "")) for c, (lo, hi) in enumerate(chunks)] \
            if all_finite(flat) else None
        scattered = self.coll.alltoall_bytes(None if encs is None else [e.to_bytes() for e in encs],
                                             f"{tag}.scatter")
        for i, e in enumerate(encs or []):
            self._record(e, e.n, scattered.nbytes if i == 0 else 0)
        if encs is None:
            self.stats.record(0, scattered.nbytes)
        second = _innermost(self.codec)  # the owner re-encodes without error feedback

        def finish() -> torch.Tensor:
            parts = raise_if_poisoned(scattered.wait(), name)
            lo, hi = chunks[rank]
            payloads = [self.codec.from_bytes(parts[p], hi - lo, chunk_ctx(rank, p, "")) for p in range(ranks)]
            mean, st = self.codec.aggregate(payloads, chunk_ctx(rank, 0, ""))
            self.decode.add(st)
            renc = second.encode(mean, chunk_ctx(rank, rank, "@reduced"))
            gathered = self.coll.allgather_bytes(renc.to_bytes(), f"{tag}.gather")
            self._record(renc, 0, gathered.nbytes)  # these coordinates were counted when scattered
            owned = raise_if_poisoned(gathered.wait(), name)
            result = torch.empty(flat.numel(), dtype=torch.float32)
            for c, (clo, chi) in enumerate(chunks):
                cctx = chunk_ctx(c, c, "@reduced")
                result[clo:chi] = second.decode(second.from_bytes(owned[c], chi - clo, cctx), cctx)
            return self._output(result, shape, dtype)

        return finish


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
