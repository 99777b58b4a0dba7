""":class:`~hvdquant.transports.collectives.Collectives` over ``torch.distributed`` (Gloo, NCCL, MPI).

Tensors may live on any device. Collectives run on the process group's device: the host for Gloo
and MPI, ``cuda:<current>`` for NCCL (which refuses host tensors); inputs are copied there and
results copied back to the input's device (received bytes: to the device of this rank's buffer),
so one code path serves every backend and both kinds of gradients.

Byte exchanges carry variable sizes: ``allgather_bytes`` gathers the sizes first (−1 from a poisoned
rank), then every rank's buffer padded to the largest; ``alltoall_bytes`` exchanges the sizes with
one ``all_to_all_single`` and the bytes with a second one with uneven splits (Gloo and NCCL both
support it). ``nbytes`` counts what this rank handed to the collectives, padding and size words
included.

``allreduce`` is asynchronous (several can be in flight); the byte exchanges and the rest block
(``wait()`` returns a result already computed). A DDP communication hook may run collectives inside
the hook because every rank runs the bucket hooks in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hvdquant.transports.collectives import Parts, Started, _byte_view, _device, _empty

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchDistCollectives:
    """:class:`Collectives` over a ``torch.distributed`` process group (default: the global one).
    ``name`` arguments are unused: torch.distributed matches collectives by call order."""

    def __init__(self, process_group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)
        backend = dist.get_backend(process_group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device).contiguous()

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> Started[torch.Tensor]:
        if op not in _OPS:
            raise ValueError(f"allreduce op={op!r} must be one of {sorted(_OPS)}")
        buf = self._here(tensor)
        if buf.data_ptr() == tensor.data_ptr():
            buf = buf.clone()  # the input is not modified
        work = dist.all_reduce(buf, op=_OPS[op], group=self.group, async_op=True)

        def wait() -> torch.Tensor:
            work.wait()
            return buf.to(tensor.device)

        return Started(wait, buf.numel() * buf.element_size())

    def _sizes(self, mine: int) -> list[int]:
        sizes = torch.empty(self.size, dtype=torch.int64, device=self.device)
        _gather_into(sizes, torch.tensor([mine], dtype=torch.int64, device=self.device),
                                    group=self.group)
        return sizes.tolist()

    def allgather_bytes(self, buf: torch.Tensor | None, name: str) -> Started[Parts]:
        data = _empty() if buf is None else _byte_view(buf)
        sizes = self._sizes(-1 if buf is None else data.numel())
        width = max(max(sizes), 0)
        padded = torch.zeros(width, dtype=torch.uint8, device=self.device)
        padded[:data.numel()] = data.to(self.device)
        gathered = torch.empty(self.size * width, dtype=torch.uint8, device=self.device)
        _gather_into(gathered, padded, group=self.group)
        rows = gathered.to(_device(buf)).reshape(self.size, width)
        parts = [None if s < 0 else rows[p, :s] for p, s in enumerate(sizes)]
        return Started(lambda: parts, width + 8)

    def alltoall_bytes(self, bufs: list[torch.Tensor] | None, name: str) -> Started[Parts]:
        if bufs is not None and len(bufs) != self.size:
            raise ValueError(f"alltoall needs one buffer per rank ({self.size}), got {len(bufs)}")
        sends = [_empty()] * self.size if bufs is None else [_byte_view(b).to(self.device) for b in bufs]
        sizes = [-1] * self.size if bufs is None else [b.numel() for b in sends]
        recv_sizes = torch.empty(self.size, dtype=torch.int64, device=self.device)
        dist.all_to_all_single(recv_sizes, torch.tensor(sizes, dtype=torch.int64, device=self.device),
                               group=self.group)
        rsizes = recv_sizes.tolist()
        counts, rcounts = [max(s, 0) for s in sizes], [max(s, 0) for s in rsizes]
        received = torch.empty(sum(rcounts), dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(received, torch.cat(sends).to(self.device), rcounts, counts, group=self.group)
        got = torch.split(received.to(_device(None if bufs is None else bufs[0])), rcounts)
        parts = [None if s < 0 else part for s, part in zip(rsizes, got)]
        return Started(lambda: parts, sum(counts) + 8 * self.size)

    def broadcast(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        buf = self._here(tensor).clone()
        dist.broadcast(buf, src=dist.get_global_rank(self.group, root) if self.group is not None else root,
                       group=self.group)
        return buf.to(tensor.device)

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out
