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


def test_lgc_refuses_scatter_reduce_and_bad_parameters():
    model = nn.Linear(64, 64)
    with pytest.raises(ValueError, match="reducer='allgather'"):
        hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters()),
                                      codec=hvdquant.LGC(), reducer="scatter_reduce")
    for kwargs, match in (({"form": "tree"}, "form"), ({"chunk": 40}, "chunk"), ({"ratio": 0}, "ratio"),
                          ({"train_steps": 0}, "train_steps")):
        with pytest.raises(ValueError, match=match):
            hvdquant.LGC(**kwargs)
