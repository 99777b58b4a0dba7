"""The DDP hook on gradients of a simulated GPU (tests/simulated_gpu.py) across ranks, for the paths
one rank never takes (tests/unit/test_device_placement.py runs every reducer on one): nested
senders with recovery rounds, scatter-reduce chunks owned by other ranks, sums of several ranks'
fields. Every tensor must stay on the gradient's device, and the bits equal the host's. Run under
``torchrun --nproc_per_node N``."""

from collections.abc import Callable
from typing import Any

import pytest
import simulated_gpu as sim
import torch
import torch.distributed as dist

import hvdquant

pytestmark = [pytest.mark.ddp,
              pytest.mark.skipif(not sim.available(), reason="the simulated GPU needs Numba's CUDA simulator and "
                                                             "no real GPU (launch/gpu_e2e.sh runs one)")]

SCHEMES: dict[str, tuple[Callable[[], Any], str]] = {
    "dqsg-allreduce": (lambda: hvdquant.DQSG(1, 64), "allreduce"),
    "ndqsg-sum-allreduce": (lambda: hvdquant.NDQSG((3, 1), 64, adaptive=False), "allreduce"),
    "ndqsg-locate-allgather": (lambda: hvdquant.NDQSG((3, 1), 64, adaptive=False, locate=True), "allgather"),
    "dqsg-scatter": (lambda: hvdquant.DQSG(3, 64), "scatter_reduce"),
}
SHAPES = [(24, 32), (24,), (16, 24)]  # two compressed weights (min_numel 256), one raw bias


def grads_at(step: int) -> list[torch.Tensor]:
    """This rank's gradients: a common part and a rank's own drift (nested decoding resolves most
    buckets and recovers some)."""
    base = torch.Generator().manual_seed(0)
    noise = torch.Generator().manual_seed(100 * step + dist.get_rank() + 1)
    return [torch.randn(s, generator=base) + 0.3 * torch.randn(s, generator=noise) for s in SHAPES]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ddp_hook_on_the_gpu_across_ranks(scheme):
    """A warm-up step, then three; the GPU run restarts from a checkpoint loaded to the host before
    step 2. Every kernel runs on the gradient's device, the means come back there and equal the
    host's bits; the nested schemes did recover buckets."""
    make, reducer = SCHEMES[scheme]

    def state() -> hvdquant.ddp.State:
        return hvdquant.ddp.State(make(), reducer, seed=5, warmup_steps=1, min_numel=256)

    host, gpu, last, launched = sim.hook_on_host_and_gpu(state, grads_at)
    assert launched["cpu"] == 0 and launched["cuda"] > 0
    assert all(torch.equal(h, g) for h, g in zip(host, gpu))
    if scheme.startswith("ndqsg"):
        assert last.statistics()["recovery_rounds"] > 0
