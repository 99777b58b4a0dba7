"""Horovod's paths on gradients of a simulated GPU (tests/simulated_gpu.py) across ranks, through
the real :class:`~hvdquant.transports.collectives.HorovodCollectives`: the stock path
(``hvdquant.Compression``, driven as ``hvd.DistributedOptimizer`` drives it) and the payload
exchanges of ``hvdquant.DistributedOptimizer`` (driven as its gradient hook and ``synchronize``
drive them). Horovod here is the CPU-only build, so every tensor handed to it must be in host
memory, every result must come back to the gradient's device, and the bits equal the host's. Run
under ``horovodrun -np N``; every rank runs every test in the same order."""

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import horovod.torch as hvd
import pytest
import simulated_gpu as sim
import torch
from one_tensor import start, start_raw

import hvdquant
from hvdquant.kernels import ops
from hvdquant.transports import HorovodCollectives, make_exchange

pytestmark = [pytest.mark.horovod,
              pytest.mark.skipif(not sim.available(), reason="the simulated GPU needs Numba's CUDA simulator and "
                                                             "no real GPU (launch/gpu_e2e.sh runs one)")]

SHAPES = {"a.weight": (24, 32), "a.bias": (24,), "b.weight": (16, 24)}  # min_numel 256: the bias travels raw


def grads_at(step: int) -> dict[str, torch.Tensor]:
    """This rank's gradients: a common part and a rank's own drift."""
    base = torch.Generator().manual_seed(0)
    noise = torch.Generator().manual_seed(100 * step + hvd.rank() + 1)
    return {name: torch.randn(s, generator=base) + 0.3 * torch.randn(s, generator=noise) for name, s in SHAPES.items()}


@contextmanager
def cpu_only_horovod() -> Iterator[None]:
    """Horovod's CPU-only build refuses CUDA tensors: so does this one."""
    def host_only(fn: Callable) -> Callable:
        def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if any(isinstance(t, sim.OnGPU) for t in (tensor, kwargs.get("splits"))):
                raise RuntimeError(f"hvd.{fn.__name__}: Horovod was built without GPU operations, got a CUDA tensor")
            return fn(tensor, *args, **kwargs)
        return call

    with ExitStack() as stack:
        for op in ("allreduce_async", "allgather_async", "alltoall_async"):
            stack.enter_context(mock.patch.object(hvd, op, host_only(getattr(hvd, op))))
        yield


def on_both(run: Callable[[bool], list[torch.Tensor]]) -> None:
    """``run(on_gpu)`` on the host, then on the simulated GPU: CUDA kernels only, the same bits."""
    host = run(False)
    before = ops.launches.copy()
    with sim.simulated_gpu(), cpu_only_horovod():
        gpu = run(True)
    assert ops.launches["cpu"] == before["cpu"] and ops.launches["cuda"] > before["cuda"]
    assert all(torch.equal(h, g) for h, g in zip(host, gpu))


@pytest.mark.parametrize("make", [lambda: hvdquant.Compression.dqsg(levels=1, bucket_size=64, seed=3),
                                  lambda: hvdquant.Compression.ndqsg((3, 1), 64, seed=3, adaptive=False)],
                         ids=["dqsg", "ndqsg"])
def test_stock_path_on_the_gpu(make):
    """Per step: compress every weight (the hook), Horovod averages the words, decompress each."""
    def run(on_gpu: bool) -> list[torch.Tensor]:
        comp, out = make(), []
        for step in range(3):
            grads = {n: g.cuda() if on_gpu else g for n, g in grads_at(step).items() if g.dim() == 2}
            handed = {n: comp.compress(g, name=n) for n, g in grads.items()}
            started = {n: hvd.allreduce_async(word, name=f"gpu.stock.{n}", op=hvd.Average)
                       for n, (word, _) in handed.items()}
            for n, (_, ctx) in handed.items():
                mean = comp.decompress(hvd.synchronize(started[n]), ctx)
                assert mean.device == grads[n].device
                out.append(mean.cpu())
        return out

    on_both(run)


@pytest.mark.parametrize("make, reducer", [(lambda: hvdquant.QSGD(2, 64, "l2", "elias"), "allgather"),
                                           (lambda: hvdquant.DQSG(3, 64), "scatter_reduce"),
                                           (lambda: hvdquant.NDQSG((3, 1), 64, adaptive=False), "allgather")],
                         ids=["qsgd-allgather", "dqsg-scatter", "ndqsg-allgather"])
def test_payload_exchange_on_the_gpu(make, reducer):
    """Per step: start every gradient (compressed or raw, the hook), finish in sorted name order."""
    def run(on_gpu: bool) -> list[torch.Tensor]:
        ex, out = make_exchange(make(), reducer, True, HorovodCollectives()), []
        for step in range(3):
            grads = {n: g.cuda() if on_gpu else g for n, g in grads_at(step).items()}
            finish = {n: start(ex, n, g, 7, step) if g.dim() == 2 else start_raw(ex, n, g) for n, g in grads.items()}
            for n in sorted(finish):
                mean = finish[n]()
                assert mean.device == grads[n].device
                out.append(mean.cpu())
        return out

    on_both(run)
