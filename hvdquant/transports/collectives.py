"""The collectives every transport is written against, and their Horovod and MPI implementations.

A transport (summable allreduce, allgather, scatter-reduce-allgather) never calls a framework: it
calls a :class:`Collectives` object, so a second framework plugs in by implementing five methods.

Each asynchronous method returns a :class:`Started`: ``wait()`` gives the result, ``nbytes`` is
what this rank handed to the collective (size words and status words included), so statistics
count the bytes that really travel. Byte exchanges carry variable-size ``uint8`` buffers; a rank
that has nothing valid to send (its gradient was not finite) passes ``None`` and every rank sees
``None`` in that rank's slot, so all ranks can raise together instead of leaving some waiting.

Devices: inputs may live on any device (a CUDA gradient's payload stays where the codec wrote it).
Each implementation moves them to where its framework runs the collective: the GPU for Horovod
built with GPU operations (``HOROVOD_GPU_OPERATIONS=NCCL``) and for torch.distributed on NCCL, host
memory for CPU-only Horovod, MPI and Gloo (a blocking device-to-host copy, which also orders the
copy after the kernels that wrote the payload on torch's current stream). Results come back on
the input's device: the reduced tensor on the tensor's, received bytes on the device of this
rank's buffer (host memory where this rank sent none).

This is the bottom module of :mod:`hvdquant.transports`: it imports nothing else of it.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from hvdquant.codecs.base import every_finite

T = TypeVar("T")
Parts = list[torch.Tensor | None]  # one entry per rank; None where that rank was poisoned


def _complete() -> bool:
    return True


@dataclass(frozen=True)
class Started(Generic[T]):
    """A collective in flight: ``wait()`` completes it; ``nbytes`` were handed to it by this rank;
    ``done()`` says, without waiting, whether ``wait()`` would return at once (always true for
    collectives that completed when started)."""

    wait: Callable[[], T]
    nbytes: int
    done: Callable[[], bool] = _complete


class Collectives(Protocol):
    """What the transports need from a framework. ``name`` identifies the collective across ranks
    (Horovod matches operations by name); every rank starts the same collectives in the same order."""

    rank: int
    size: int

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> Started[torch.Tensor]:
        """Elementwise ``op`` ("sum" or "max") over ranks; the input is not modified."""
        ...

    def allgather_bytes(self, buf: torch.Tensor | None, name: str) -> Started[Parts]:
        """Every rank's uint8 buffer (sizes may differ)."""
        ...

    def alltoall_bytes(self, bufs: list[torch.Tensor] | None, name: str) -> Started[Parts]:
        """``bufs[c]`` goes to rank c; returns what each rank sent to this one."""
        ...

    def broadcast(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        """Rank ``root``'s tensor, on every rank (synchronous)."""
        ...

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        """Every rank's picklable object, in rank order (synchronous; for agreement, not data)."""
        ...


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _byte_view(buf: torch.Tensor) -> torch.Tensor:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TypeError(f"byte exchanges take 1-D uint8 tensors, got {buf.dtype} of shape {tuple(buf.shape)}")
    return buf.contiguous()


def _device(buf: torch.Tensor | None) -> torch.device:
    """Where received bytes go: the device of this rank's own buffer (host memory without one)."""
    return torch.device("cpu") if buf is None else buf.device


def horovod():
    """``horovod.torch``, imported on first use so the codecs work without Horovod."""
    import horovod.torch as hvd

    return hvd


class HorovodCollectives:
    """:class:`Collectives` over Horovod's asynchronous torch operations (global process set).

    CUDA tensors go to Horovod as they are where Horovod was built with GPU operations
    (``hvd.nccl_built()``), and through host memory otherwise (the setup's CPU-only build)."""

    def __init__(self) -> None:
        hvd = horovod()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.gpu_operations = bool(hvd.nccl_built())

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where Horovod can reduce it: host memory for a CUDA tensor without GPU operations."""
        return t.cpu() if t.is_cuda and not self.gpu_operations else t

    @staticmethod
    def _result(handle):
        out = horovod().synchronize(handle)
        return out[0] if isinstance(out, tuple) else out

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> Started[torch.Tensor]:
        hvd = horovod()
        ops = {"sum": hvd.Sum, "max": hvd.Max}
        if op not in ops:
            raise ValueError(f"allreduce op={op!r} must be one of {sorted(ops)}")
        handle = hvd.allreduce_async(self._staged(tensor), op=ops[op], name=name)
        return Started(lambda: self._result(handle).to(tensor.device), tensor.numel() * tensor.element_size(),
                       lambda: hvd.poll(handle))

    def allgather_bytes(self, buf: torch.Tensor | None, name: str) -> Started[Parts]:
        hvd = horovod()
        data = _empty() if buf is None else self._staged(_byte_view(buf))
        size = torch.tensor([-1 if buf is None else data.numel()], dtype=torch.int64)
        h_size = hvd.allgather_async(size, name=f"{name}.size")
        h_data = hvd.allgather_async(data.unsqueeze(1), name=f"{name}.data")  # 2-D: a rank may send 0 rows

        def wait() -> Parts:
            sizes = self._result(h_size).tolist()
            gathered = self._result(h_data).reshape(-1).to(_device(buf))
            parts = torch.split(gathered, [max(s, 0) for s in sizes])
            return [None if s < 0 else part for s, part in zip(sizes, parts)]

        return Started(wait, data.numel() + size.numel() * 8)

    def alltoall_bytes(self, bufs: list[torch.Tensor] | None, name: str) -> Started[Parts]:
        hvd = horovod()
        if bufs is not None and len(bufs) != self.size:
            raise ValueError(f"alltoall needs one buffer per rank ({self.size}), got {len(bufs)}")
        status = torch.tensor([1 if bufs is None else 0], dtype=torch.int64)
        parts = [_empty()] * self.size if bufs is None else [self._staged(_byte_view(b)) for b in bufs]
        splits = torch.tensor([b.numel() for b in parts], dtype=torch.int32)
        send = torch.cat(parts)
        home = _device(None if bufs is None else bufs[0])
        h_status = hvd.allgather_async(status, name=f"{name}.status")
        h_data = hvd.alltoall_async(send, splits=splits, name=f"{name}.data")

        def wait() -> Parts:
            poisoned = self._result(h_status).tolist()
            out = horovod().synchronize(h_data)
            received, rsplits = out if isinstance(out, tuple) else (out, None)
            sizes = rsplits.tolist() if rsplits is not None else [received.numel() // self.size] * self.size
            got = torch.split(received.to(home), sizes)
            return [None if bad else part for bad, part in zip(poisoned, got)]

        return Started(wait, send.numel() + splits.numel() * 4 + status.numel() * 8)

    def broadcast(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        return horovod().broadcast(self._staged(tensor), root_rank=root, name=name).to(tensor.device)

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        return horovod().allgather_object(obj, name=name)


class MPICollectives:
    """:class:`Collectives` over an mpi4py communicator (host memory, blocking calls: ``wait()``
    returns results already computed). The reference implementation beside Horovod's."""

    def __init__(self, comm=None) -> None:
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    @staticmethod
    def _done(value: T, handed: int) -> Started[T]:
        return Started(lambda: value, handed)

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> Started[torch.Tensor]:
        from mpi4py import MPI

        ops = {"sum": MPI.SUM, "max": MPI.MAX}
        if op not in ops:
            raise ValueError(f"allreduce op={op!r} must be one of {sorted(ops)}")
        src = tensor.detach().cpu().contiguous().numpy()
        out = src.copy()
        self.comm.Allreduce(src, out, op=ops[op])
        return self._done(torch.from_numpy(out).to(tensor.device), src.nbytes)

    def _exchange(self, sends: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
        import numpy as np

        recv_sizes = self.comm.alltoall(sizes)
        send = torch.cat(sends).numpy() if sends else np.empty(0, np.uint8)
        recv = np.empty(max(0, sum(max(s, 0) for s in recv_sizes)), np.uint8)
        counts = [max(s, 0) for s in sizes]
        rcounts = [max(s, 0) for s in recv_sizes]
        self.comm.Alltoallv([send, (counts, np.cumsum([0] + counts[:-1]).tolist())],
                            [recv, (rcounts, np.cumsum([0] + rcounts[:-1]).tolist())])
        parts = torch.split(torch.from_numpy(recv), rcounts)
        return [None if s < 0 else part for s, part in zip(recv_sizes, parts)]  # host memory

    def allgather_bytes(self, buf: torch.Tensor | None, name: str) -> Started[Parts]:
        import numpy as np

        data = _empty() if buf is None else _byte_view(buf).cpu()
        sizes = self.comm.allgather(-1 if buf is None else data.numel())
        counts = [max(s, 0) for s in sizes]
        recv = np.empty(sum(counts), np.uint8)
        self.comm.Allgatherv(data.numpy(), [recv, counts])
        parts = torch.split(torch.from_numpy(recv).to(_device(buf)), counts)
        return self._done([None if s < 0 else part for s, part in zip(sizes, parts)], data.numel() + 8)

    def alltoall_bytes(self, bufs: list[torch.Tensor] | None, name: str) -> Started[Parts]:
        if bufs is not None and len(bufs) != self.size:
            raise ValueError(f"alltoall needs one buffer per rank ({self.size}), got {len(bufs)}")
        sends = [_empty()] * self.size if bufs is None else [_byte_view(b).cpu() for b in bufs]
        sizes = [-1] * self.size if bufs is None else [b.numel() for b in sends]
        home = _device(None if bufs is None else bufs[0])
        parts = [None if part is None else part.to(home) for part in self._exchange(sends, sizes)]
        return self._done(parts, sum(b.numel() for b in sends) + 8 * self.size)

    def broadcast(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        buf = tensor.detach().cpu().contiguous().clone()
        self.comm.Bcast(buf.numpy(), root=root)
        return buf.to(tensor.device)

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        return [pickle.loads(b) for b in self.comm.allgather(pickle.dumps(obj))]


def poisoned(parts: Parts, name: str) -> str | None:
    """The error naming the tensor and the ranks whose gradient was not finite (their slot is None),
    or None when every rank sent a buffer."""
    bad = [r for r, part in enumerate(parts) if part is None]
    if not bad:
        return None
    return (f"non-finite gradient (NaN or Inf) in '{name}' on rank(s) {bad}; "
            "hvdquant refuses to quantize it (every rank raises)")


def raise_if_poisoned(parts: Parts, name: str) -> list[torch.Tensor]:
    """The parts, or a FloatingPointError naming the tensor and the ranks whose gradient was not
    finite. Every rank holds the same parts, so every rank raises together."""
    error = poisoned(parts, name)
    if error is not None:
        raise FloatingPointError(error)
    return parts  # type: ignore[return-value]


def rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Σ_p of float32 values sent as bytes, in rank order (bit-identical on every rank)."""
    total = parts[0].clone().view(torch.float32)
    for part in parts[1:]:
        total += part.clone().view(torch.float32)  # a copy: a part need not be 4-byte aligned
    return total


def check_finite_output(outs: Sequence[torch.Tensor]) -> None:
    """Finite inputs can still decode past float32's range (|g| near 3.4e38: Δ(k − u) exceeds it).
    Every rank decodes the same bits, so every rank raises; no inf reaches the parameters. One
    check for all of ``outs`` (a group's results)."""
    if not every_finite(outs):
        raise FloatingPointError("decoded gradient overflows float32 (inputs near float32's maximum); "
                                 "scale the loss down")


def chunk_bounds(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering [0, n), cut at multiples of ``align`` (packing groups)."""
    units = (n + align - 1) // align
    cuts = [min(n, (units * c // parts) * align) for c in range(parts + 1)]
    cuts[-1] = n
    return [(cuts[c], cuts[c + 1]) for c in range(parts)]
