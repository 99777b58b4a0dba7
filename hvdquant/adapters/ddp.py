"""PyTorch DDP adapter: hvdquant codecs as a DDP communication hook (``hvdquant.ddp``).

Use::

    state = hvdquant.ddp.State(codec=hvdquant.DQSG(levels=1, bucket_size=512), reducer="allreduce")
    ddp_model.register_comm_hook(state, hvdquant.ddp.hook)

``reducer="allreduce"`` sums DQSG indices (or NDQSG coset indices) in summable float64 fields
(:class:`~hvdquant.transports.summed.SummedExchange`); ``"allgather"`` and ``"scatter_reduce"`` move
any codec's payloads (:func:`~hvdquant.transports.exchange.make_exchange`: DQSG, NDQSG, QSGD, 1-bit
SGD and top-k with error feedback, LGC on ``"allgather"``). Collectives run over torch.distributed
(:class:`~hvdquant.transports.torchdist.TorchDistCollectives`): Gloo, NCCL or MPI, no Horovod.

How a bucket is exchanged. DDP hands the hook a flat bucket of several parameters' gradients and
runs the hooks of a step in increasing bucket index on every rank. The hook starts the bucket's
exchange, starts its rounds (``send``: they travel while backward computes the next buckets) and
returns a future; the step's last hook finishes every bucket in bucket order and completes their
futures with the **mean** (DDP waits for them only after the last hook). Every rank starts the same
rounds in the same order, since which round starts in which hook depends only on the buckets, never
on timing: Gloo and NCCL match collectives by order. A bucket is one fused buffer
(:class:`~hvdquant.transports.fused.FusedBuffer`) handed to the State's one exchange: every
parameter with at least 2 dimensions and ``min_numel`` elements is a compressed segment named
``ddp.param<i>`` (i: the order in which the hook first saw the parameter: the same on every rank,
and in a new DDP model after a restart), keyed by its own step counter. On the payload reducers
the bucket travels in one fused round per phase; on the summable allreduce one MAX allreduce
carries every tensor's bucket maxima and one SUM allreduce every tensor's fields. The other
parameters (biases, norms) travel uncompressed: their float32 values are summed in rank order
(PowerSGD's rule; exact and independent of the bucket layout). The first ``warmup_steps``
iterations are plain float32 allreduces, one per parameter (PowerSGD's ``start_powerSGD_iter``;
per parameter so that a restart continues bit for bit). Codecs run where the bucket lives: a CUDA
bucket is encoded and decoded by the CUDA kernels on the GPU, and only the payloads move (on NCCL
they stay on the GPU, on Gloo they are staged through host memory;
:class:`~hvdquant.transports.torchdist.TorchDistCollectives`).

Why keys per parameter and not per bucket: DDP puts every parameter in one bucket at the first
iteration and rebuilds its buckets afterwards (and again in a new DDP model after a restart). Keys,
step counters, error-feedback residuals and nested side information keyed by parameter do not
depend on that layout, and every sum is exact or in rank order per coordinate, so a resumed job
continues bit for bit, and residuals stay with their parameters.

Guarantees, as on the Horovod paths:
- dither keys are (agreed seed, step, parameter name, sender), the step counting the parameter's
  exchanges, identical on every rank; replicas stay bit-identical (every sum is exact or runs in
  the same order on every rank);
- the configuration (codec, reducer, min_numel, warm-up, seed, restored state, the first bucket's
  parameter shapes) is agreed at the first step; a difference fails on every rank, naming the
  first differing rank;
- a non-finite gradient makes every rank raise ``FloatingPointError`` from ``backward()`` (from the
  step's last hook);
- :meth:`State.state_dict` holds the session's state (step counters, the agreed seed, the
  exchange's residuals, nesting decisions and side information) and the iteration, so a job
  restarted into a new DDP model continues bit for bit;
- :meth:`State.statistics` measures the bits per coordinate handed to the collectives.

(No ``from __future__ import annotations`` here: DDP checks that the hook's annotations are the
real types ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]``.)
"""

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hvdquant.codecs.base import Codec, all_finite
from hvdquant.codecs.lgc import LGC
from hvdquant.stats import CommStats
from hvdquant.transports.exchange import REDUCERS, Exchange, make_exchange
from hvdquant.transports.session import Session
from hvdquant.transports.torchdist import TorchDistCollectives


