"""Horovod adapter: hvdquant codecs as Horovod compression objects.

Horovod's contract (``horovod/torch/compression.py``) is two functions, ``compress(tensor) ->
(payload, ctx)`` and ``decompress(reduced_payload, ctx) -> tensor``, with the payload reduced by a
stock allreduce in between. Use::

    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=hvdquant.Compression.dqsg(levels=1, bucket_size=512))

How DQSG fits that contract (docs/ALGORITHMS.md §3): ``compress`` agrees one step Δ_b per bucket with
the other ranks (a small synchronous MAX allreduce of per-bucket max|g|), encodes with this rank's
dither stream, and packs the indices into summable float64 fields with a sentinel
(:class:`~hvdquant.transports.SumFieldLayout`). Horovod sums (or averages) the words;
``decompress`` recovers the reduction's factor from the sentinel, the exact index sums from the
fields, regenerates all P senders' dithers and returns factor · Σ_p ĝ_p: the mean under
``op=hvd.Average`` (any ``gradient_predivide_factor``) and the sum under ``op=hvd.Sum``.

Horovod passes no tensor name, step or rank to ``compress``. The dither key needs a name that is
equal on every rank, so it is read from the calling Horovod frame (``DistributedOptimizer``'s
``_allreduce_grad_async`` or ``hvd.allreduce(..., name=...)``); pass ``name=`` when calling
``compress`` directly. Call sites whose reduction would scramble the fields (Adasum, grouped
allreduce, reducescatter, Min/Max/Product, non-global process sets) are refused with an error.

CUDA gradients: the bucket maxima, quantization and decoding run in the CUDA kernels on the
gradient's device and the decompressed gradient lands there; the word handed to Horovod is a host
tensor, so the setup's CPU-only Horovod runs it, and the maxima and fields travel through host
memory (or stay on the GPU where Horovod was built with NCCL; :class:`HorovodCollectives`).

The scale agreement is a blocking collective inside Horovod's gradient hook: like PyTorch DDP,
it relies on every rank firing the hooks in the same order (true for the same model and graph).
Horovod's stall check reports a violation after 60 s instead of a silent hang.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.ndqsg import NDQSG
from hvdquant.stats import CommStats, DecodeStats, nbytes
from hvdquant.transports.collectives import HorovodCollectives, check_finite_output, horovod
from hvdquant.transports.exchange import make_exchange
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.groups import GROUP_THRESHOLD
from hvdquant.transports.session import Session, check_seed
from hvdquant.transports.sum_schemes import scheme_for
from hvdquant.transports.summed import SummedExchange


def _call_site() -> str:
    """The Horovod tensor name of the current compress() call; refuses unsupported call sites."""
    hvd = horovod()
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        fn = frame.f_code.co_name
        if module == "horovod.torch.optimizer":
            opt = frame.f_locals.get("self")
            if fn == "_allreduce_grad_async" and not hasattr(opt, "_starting_models"):
                if opt.op not in (hvd.Average, hvd.Sum):
                    raise ValueError("hvdquant compression supports op=hvd.Average or hvd.Sum only")
                if opt.process_set is not hvd.global_process_set:
                    raise NotImplementedError("hvdquant compression supports the global process set only")
                return frame.f_locals["name"]
            raise NotImplementedError(
                f"hvdquant compression cannot run inside Horovod's {fn} "
                "(Adasum and groups=/num_groups= are not supported: use the default ungrouped Average/Sum)")
        if module == "horovod.torch.mpi_ops":
            if fn != "allreduce":
                raise NotImplementedError(f"hvdquant compression is for allreduce, not hvd.{fn}")
            op = frame.f_locals.get("op")
            if op not in (None, hvd.Average, hvd.Sum):
                raise ValueError("hvdquant compression supports op=hvd.Average or hvd.Sum only")
            if frame.f_locals.get("process_set") is not hvd.global_process_set:
                raise NotImplementedError("hvdquant compression supports the global process set only")
            name = frame.f_locals.get("name")
            if name is None:
                raise ValueError("hvd.allreduce(..., compression=hvdquant...) needs name=: the dither "
                                 "key is derived from the tensor name, which must match on every rank")
            return name
        frame = frame.f_back
    raise ValueError("compress() was not called by Horovod: pass name= (equal on every rank)")


class Metered:
    """Wraps any Horovod compressor and measures the bytes it hands to the allreduce."""

    def __init__(self, compressor: Any) -> None:
        self.compressor = compressor
        self.stats = CommStats()

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        payload, ctx = self.compressor.compress(tensor)
        self.stats.record(tensor.numel(), nbytes(payload))
        return payload, ctx

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.compressor.decompress(tensor, ctx)


@dataclass(frozen=True)
class SumContext:
    """What ``decompress`` needs of a ``compress``: the tensor's fused buffer and its finisher."""

    buffer: FusedBuffer
    finish: Callable[[], torch.Tensor]


