"""``hvdquant.ddp`` (the DDP communication hook) through real PyTorch DDP on Gloo (CPU); run under
``torchrun --nproc_per_node 2`` and ``4``. Every rank runs every test in the same order;
collectives come before asserts."""

import copy
import io
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import hvdquant

pytestmark = pytest.mark.ddp

SCHEMES: dict[str, tuple[Callable, str]] = {
    "dqsg-allreduce": (lambda: hvdquant.DQSG(1, 128), "allreduce"),
    "dqsg-independent-allreduce": (lambda: hvdquant.DQSG(3, 128, "independent"), "allreduce"),
    "dqsg-rotated-allreduce": (lambda: hvdquant.DQSG(1, 128, rotation="hadamard"), "allreduce"),
    "dqsg-rotated-scatter": (lambda: hvdquant.DQSG(3, 100, rotation="hadamard"), "scatter_reduce"),
    "dqsg-rans-allgather": (lambda: hvdquant.DQSG(3, 128, rotation="hadamard", coding="rans"), "allgather"),
    "ndqsg-sum-allreduce": (lambda: hvdquant.NDQSG((3, 1), 128, adaptive=False), "allreduce"),
    "ndqsg-sum-adaptive-allreduce": (lambda: hvdquant.NDQSG((3, 1), 128, adaptive=True), "allreduce"),
    "dqsg-allgather": (lambda: hvdquant.DQSG(1, 128), "allgather"),
    "dqsg-scatter": (lambda: hvdquant.DQSG(3, 128), "scatter_reduce"),
    "ndqsg-allgather": (lambda: hvdquant.NDQSG((3, 1), 128, 0.5), "allgather"),
    "qsgd-allgather": (lambda: hvdquant.QSGD(2, 128, "l2", "elias"), "allgather"),
    "qsgd-scatter": (lambda: hvdquant.QSGD(4, 128, "max", "fixed"), "scatter_reduce"),
    "onebit-allgather": (hvdquant.OneBitSGD, "allgather"),
    "onebit-scatter": (hvdquant.OneBitSGD, "scatter_reduce"),
    "topk-ef-allgather": (lambda: hvdquant.TopK.with_feedback(0.05), "allgather"),
    "topk-ef-scatter": (lambda: hvdquant.TopK.with_feedback(0.05), "scatter_reduce"),
    "ef-dqsg-scatter": (lambda: hvdquant.ErrorFeedback(hvdquant.DQSG(1, 128)), "scatter_reduce"),
    "ecdq-allgather": (lambda: hvdquant.ECDQ(1.1, 128), "allgather"),
    "ecdq-tensor-allgather": (lambda: hvdquant.ECDQ(1.1, 128, scope="tensor"), "allgather"),
    "ef-ecdq-scatter": (lambda: hvdquant.ErrorFeedback(hvdquant.ECDQ(2.0, 128)), "scatter_reduce"),
    "lgc-ps-allgather": (lambda: hvdquant.LGC(ratio=0.05, warmup_steps=1, train_steps=1, form="ps"), "allgather"),
}


def test_torchdist_collectives_byte_exchanges():
    """Variable sizes (0 included), a poisoned rank seen as None by every rank, MAX and SUM allreduce."""
    from hvdquant.transports.torchdist import TorchDistCollectives

    coll = TorchDistCollectives()
    rank, size = coll.rank, coll.size
    mine = torch.arange(rank, dtype=torch.uint8)  # rank r sends r bytes
    got = coll.allgather_bytes(mine, "t").wait()
    assert [part.tolist() for part in got] == [list(range(r)) for r in range(size)]
    poisoned = coll.allgather_bytes(None if rank == size - 1 else mine, "t").wait()
    assert [part is None for part in poisoned] == [r == size - 1 for r in range(size)]
    sends = [torch.full((rank + c,), 10 * rank + c, dtype=torch.uint8) for c in range(size)]
    got = coll.alltoall_bytes(sends, "t").wait()
    assert [part.tolist() for part in got] == [[10 * r + rank] * (r + rank) for r in range(size)]
    got = coll.alltoall_bytes(None if rank == 0 else sends, "t").wait()
    assert got[0] is None and all(part is not None for part in got[1:])
    x = torch.tensor([float(rank), -float(rank)])
    assert coll.allreduce(x, "t", "max").wait().tolist() == [size - 1, 0.0]
    assert coll.allreduce(x, "t").wait().tolist() == [size * (size - 1) / 2, -size * (size - 1) / 2]
    assert x.tolist() == [float(rank), -float(rank)]  # the input is not modified
    assert coll.broadcast(torch.tensor([rank]), 1, "t").tolist() == [1]
    assert coll.allgather_object({"rank": rank}, "t") == [{"rank": r} for r in range(size)]