class State:
    """The hook's state: one :class:`~hvdquant.transports.session.Session` over one exchange (seed
    agreement, step counters, checkpoints), the warm-up and the parameter names.

    ``codec``: an hvdquant codec (``hvdquant.ErrorFeedback(codec)`` for error feedback);
    ``reducer``: "allreduce" (DQSG, NDQSG), "allgather" or "scatter_reduce"; ``seed``: the dither
    seed, default rank 0's ``torch.initial_seed()``; ``warmup_steps``: full-precision iterations
    first; ``min_numel``: parameters with fewer elements (or fewer than 2 dimensions) go
    uncompressed; ``process_group``: the DDP model's group (default: the global one). Build it
    after ``torch.distributed.init_process_group``.
    """

    def __init__(self, codec: Codec | LGC, reducer: str = "allreduce", seed: int | None = None,
                 warmup_steps: int = 0, min_numel: int = 1024, process_group: Any = None) -> None:
        for what, value in (("warmup_steps", warmup_steps), ("min_numel", min_numel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what} must be a non-negative int, got {value!r}")
        if reducer not in REDUCERS:
            raise ValueError(f"reducer={reducer!r} must be one of {REDUCERS}")
        self.codec, self.reducer = codec, reducer
        self.warmup_steps, self.min_numel = warmup_steps, min_numel
        self.session = Session(make_exchange(codec, reducer, True, TorchDistCollectives(process_group)), seed,
                               "hvdquant.ddp")
        self.iteration = 0  # completed backward passes that communicated (buckets with is_last())
        self.full = CommStats()  # warm-up buckets' float32 values
        self._ids: dict[int, int] = {}
        self._unfinished: list[tuple[torch.futures.Future, Callable[[], torch.Tensor], torch.Tensor]] = []

    @property
    def exchange(self) -> Exchange:
        return self.session.exchange

    # ------------------------------------------------------------------ checkpoints and statistics
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: the session's (steps, seed, the exchange's residuals, nesting decisions
        and side information) and the iteration."""
        return {"session": self.session.state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a State of the same configuration (agreed again at the next step)."""
        self.session.load_state_dict(state["session"])  # refuses a checkpoint of another kind first
        self.iteration = int(state["iteration"])

    def statistics(self) -> dict[str, Any]:
        """Measured bits per coordinate handed to the collectives (warm-up and uncompressed
        parameters included) and the exchange's own counters."""
        own = self.exchange.statistics()
        handed = CommStats(own["coordinates"] + self.full.coordinates, own["bytes_handed"] + self.full.bytes_handed)
        return {**own, "bits_per_coordinate": handed.bits_per_coordinate, "bytes_handed": handed.bytes_handed,
                "coordinates": handed.coordinates}

    # ------------------------------------------------------------------ one bucket
    def _name(self, p: torch.Tensor) -> str:
        return f"ddp.param{self._ids.setdefault(id(p), len(self._ids))}"

    def _allreduced(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The mean of float32 values by SUM allreduces, one per parameter, all in flight together
        (warm-up). The same bits on every rank; and per parameter, not per bucket, because a float
        sum's rounding depends on how the reduction cuts its input: a restarted DDP model has
        other buckets, and would otherwise not continue bit for bit."""
        coll = self.session.coll
        started = [coll.allreduce(piece, "hvdquant.ddp.full") for piece in pieces]
        for piece, s in zip(pieces, started):
            self.full.record(piece.numel(), s.nbytes)
        return _finite(torch.cat([s.wait() for s in started])) / coll.size

    def reduce(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """A future of the mean over ranks of ``bucket``'s gradients, in the buffer's dtype and
        device: completed at once during warm-up, else in the step's last hook."""
        buffer = bucket.buffer()
        params = bucket.parameters()
        self.session.agree(lambda: {"reducer": self.reducer, "min_numel": self.min_numel,
                                    "warmup_steps": self.warmup_steps, "iteration": self.iteration,
                                    "first_bucket": [tuple(p.shape) for p in params]})
        flat = buffer.detach().to(torch.float32).reshape(-1)
        grads = flat.split([p.numel() for p in params])
        fut = _future(buffer)
        if self.iteration < self.warmup_steps:
            fut.set_result(self._allreduced(list(grads)).to(buffer.device, buffer.dtype))
        else:
            fused = self.session.buffer([(self._name(p), g.view(p.shape)) for p, g in zip(params, grads)],
                                        self.min_numel, flat)  # the bucket is the buffer: no copy
            self._unfinished.append((fut, self.exchange.start(fused), buffer))
            self.exchange.send()
        if bucket.is_last():
            self.iteration += 1
            unfinished, self._unfinished = self._unfinished, []
            # in bucket order; the first finisher raises on every rank if a gradient was not finite
            for pending, finish, buf in unfinished:
                pending.set_result(finish().to(buf.device, buf.dtype))
        return fut


def _finite(t: torch.Tensor) -> torch.Tensor:
    if not all_finite(t):
        raise FloatingPointError("non-finite gradient (NaN or Inf) on at least one rank; hvdquant refuses to "
                                 "average it (every rank raises)")
    return t


def _future(buffer: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """An empty future for a result on ``buffer``'s device (a CUDA result needs a future that knows
    its device: it records the current stream's event; a torch without CUDA has no such futures,
    which only a simulated GPU meets)."""
    cuda = buffer.is_cuda and torch.cuda.is_available()
    return torch.futures.Future(devices=[buffer.device] if cuda else None)


def hook(state: State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp_model.register_comm_hook(state, hvdquant.ddp.hook)``. Starts
    the bucket's exchange and rounds and returns a future of the mean, completed in the step's last
    hook (at once during warm-up). Errors (a non-finite gradient, a configuration mismatch) are
    raised, not set on the future: DDP then re-raises them from every rank's ``backward()`` with
    their own type and message (a future's exception reaches ``backward()`` as an unrelated cast
    error)."""
    return state.reduce(bucket)


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """``torch.distributed.init_process_group`` for a job started by torchrun (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT set) or by mpirun (Open MPI's OMPI_COMM_WORLD_RANK/SIZE; MASTER_ADDR
    defaults to 127.0.0.1 and MASTER_PORT to 29500: one host); backend: NCCL where every local
    rank has a GPU of its own, else Gloo (NCCL refuses two ranks on one GPU; Gloo stages CUDA
    tensors through host memory). Each local rank uses GPU ``local_rank mod device count``.
    Returns (rank, world size)."""
    env = os.environ
    if "RANK" not in env and "OMPI_COMM_WORLD_RANK" in env:
        env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        env.setdefault("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", env["RANK"]))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        local_ranks = int(env.get("LOCAL_WORLD_SIZE", env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env["WORLD_SIZE"])))
        if backend is None:
            backend = "nccl" if gpus >= local_ranks else "gloo"
        if gpus:
            torch.cuda.set_device(int(env.get("LOCAL_RANK", 0)) % gpus)
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