class SummedCompression:
    """A summable codec (DQSG, NDQSG) as a Horovod compression object: the thin shim between
    Horovod's ``compress``/``decompress`` and a summable-allreduce exchange
    (:class:`~hvdquant.transports.summed.SummedExchange`) held by one
    :class:`~hvdquant.transports.session.Session` (agreement, seed, step counters, checkpoint).

    ``compress`` never waits on other ranks after the first step (whose configuration agreement is
    one blocking allgather): it starts the exchange of the tensor and hands Horovod one float64 word,
    1.0, in host memory whatever the gradient's device (Horovod's CPU-only build reduces it as it
    is). Horovod sums or averages the words; the reduced word, c·P, reveals the factor c Horovod
    applied (Sum: 1, Average: 1/P, pre/postscale factors). The first step's tensors are exchanged
    together at the first ``decompress``; from the second step on, tensors travel in groups of at
    least ``group_threshold`` gradient bytes cut from rank 0's first-step hook order
    (:mod:`hvdquant.transports.groups`): a group's MAX round starts once its last tensor is
    compressed and its fields' SUM round once the maxima are in, while backward still runs, as
    Horovod's own allreduces do. ``group_threshold=None`` keeps everything for the first
    ``decompress`` (one MAX and one SUM round per step). Each ``decompress`` returns c · Σ_p ĝ_p
    for its tensor; the groups change when the fields travel, not the result's bits. ``stats``
    measures the bytes handed to Horovod (scales and words included); ``entropy_bits_per_coordinate``
    is the zeroth-order entropy of the indices sent beside it."""

    def __init__(self, codec: DQSG | NDQSG, seed: int | None = None,
                 group_threshold: int | None = GROUP_THRESHOLD) -> None:
        check_seed(seed)
        scheme_for(codec)  # refuses a codec whose payloads cannot be summed
        self._codec, self._seed, self._group_threshold = codec, seed, group_threshold
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        """The job's session, made at first use (after ``hvd.init()``)."""
        if self._session is None:
            exchange = make_exchange(self._codec, "allreduce", False, HorovodCollectives(),
                                     group_threshold=self._group_threshold)
            self._session = Session(exchange, self._seed, "hvdquant")
        return self._session

    @property
    def exchange(self) -> SummedExchange:
        return self.session.exchange

    @property
    def codec(self) -> DQSG:
        """The fine quantizer DQSG(s₁) whose indices are summed."""
        return self.exchange.codec

    @property
    def stats(self) -> CommStats:
        return self.exchange.stats

    @property
    def decode_stats(self) -> DecodeStats:
        """Buckets recovered in a second round (nested decoding's failed checksums)."""
        return self.exchange.decode_stats

    @property
    def entropy_bits_per_coordinate(self) -> float:
        return self.exchange.entropy_bits_per_coordinate

    def state_dict(self) -> dict[str, Any]:
        """The session's checkpoint: agreed seed, per-name steps, nested side information."""
        return self.session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.session.load_state_dict(state)

    def compress(self, tensor: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, SumContext]:
        name = _call_site() if name is None else name
        session = self.session
        session.agree()
        buffer = session.buffer([(name, tensor)], None)
        finish = session.exchange.start(buffer)
        word = torch.ones(1, dtype=torch.float64, device="cpu")
        session.exchange.count_handed(word.numel() * word.element_size())
        return word, SumContext(buffer, finish)

    def decompress(self, reduced: torch.Tensor, ctx: SumContext) -> torch.Tensor:
        """c · Σ_p ĝ_p for the tensor of ``ctx`` (the mean under Average, the sum under Sum)."""
        if reduced.dtype != torch.float64 or reduced.numel() != 1:
            raise ValueError(f"reduced word has {reduced.numel()} {reduced.dtype} values, expected 1 float64")
        factor = float(reduced[0]) / self.session.coll.size
        if not 0.0 < factor < float("inf"):
            raise ValueError(f"the reduction scaled the payload by {factor!r}: only positive finite "
                             "factors (Sum, Average, pre/postscale) keep the packed fields decodable")
        out = ctx.finish()  # finite: the exchange checked it
        if factor != 1.0:
            out = out * factor  # not in place: a nested scheme keeps the sum as next step's side information
        if factor > 1.0:  # a postscale factor can overflow; c ≤ 1 (Sum, Average) cannot
            check_finite_output([out])
        (result,) = ctx.buffer.unflatten(out).values()
        return result


