"""Learned gradient compression through hvdquant.DistributedOptimizer (horovodrun -np 2 and 4):
both forms keep replicas bit-identical, switch stages at the configured exchanges, and send fewer
bytes once compressing (measured from the bytes handed to Horovod)."""

import horovod.torch as hvd
import pytest
import torch
from hvd_helpers import same_on_all_ranks
from torch import nn

import hvdquant
from hvdquant.data import load_digits

pytestmark = pytest.mark.horovod


@pytest.mark.parametrize("form", ["ps", "ring"])
def test_lgc_bit_identical_and_stages(form):
    x, y = load_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    codec = hvdquant.LGC(ratio=0.1, warmup_steps=3, train_steps=4, form=form)
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                        named_parameters=model.named_parameters(), codec=codec, min_numel=16)
    frozen_at = None
    for step in range(12):
        idx = (torch.arange(32) + 32 * (hvd.rank() + hvd.size() * step)) % 1500
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if frozen_at is None and opt.hvdquant_stats()["lgc_frozen"]:
            frozen_at = step
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    identical = same_on_all_ranks(flat, f"lgc.{form}")
    stats = opt.hvdquant_stats()
    assert identical
    assert [codec.stage(s) for s in (2, 3, 6, 7)] == ["warmup", "train", "train", "compress"]
    assert frozen_at == 6  # the last training exchange broadcasts rank 0's autoencoder
    bits = stats["lgc_stage_bits_per_coordinate"]
    assert bits["compress"] < bits["warmup"]
    assert stats["lgc_autoencoder_updates"] > 0 if hvd.rank() == 0 else stats["lgc_autoencoder_updates"] == 0
    assert torch.isfinite(flat).all()


@pytest.mark.parametrize("form", ["ps", "ring"])
def test_lgc_compressor_never_adds_energy_when_ranks_disagree(form):
    """Error feedback needs a compressor that never adds energy: after every exchange each rank's
    residual r_t = c_t − (what every rank rebuilt for it) satisfies ‖r_t‖ ≤ ‖c_t‖, c_t = g_t + r_{t−1}
    (float64 residuals; slack 1e-5 relative for float32 decoding). Ranks get opposite gradients
    (±v plus 1% noise), the case that broke the parameter-server form: a non-leader's values at the
    leader's indices are the negation of the leader's, and subtracting the leader's decoded values
    doubled them (the FC model's training diverged 60 steps after the switch, residuals ×1000)."""
    torch.manual_seed(0)
    v = torch.randn(64, 64)
    layer = nn.Linear(64, 64, bias=False)
    codec = hvdquant.LGC(ratio=0.1, innovation_ratio=0.3, warmup_steps=3, train_steps=40, form=form)
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(layer.parameters(), lr=1e-3),
                                        named_parameters=layer.named_parameters(), codec=codec, min_numel=16)
    sign = 1.0 if hvd.rank() % 2 == 0 else -1.0
    noise = torch.Generator().manual_seed(hvd.rank())
    previous = torch.zeros(64 * 64, dtype=torch.float64)
    ratios = []
    for step in range(56):
        g = sign * v + 0.01 * torch.randn(64, 64, generator=noise)
        opt.zero_grad()
        (layer.weight * g).sum().backward()  # d/dW = g
        opt.step()
        c = g.reshape(-1).double() + previous
        previous = opt.state_dict()["hvdquant"]["exchange"]["residuals"]["weight"]
        if codec.stage(step) == "compress":
            ratios.append(float(previous.norm() / c.norm()))
    assert len(ratios) == 13  # exchanges 43..55 compress
    assert max(ratios) <= 1 + 1e-5, f"{form}: residual / (gradient + old residual) up to {max(ratios):.3f}"


def test_lgc_refuses_scatter_reduce_and_bad_parameters():
    model = nn.Linear(64, 64)
    with pytest.raises(ValueError, match="reducer='allgather'"):
        hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters()),
                                      codec=hvdquant.LGC(), reducer="scatter_reduce")
    for kwargs, match in (({"form": "tree"}, "form"), ({"chunk": 40}, "chunk"), ({"ratio": 0}, "ratio"),
                          ({"train_steps": 0}, "train_steps")):
        with pytest.raises(ValueError, match=match):
            hvdquant.LGC(**kwargs)


def train_main_job_model(make_opt, steps: int) -> float:
    """The main job's CNN and data (Fashion-MNIST, rank-strided shards, 64 images per rank and step,
    SGD lr 0.02 momentum 0.9); the same initial weights and batches for every optimizer. Returns the
    test accuracy on the 10k test images."""
    from hvdquant.data import load_fashion_mnist
    from hvdquant.examples.models import SmallCNN

    train_x, train_y, test_x, test_y = load_fashion_mnist()
    train_x, train_y = train_x[hvd.rank()::hvd.size()], train_y[hvd.rank()::hvd.size()]
    torch.manual_seed(0)
    model = SmallCNN()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = make_opt(model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9))
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(hvd.rank()))
    for step in range(steps):
        idx = order[(64 * step) % len(order):][:64]
        opt.zero_grad()
        nn.functional.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float((model(test_x).argmax(1) == test_y).float().mean())


@pytest.fixture(scope="module")
def fp32_accuracy() -> float:
    """Horovod fp32 on the main job's model, 1000 steps (computed once for both LGC forms). Training-
    length runs go under the MPI controller only: the Horovod stages run np 2 and 4 with Gloo and with
    MPI, and once per world size is enough (on the 2-core CI machine these two runs take 163 s at np 4
    under MPI and 724 s under Gloo, whose controller pays more per small collective round)."""
    if hvd.gloo_enabled():
        pytest.skip("training-length test: run once per world size, under --mpi")
    return train_main_job_model(lambda m, sgd: hvd.DistributedOptimizer(sgd, named_parameters=m.named_parameters()),
                                1000)


@pytest.mark.parametrize("form", ["ps", "ring"])
def test_lgc_trains_the_main_jobs_model_within_two_points_of_uncompressed(form, fp32_accuracy):
    """The target: LGC (ratio 0.05, innovation 0.3 in the parameter-server form, warm-up 100
    and autoencoder training 100 exchanges, then 800 compressed steps) reaches Horovod fp32's test
    accuracy within 2 points after 1000 steps, in both forms (600 steps were not enough for the
    parameter-server form: 0.848 vs 0.873 at np 2; the ring form with a nonlinear decoder diverged a
    few dozen steps after the stage switch, see hvdquant/codecs/lgc.py)."""
    steps = 1000
    codec = hvdquant.LGC(ratio=0.05, innovation_ratio=0.3, warmup_steps=100, train_steps=100, form=form)
    made = []

    def lgc_opt(m, sgd):
        made.append(hvdquant.DistributedOptimizer(sgd, named_parameters=m.named_parameters(), codec=codec))
        return made[0]

    lgc = train_main_job_model(lgc_opt, steps)
    bits = made[0].hvdquant_stats()["lgc_stage_bits_per_coordinate"]
    assert bits["compress"] < 4.0  # compressing for real in the last 800 steps (fp32: 32 bits)
    assert lgc >= fp32_accuracy - 0.02, f"LGC {form} {lgc:.4f} vs fp32 {fp32_accuracy:.4f} after {steps} steps"
