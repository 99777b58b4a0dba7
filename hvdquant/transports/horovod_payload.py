"""Payload transports over Horovod collectives, for codecs whose payloads cannot be summed.

``start(name, tensor)`` encodes this rank's gradient and starts the collectives asynchronously (in
Horovod's gradient hook, overlapping the backward pass); it returns a callable that waits, decodes
and returns the averaged (or summed) gradient. The callables are run by
:class:`hvdquant.DistributedOptimizer` in sorted parameter-name order, so any second round a codec
asks for (NDQSG recovery, the scatter-reduce allgather) starts in the same order on every rank.

- ``allgather`` (ALGORITHMS.md §3): every rank allgathers every rank's payload (plus its size) and
  aggregates all of them with the codec (paper-faithful NDQSG, QSGD-Elias, 1-bit SGD). Wire cost per
  rank ≈ b·n·(P−1) bits.
- ``scatter_reduce``: the tensor is split into P bucket-aligned chunks; chunk c goes to rank c by
  alltoall; its owner aggregates the P payloads, re-encodes the mean with the codec, **decodes its
  own re-encoding** and allgathers it, so every rank ends with the same bits (CGX, DeepSpeed). Two
  quantizations per coordinate; wire cost ≈ 2b·n·(P−1)/P bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hvdquant.codecs.base import AggregateStats, Codec, Encoded, TensorContext, all_finite
from hvdquant.codecs.feedback import ErrorFeedback
from hvdquant.codecs.lgc import LGC
from hvdquant.codecs.ndqsg import NDQSG
from hvdquant.kernels import DitherKey, tensor_id
from hvdquant.stats import CommStats
from hvdquant.transports.ring import chunk_bounds

REDUCERS = ("allgather", "scatter_reduce")


def check_finite_output(out: torch.Tensor) -> None:
    """Finite inputs can still decode past float32's range (|g| near 3.4e38: Δ(k − u) exceeds it).
    Every rank decodes the same bits, so every rank raises; no inf reaches the parameters."""
    if not all_finite(out):
        raise FloatingPointError("decoded gradient overflows float32 (inputs near float32's maximum); "
                                 "scale the loss down")


def _hvd():
    import horovod.torch as hvd

    return hvd


def _sync(handle):
    out = _hvd().synchronize(handle)
    return out[0] if isinstance(out, tuple) else out


def _innermost(codec: Codec) -> Codec:
    return codec.codec if isinstance(codec, ErrorFeedback) else codec


@dataclass
class ExchangeTotals:
    """Decode statistics summed over every tensor and step (exposed as ``optimizer.hvdquant_stats``)."""

    failed_buckets: int = 0
    failed_coordinates: int = 0
    recovery_rounds: int = 0
    recovery_bytes: int = 0

    def add(self, st: AggregateStats) -> None:
        self.failed_buckets += st.failed_buckets
        self.failed_coordinates += st.failed_coordinates
        self.recovery_rounds += st.recovery_rounds


def allgather_bytes(buf: torch.Tensor | None, name: str):
    """Start allgathers of a uint8 buffer and its size; returns a waiter giving every rank's bytes.

    ``buf=None`` poisons the exchange (this rank's gradient was not finite): the size word is −1,
    and every rank's waiter raises the same FloatingPointError once both collectives completed.
    """
    hvd = _hvd()
    poisoned = buf is None
    buf = torch.empty(0, dtype=torch.uint8) if poisoned else buf
    size = torch.tensor([-1 if poisoned else buf.numel()], dtype=torch.int64)
    h_size = hvd.allgather_async(size, name=f"{name}.size")
    h_data = hvd.allgather_async(buf.unsqueeze(1), name=f"{name}.data")  # 2-D: rows may be 0

    def wait() -> list[torch.Tensor]:
        sizes = _sync(h_size).tolist()
        data = _sync(h_data).reshape(-1)
        bad = [r for r, s in enumerate(sizes) if s < 0]
        if bad:
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{name}' on rank(s) {bad}; "
                                     "hvdquant refuses to quantize it (every rank raises)")
        return list(torch.split(data, sizes))

    return wait, size


class PayloadExchange:
    """Moves one codec's payloads with one reducer. ``stats`` measures the bytes handed to Horovod:
    ``payload`` bytes (what the codec produced) and ``overhead`` (size words for variable lengths)."""

    def __init__(self, codec: Codec, reducer: str, average: bool) -> None:
        if reducer not in REDUCERS:
            raise ValueError(f"reducer={reducer!r} must be one of {REDUCERS}")
        if reducer == "scatter_reduce" and not isinstance(codec, LGC) and isinstance(_innermost(codec), NDQSG):
            raise ValueError("NDQSG needs reducer='allgather': its side-information decoder and recovery "
                             "round need every sender's payload on every rank")
        self.codec, self.reducer, self.average = codec, reducer, average
        self.stats = CommStats()
        self.lgc = None
        if isinstance(codec, LGC):  # a staged protocol of its own (hvdquant/transports/lgc_exchange.py)
            if reducer != "allgather":
                raise ValueError("LGC runs its own protocol: use reducer='allgather' (its form= picks "
                                 "parameter-server or ring)")
            from hvdquant.transports.lgc_exchange import LGCExchange

            self.lgc = LGCExchange(codec, average, self.stats)
        self.payload = CommStats()
        self.totals = ExchangeTotals()
        self.entropy_bits = 0.0  # Σ over tensors of n·(entropy + side bits per coordinate)

    def _record(self, name: str, enc: Encoded, handed: list[torch.Tensor]) -> None:
        from hvdquant.codecs.base import empirical_entropy

        self.stats.record(name, enc.n, *handed)
        self.payload.record(name, enc.n, *enc.fields.values())
        if enc.symbols is not None:
            self.entropy_bits += enc.n * empirical_entropy(enc.symbols, enc.alphabet) + enc.side_bits

    @property
    def entropy_bits_per_coordinate(self) -> float:
        return self.entropy_bits / self.payload.coordinates if self.payload.coordinates else float("nan")

    def start(self, name: str, tensor: torch.Tensor, seed: int, step: int) -> Callable[[], torch.Tensor]:
        if self.lgc is not None:
            return self.lgc.start(name, tensor, seed, step)
        if self.reducer == "allgather":
            return self._allgather(name, tensor, seed, step)
        return self._scatter_reduce(name, tensor, seed, step)

    # ------------------------------------------------------------------ allgather
    def _allgather(self, name: str, tensor: torch.Tensor, seed: int, step: int) -> Callable[[], torch.Tensor]:
        hvd = _hvd()
        rank, ranks = hvd.rank(), hvd.size()
        shape, dtype = tuple(tensor.shape), tensor.dtype
        ctx = TensorContext(name, shape, DitherKey(seed, step, tensor_id(name), rank), ranks)
        try:
            enc = self.codec.encode(tensor, ctx)
        except FloatingPointError:  # tell every rank instead of leaving them waiting
            wait, _ = allgather_bytes(None, f"hvdquant.{name}")
            return wait
        buf = enc.to_bytes()
        wait, size = allgather_bytes(buf, f"hvdquant.{name}")
        self._record(name, enc, [buf, size])

        def recover(failed: dict[int, list[int]]) -> dict[int, torch.Tensor]:
            mine = (self.codec.recovery_payload(enc, ctx, failed[rank]) if rank in failed
                    else torch.empty(0, dtype=torch.uint8))
            self.totals.recovery_bytes += mine.numel()
            got, size = allgather_bytes(mine, f"hvdquant.{name}.recovery")
            self.stats.record(name, 0, mine, size)  # recovery traffic is on the wire too
            parts = got()
            return {p: parts[p] for p in failed}

        def finish() -> torch.Tensor:
            parts = wait()
            payloads = [self.codec.from_bytes(parts[p], enc.n, ctx.sender(p)) for p in range(ranks)]
            mean, st = self.codec.aggregate(payloads, ctx, recover)
            self.totals.add(st)
            return self._output(mean, ranks, shape, dtype)

        return finish

    # ------------------------------------------------------------------ scatter-reduce-allgather
    def _scatter_reduce(self, name: str, tensor: torch.Tensor, seed: int, step: int) -> Callable[[], torch.Tensor]:
        hvd = _hvd()
        rank, ranks = hvd.rank(), hvd.size()
        shape, dtype = tuple(tensor.shape), tensor.dtype
        flat = tensor.detach().reshape(-1)
        # P contiguous ranges cut at bucket boundaries where the codec has buckets
        chunks = chunk_bounds(flat.numel(), ranks, getattr(_innermost(self.codec), "bucket_size", 1))

        def chunk_ctx(c: int, sender: int, phase: str) -> TensorContext:
            lo, hi = chunks[c]
            cname = f"{name}#{c}{phase}"
            return TensorContext(cname, (hi - lo,), DitherKey(seed, step, tensor_id(cname), sender), ranks)

        finite = all_finite(flat)
        status = hvd.allgather_async(torch.tensor([0 if finite else 1], dtype=torch.int64),
                                     name=f"hvdquant.{name}.status")
        encs = [self.codec.encode(flat[lo:hi], chunk_ctx(c, rank, "")) for c, (lo, hi) in enumerate(chunks)] \
            if finite else []
        bufs = [e.to_bytes() for e in encs] or [torch.empty(0, dtype=torch.uint8)] * ranks
        splits = torch.tensor([b.numel() for b in bufs], dtype=torch.int32)
        send = torch.cat(bufs)
        h = hvd.alltoall_async(send, splits=splits, name=f"hvdquant.{name}.scatter")
        for e, b in zip(encs, bufs):
            self._record(name, e, [b])
        self.stats.record(name, 0, splits)
        second = _innermost(self.codec)  # the owner re-encodes without error feedback

        def finish() -> torch.Tensor:
            bad = torch.nonzero(_sync(status)).flatten().tolist()
            out = _hvd().synchronize(h)
            if bad:
                raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{name}' on rank(s) {bad}; "
                                         "hvdquant refuses to quantize it (every rank raises)")
            received, rsplits = out if isinstance(out, tuple) else (out, None)
            sizes = rsplits.tolist() if rsplits is not None else None
            parts = list(torch.split(received, sizes))
            lo, hi = chunks[rank]
            payloads = [self.codec.from_bytes(parts[p], hi - lo, chunk_ctx(rank, p, "")) for p in range(ranks)]
            mean, st = self.codec.aggregate(payloads, chunk_ctx(rank, 0, ""))
            self.totals.add(st)
            rctx = chunk_ctx(rank, rank, "@reduced")
            renc = second.encode(mean, rctx)
            rbuf = renc.to_bytes()
            wait, size = allgather_bytes(rbuf, f"hvdquant.{name}.gather")
            self._record(name, renc, [rbuf, size])
            self.payload.coordinates -= renc.n  # count each coordinate once in bits per coordinate
            self.stats.coordinates -= renc.n
            owned = wait()
            result = torch.empty(flat.numel(), dtype=torch.float32)
            for c, (clo, chi) in enumerate(chunks):
                cctx = chunk_ctx(c, c, "@reduced")
                result[clo:chi] = second.decode(second.from_bytes(owned[c], chi - clo, cctx), cctx)
            return self._output(result, ranks, shape, dtype)

        return finish

    def _output(self, mean: torch.Tensor, ranks: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = mean if self.average else mean * ranks
        check_finite_output(out)
        return out.reshape(shape).to(dtype)
