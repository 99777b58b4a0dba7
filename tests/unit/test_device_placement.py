"""Device placement without a GPU: every adapter path on gradients of a simulated GPU
(tests/simulated_gpu.py), whose tensors carry their device, so a tensor made on the host by
mistake fails where it meets the gradient's tensors, as on a real GPU. The collectives are the
real :class:`~hvdquant.transports.torchdist.TorchDistCollectives` on a one-process Gloo group,
which stage every tensor through host memory: their results must come back to the GPU. Each path
also runs on the host with the CPU kernels, and the simulated GPU must give the same bits.
"""

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import simulated_gpu as sim
import torch
import torch.distributed as dist

import hvdquant
from hvdquant.adapters import horovod as horovod_adapter
from hvdquant.kernels import ops
from hvdquant.transports.torchdist import TorchDistCollectives

simulated = pytest.mark.skipif(not sim.available(), reason="the simulated GPU needs Numba's CUDA simulator and "
                                                            "no real GPU (launch/gpu_e2e.sh runs one)")


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    """torch.distributed on one process (Gloo): the DDP hook's collectives."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@simulated
def test_simulated_gpu_follows_cuda_rules():
    """The mechanism: tags follow operations and transfers; mixing devices raises, in torch and in ops."""
    with sim.simulated_gpu():
        g = torch.arange(6.0).cuda()
        assert isinstance(g * 2, sim.OnGPU) and (g * 2).device == sim.GPU
        assert isinstance(torch.empty(3, device=g.device), sim.OnGPU)
        assert isinstance(g.new(g.shape), sim.OnGPU) and g.new(g.shape).shape == g.shape  # a Size stays a shape
        assert not isinstance(torch.zeros(3), sim.OnGPU) and torch.zeros(3).device.type == "cpu"
        host = g.cpu()
        assert not isinstance(host, sim.OnGPU) and isinstance(host.to(g.device), sim.OnGPU)
        host[0] = 7.0  # a transfer copies
        assert float(g[0]) == 0.0
        assert isinstance(g[torch.tensor([0, 2])], sim.OnGPU)  # host indices into a GPU tensor
        g[1:3] = torch.ones(2)  # a copy into a slice
        for mixed in (lambda: torch.cat([g, torch.zeros(2)]), lambda: g + torch.ones(6)):
            with pytest.raises(RuntimeError, match="same device"):
                mixed()
        with pytest.raises(TypeError, match="numpy"):
            g.numpy()
        with pytest.raises(ValueError, match="same device"):
            ops.bucket_absmax(g, 4, out=torch.empty(2))
        before = ops.launches["cuda"]
        assert torch.equal(ops.bucket_absmax(g, 4).cpu(), torch.tensor([3.0, 5.0]))
        assert ops.launches["cuda"] == before + 1


def test_kernels_refuse_any_mixture_of_devices():
    """Not only CUDA with host tensors: any two devices in one call are refused, by name."""
    with pytest.raises(ValueError, match=r"bucket_absmax: .* same device, got \['cpu', 'meta'\]"):
        ops.bucket_absmax(torch.ones(4), 2, out=torch.empty(2, device="meta"))


# ------------------------------------------------------------------ the DDP hook, every reducer
SCHEMES: dict[str, tuple[Callable[[], Any], str]] = {
    "dqsg-allreduce": (lambda: hvdquant.DQSG(1, 64), "allreduce"),  # the README's DDP example
    "dqsg-independent-allreduce": (lambda: hvdquant.DQSG(3, 64, "independent"), "allreduce"),
    "ndqsg-sum-allreduce": (lambda: hvdquant.NDQSG((3, 1), 64, adaptive=False), "allreduce"),
    "ndqsg-sum-adaptive-allreduce": (lambda: hvdquant.NDQSG((3, 1), 64, adaptive=True), "allreduce"),
    "dqsg-allgather": (lambda: hvdquant.DQSG(1, 64), "allgather"),
    "dqsg-scatter": (lambda: hvdquant.DQSG(3, 64), "scatter_reduce"),
    "ndqsg-allgather": (lambda: hvdquant.NDQSG((3, 1), 64), "allgather"),
    "qsgd-elias-allgather": (lambda: hvdquant.QSGD(2, 64, "l2", "elias"), "allgather"),
    "qsgd-scatter": (lambda: hvdquant.QSGD(4, 64, "max", "fixed"), "scatter_reduce"),
    "onebit-allgather": (hvdquant.OneBitSGD, "allgather"),
    "topk-ef-scatter": (lambda: hvdquant.TopK.with_feedback(0.05), "scatter_reduce"),
    "ef-dqsg-allgather": (lambda: hvdquant.ErrorFeedback(hvdquant.DQSG(1, 64)), "allgather"),
    "lgc-ps-allgather": (lambda: hvdquant.LGC(ratio=0.05, warmup_steps=1, train_steps=1, form="ps"), "allgather"),
}
SHAPES = [(24, 32), (24,), (16, 24), (16,)]  # two compressed weights (min_numel 256), two raw biases


def grads_at(step: int) -> list[torch.Tensor]:
    """Gradients that drift slowly (nested decoding resolves most buckets and recovers some)."""
    base, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(step + 1)
    return [torch.randn(s, generator=base) + 0.3 * torch.randn(s, generator=noise) for s in SHAPES]


@simulated
@pytest.mark.parametrize("scheme", SCHEMES)
def test_ddp_hook_on_the_gpu(scheme, one_rank):
    """Every reducer of the DDP hook on GPU gradients (a warm-up step, then three; the GPU run
    restarts from a checkpoint loaded to the host before step 2): every kernel runs on the
    gradient's device, every mean comes back there, and the bits equal the host's."""
    make, reducer = SCHEMES[scheme]

    def state() -> hvdquant.ddp.State:
        return hvdquant.ddp.State(make(), reducer, seed=5, warmup_steps=1, min_numel=256)

    host, gpu, _, launched = sim.hook_on_host_and_gpu(state, grads_at)
    assert launched["cpu"] == 0  # no kernel ran on the host
    if not scheme.startswith(("topk", "lgc")):  # top-k is torch's sort; LGC stays on the host by design
        assert launched["cuda"] > 0
    for step, (h, g) in enumerate(zip(host, gpu)):
        assert torch.equal(h, g), f"step {step}: GPU and host means differ"


# ------------------------------------------------------------------ Horovod's stock path
@simulated
@pytest.mark.parametrize("make", [lambda: hvdquant.Compression.dqsg(levels=1, bucket_size=64, seed=3),
                                  lambda: hvdquant.Compression.ndqsg((3, 1), 64, seed=3, adaptive=False)],
                         ids=["dqsg", "ndqsg"])
def test_horovod_compression_on_the_gpu(make, one_rank, monkeypatch):
    """hvd.DistributedOptimizer's compress/decompress with GPU gradients (collectives over Gloo in
    place of Horovod's, staged alike): the word handed to Horovod is a host tensor (the CPU-only
    build reduces it), the gradient comes back on its device, with the host's bits."""
    monkeypatch.setattr(horovod_adapter, "HorovodCollectives", TorchDistCollectives)

    def run(on_gpu: bool) -> list[torch.Tensor]:
        comp, out = make(), []
        for step in range(3):
            grads = {f"w{i}": g.cuda() if on_gpu else g for i, g in enumerate(grads_at(step)) if g.dim() == 2}
            handed = {name: comp.compress(g, name=name) for name, g in grads.items()}
            for name, (word, ctx) in handed.items():
                assert word.device.type == "cpu"
                mean = comp.decompress(word.clone(), ctx)  # Horovod's Average over one rank: the word
                assert mean.device == grads[name].device and mean.shape == grads[name].shape
                out.append(mean.cpu())
        return out

    host = run(False)
    with sim.simulated_gpu():
        gpu = run(True)
    assert all(torch.equal(h, g) for h, g in zip(host, gpu))