class DQSGCompression(SummedCompression):
    """DQSG as a Horovod compression object (stock ``hvd.DistributedOptimizer`` path).

    Parameters: ``levels`` (s), ``bucket_size`` (d), ``dither`` and ``rotation`` as in
    :class:`~hvdquant.codecs.DQSG` (``"stratified"``: decoding the sum regenerates one dither stream
    whatever the number of ranks; ``rotation="hadamard"``: buckets rotated by the shared randomized
    Hadamard transform, the summed indices rotated back once);
    ``seed``: the dither seed; ``None`` takes rank 0's ``torch.initial_seed()``;
    ``group_threshold``: gradient bytes per group sent during backward (:class:`SummedCompression`). At the first
    exchange all ranks exchange their configuration and fail with an error naming the first rank
    whose levels, bucket size, dither, rotation or seed differ from rank 0's. Dithers are keyed by (seed, step,
    tensor name, sender): the step counts the calls per tensor name, so they never depend on hook order."""

    def __init__(self, levels: int = 1, bucket_size: int = 512, seed: int | None = None,
                 dither: str = "stratified", rotation: str = "none",
                 group_threshold: int | None = GROUP_THRESHOLD) -> None:
        super().__init__(DQSG(levels, bucket_size, dither, rotation), seed, group_threshold)


class NestedSumCompression(SummedCompression):
    """Nested DQSG as a Horovod compression object: coset indices in summable fields, decoded with
    the previous step's mean as side information and failed buckets recovered by a second
    allreduce (:class:`~hvdquant.transports.nested_sum.NestedSum`; counts in ``decode_stats``).
    Pays off only for ρ well above P and slowly changing gradients (recovery traffic is counted);
    ``adaptive=True`` nests a tensor only while that pays (:class:`~hvdquant.transports.nested_sum.NestedSum`)."""

    def __init__(self, levels: tuple[int, int] = (3, 1), bucket_size: int = 512, seed: int | None = None,
                 adaptive: bool = True, group_threshold: int | None = GROUP_THRESHOLD) -> None:
        super().__init__(NDQSG(levels, bucket_size, adaptive=adaptive), seed, group_threshold)


def _not_summable(scheme: str, example: str):
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{scheme} payloads cannot be summed by Horovod's allreduce, so there is no "
                        f"hvdquant.Compression.{scheme.lower()}: use hvdquant.DistributedOptimizer(opt, "
                        f"named_parameters=..., codec={example}, reducer='allgather' or 'scatter_reduce')")

    return staticmethod(refuse)


class Compression:
    """Factory in the style of ``hvd.Compression``: ``hvdquant.Compression.dqsg(levels=1, bucket_size=512)``.

    Only schemes whose payloads Horovod can sum live here; the others refuse with a pointer to
    :func:`hvdquant.DistributedOptimizer`.
    """

    dqsg = DQSGCompression
    ndqsg = NestedSumCompression
    metered = Metered
    qsgd = _not_summable("QSGD", "hvdquant.QSGD(...)")
    onebit = _not_summable("OneBitSGD", "hvdquant.OneBitSGD()")

    @staticmethod
    def for_codec(codec: Any, seed: int | None = None, group_threshold: int | None = GROUP_THRESHOLD
                  ) -> SummedCompression:
        """The stock-path object for a summable codec (DQSG, NDQSG); others refuse, naming the payload path."""
        from hvdquant.codecs.base import Codec

        if not isinstance(codec, Codec):
            raise TypeError(f"expected an hvdquant codec, got {type(codec).__name__}")
        if not codec.summable:
            name = type(codec).__name__
            _not_summable(name, f"hvdquant.{name}(...)").__func__()
        return SummedCompression(codec, seed, group_threshold)