def mlp(seed: int = 0) -> nn.Module:
    """Three weight matrices (compressed at min_numel=256) and three biases (sent uncompressed)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def wrap(model: nn.Module, state: hvdquant.ddp.State | None) -> DDP:
    """DDP with 4 KB buckets: one bucket at the first step, several once DDP rebuilds them."""
    ddp = DDP(model, bucket_cap_mb=0.004)
    if state is not None:
        ddp.register_comm_hook(state, hvdquant.ddp.hook)
    return ddp


def batch(step: int, part: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch at ``step`` (different on every rank)."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * part + dist.get_rank())
    return torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)


def train(ddp: DDP, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def same_on_all_ranks(t: torch.Tensor) -> bool:
    """Every rank's bits of ``t`` equal rank 0's (a collective: call it on every rank)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, t.numpy().tobytes())
    return all(g == gathered[0] for g in gathered)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_replicas_bit_identical(scheme):
    make, reducer = SCHEMES[scheme]
    model = mlp()
    before = flat(model)
    state = hvdquant.ddp.State(make(), reducer, min_numel=256)
    ddp = wrap(model, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(ddp, opt, range(4))
    after = flat(model)
    assert same_on_all_ranks(after)
    assert not torch.equal(before, after) and bool(torch.isfinite(after).all())
    stats = state.statistics()
    assert state.iteration == 4
    assert stats["coordinates"] == 4 * before.numel()  # every coordinate, compressed or not, once per step
    assert 0 < stats["bits_per_coordinate"] < 32


def test_keys_are_per_parameter_and_buckets_are_rebuilt():
    """DDP exchanges one bucket at the first step and several after rebuilding them; the step
    counters are per parameter, so every compressed parameter counted each step once."""
    seen: list[int] = []
    state = hvdquant.ddp.State(hvdquant.DQSG(1, 128), "allgather", min_numel=256)

    def counting(s: hvdquant.ddp.State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        seen.append(bucket.index())
        return hvdquant.ddp.hook(s, bucket)

    model = mlp()
    ddp = DDP(model, bucket_cap_mb=0.004)
    ddp.register_comm_hook(state, counting)
    train(ddp, torch.optim.SGD(model.parameters(), lr=0.05), range(3))
    assert seen[0] == 0 and max(seen) >= 1
    assert sorted(state.session.steps.counts.values()) == [3, 3, 3]  # the three weight matrices


def run_checkpointed(make: Callable, reducer: str, k: int, m: int, warmup_steps: int = 0):
    """k steps, a checkpoint (model, optimizer, hook state, through torch.save), m more steps; then a
    new model, optimizer, DDP and State (another torch seed) restored from the checkpoint for the
    same m steps. Returns both final parameter vectors."""
    model = mlp()
    state = hvdquant.ddp.State(make(), reducer, min_numel=256, warmup_steps=warmup_steps)
    ddp = wrap(model, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(ddp, opt, range(k))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, buf)
    train(ddp, opt, range(k, k + m))
    continued = flat(model)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    fresh = mlp(seed=1234)  # another init and another torch.initial_seed(): the seed must come from the checkpoint
    fresh.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    state2 = hvdquant.ddp.State(make(), reducer, min_numel=256, warmup_steps=warmup_steps)
    state2.load_state_dict(ckpt["hook"])
    train(wrap(fresh, state2), opt2, range(k, k + m))
    return continued, flat(fresh)


@pytest.mark.parametrize("scheme", ["dqsg-allreduce", "ndqsg-sum-allreduce", "ndqsg-sum-adaptive-allreduce",
                                    "ndqsg-allgather", "ef-dqsg-scatter", "topk-ef-allgather"])
def test_checkpoint_resume_bit_identical(scheme):
    make, reducer = SCHEMES[scheme]
    continued, resumed = run_checkpointed(make, reducer, k=3, m=3)
    assert same_on_all_ranks(resumed)
    assert torch.equal(continued, resumed)


def test_restart_during_warmup_bit_identical():
    """Saved after 2 of 4 full-precision iterations, resumed into a new DDP model (one bucket again
    at its first step) and run past the warm-up: bit-identical to the run that continued."""
    continued, resumed = run_checkpointed(SCHEMES["dqsg-allreduce"][0], "allreduce", k=2, m=4, warmup_steps=4)
    assert same_on_all_ranks(resumed)
    assert torch.equal(continued, resumed)


def test_error_feedback_residuals_in_state_dict():
    state = hvdquant.ddp.State(hvdquant.ErrorFeedback(hvdquant.DQSG(1, 128)), "allgather", min_numel=256)
    model = mlp()
    train(wrap(model, state), torch.optim.SGD(model.parameters(), lr=0.05), range(2))
    residuals = state.state_dict()["session"]["exchange"]["codec_state"]["residuals"]
    sizes = sorted(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert sorted(r.numel() for r in residuals.values()) == sizes
    assert all(r.dtype == torch.float64 and bool(r.abs().sum() > 0) for r in residuals.values())


@pytest.mark.parametrize("reducer", ["allreduce", "allgather"])
def test_buckets_travel_while_backward_runs(reducer):
    """Once DDP has rebuilt its buckets (several of them), every hook but the step's last returns a
    future not yet done, its rounds already started (bytes handed to the collectives grow inside
    it); the last hook completes every future of the step; replicas stay bit-identical."""
    state = hvdquant.ddp.State(hvdquant.DQSG(1, 128), reducer, min_numel=256)
    model = mlp()
    ddp = DDP(model, bucket_cap_mb=0.004)
    steps: list[list[tuple[bool, bool, int, int]]] = [[]]
    futures: list = []

    def spying(st, bucket):
        before = st.exchange.stats.bytes_handed
        fut = hvdquant.ddp.hook(st, bucket)
        steps[-1].append((bucket.is_last(), fut.done(), before, st.exchange.stats.bytes_handed))
        futures.append(fut)
        if bucket.is_last():
            assert all(f.done() for f in futures)
            steps.append([])
        return fut

    ddp.register_comm_hook(state, spying)
    train(ddp, torch.optim.SGD(model.parameters(), lr=0.05), range(3))
    third = steps[2]
    assert len(third) > 1 and third[-1][0] and third[-1][1]
    assert all(not last and not done and after > before for last, done, before, after in third[:-1])
    assert same_on_all_ranks(flat(model))


def test_config_mismatch_names_the_rank_on_every_rank():
    last = dist.get_world_size() - 1
    levels = 3 if dist.get_rank() == last else 1
    model = mlp()
    ddp = wrap(model, hvdquant.ddp.State(hvdquant.DQSG(levels, 128), "allreduce", min_numel=256))
    x, y = batch(0)
    with pytest.raises(ValueError, match=rf"rank 0 has .*, rank {last} has"):
        F.cross_entropy(ddp(x), y).backward()


@pytest.mark.parametrize("reducer", ["allreduce", "allgather", "scatter_reduce"])
@pytest.mark.parametrize("where", ["compressed", "uncompressed"])
def test_non_finite_gradient_raises_on_every_rank(reducer, where):
    model = mlp()
    ddp = wrap(model, hvdquant.ddp.State(hvdquant.DQSG(1, 128), reducer, min_numel=256))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(ddp, opt, range(2))
    poisoned = model[2].weight if where == "compressed" else model[2].bias
    if dist.get_rank() == dist.get_world_size() - 1:
        poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
    x, y = batch(2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        F.cross_entropy(ddp(x), y).backward()


def test_no_sync_accumulation():
    """Gradients accumulated under no_sync() are exchanged once, at the synchronised backward."""
    state = hvdquant.ddp.State(hvdquant.DQSG(1, 128), "allreduce", min_numel=256)
    model = mlp()
    ddp = wrap(model, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        opt.zero_grad()
        with ddp.no_sync():
            x, y = batch(step, 1)
            F.cross_entropy(ddp(x), y).backward()
        x, y = batch(step, 2)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    assert same_on_all_ranks(flat(model))
    assert state.iteration == 3 and state.statistics()["coordinates"] == 3 * flat(model).numel()


def test_warmup_is_full_precision():
    state = hvdquant.ddp.State(hvdquant.DQSG(1, 128), "allreduce", warmup_steps=2, min_numel=256)
    model = mlp()
    ddp = wrap(model, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(ddp, opt, range(2))
    warm = copy.deepcopy(state.statistics())
    train(ddp, opt, range(2, 4))
    assert same_on_all_ranks(flat(model))
    assert warm["bits_per_coordinate"] == 32.0 and warm["compressed_coordinates"] == 0
    assert state.statistics()["bits_per_coordinate"] < 32.0


def test_refusals():
    with pytest.raises(TypeError, match="cannot be summed"):
        hvdquant.ddp.State(hvdquant.QSGD(2, 128), "allreduce")
    with pytest.raises(ValueError, match="needs reducer='allgather'"):
        hvdquant.ddp.State(hvdquant.NDQSG((3, 1), 128), "scatter_reduce")
    with pytest.raises(ValueError, match="reducer="):
        hvdquant.ddp.State(hvdquant.DQSG(1, 128), "stock")


def test_main_job_accuracy_within_half_a_point_of_ddp_fp32(tmp_path):
    """The main job (defaults: 2 epochs, DQSG s=1, d=512 through the hook) against DDP fp32."""
    from hvdquant.examples import train as job

    fp32 = job.main(["--framework", "ddp", "--compression", "none", "--out", str(tmp_path)])
    dqsg = job.main(["--framework", "ddp", "--compression", "dqsg", "--out", str(tmp_path)])
    assert fp32["replicas_bit_identical"] and dqsg["replicas_bit_identical"]
    assert fp32["bits_per_coordinate"] == 32.0 and dqsg["bits_per_coordinate"] < 8.0
    assert abs(dqsg["test_accuracy"] - fp32["test_accuracy"]) <= 0.005, (dqsg["test_accuracy"], fp32["test_accuracy"])


@pytest.mark.parametrize("flags", [["--compression", "dqsg"], ["--compression", "powersgd", "--powersgd-rank", "1"],
                                   ["--compression", "topk", "--reducer", "scatter_reduce"]])
def test_lm_job_trains_with_identical_replicas(tmp_path, flags):
    """The language-model main job (tiny model, a few steps) through the hvdquant hook and torch's hooks."""
    import math

    from hvdquant.examples import train as job

    summary = job.main(["--framework", "ddp", "--job", "lm", "--steps", "6", "--eval-every", "3", "--layers", "1",
                        "--width", "32", "--heads", "2", "--context", "32", "--eval-windows", "8",
                        "--batch-size", "4", "--out", str(tmp_path), *flags])
    assert summary["replicas_bit_identical"] and [h["step"] for h in summary["history"]] == [3, 6]
    assert all(0.0 < h["validation_loss"] < math.log(256) + 0.5 for h in summary["history"])
    assert 0.0 < summary["bits_per_coordinate"] < 32.0
