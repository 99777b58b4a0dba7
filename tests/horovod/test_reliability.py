"""Bad input, mismatched ranks, determinism and checkpoints through real Horovod (docs/RELIABILITY.md).
Every test finishes its collectives on every rank before asserting."""

import functools

import horovod.torch as hvd
import pytest
import torch
from hvd_helpers import same_on_all_ranks
from one_tensor import start
from torch import nn

import hvdquant
import hvdquant.transports.session
from hvdquant.data import load_digits
from hvdquant.transports import HorovodCollectives, make_exchange

pytestmark = pytest.mark.horovod
HUGE = 3.0e38  # Δ(k − u) of such values exceeds float32's 3.4e38


@pytest.mark.parametrize("reducer", ["allgather", "scatter_reduce"])
def test_payload_path_nonfinite_gradient_raises_on_every_rank(reducer):
    g = torch.ones(40, 30)
    if hvd.rank() == 1:
        g[3, 4] = float("nan")
    ex = make_exchange(hvdquant.DQSG(1, 128), reducer, True, HorovodCollectives())
    with pytest.raises(FloatingPointError, match=r"layer\.w.*rank\(s\) \[1\]"):
        start(ex, "layer.w", g, 1, 0)()


@pytest.mark.parametrize("path", ["stock", "allgather"])
def test_overflowing_decode_raises_instead_of_inf(path):
    g = torch.full((300,), HUGE)
    if path == "stock":
        comp = hvdquant.Compression.dqsg(levels=1, bucket_size=100, seed=1)
        with pytest.raises(FloatingPointError, match="overflows"):
            hvd.allreduce(g, name="huge", compression=comp)
    else:
        with pytest.raises(FloatingPointError, match="overflows"):
            exchange = make_exchange(hvdquant.DQSG(1, 100), "allgather", True, HorovodCollectives())
            start(exchange, "huge", g.reshape(3, 100), 1, 0)()


def test_large_but_safe_values_and_denormals():
    comp = hvdquant.Compression.dqsg(levels=3, bucket_size=100, seed=1)
    g = torch.cat([torch.full((100,), 1e37), torch.full((100,), 1e-40), torch.zeros(100)])
    out = hvd.allreduce(g, name="ranges", compression=comp)
    assert torch.isfinite(out).all()
    assert float((out[:100] - 1e37).abs().max()) <= 1e37 / 3 / 2 * 1.001  # within Δ/2 of the mean
    assert float(out[100:200].abs().max()) <= 1e-40 * (1 + 1 / 6) * 1.01  # denormals: |g| + Δ/2
    assert torch.equal(out[200:], torch.zeros(100))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_keep_their_dtype(dtype):
    g = torch.randn(20, 30).to(dtype)
    stock = hvd.allreduce(g, name=f"dtype.{dtype}", compression=hvdquant.Compression.dqsg(levels=3, bucket_size=64))
    exchange = make_exchange(hvdquant.DQSG(3, 64), "allgather", True, HorovodCollectives())
    payload = start(exchange, f"dtype.{dtype}", g, 1, 0)()
    assert stock.dtype == payload.dtype == dtype and stock.shape == payload.shape == g.shape


def test_zero_size_and_non_contiguous_tensors():
    comp = hvdquant.Compression.dqsg(levels=1, bucket_size=64)
    assert hvd.allreduce(torch.empty(0), name="empty", compression=comp).numel() == 0
    g = torch.randn(30, 40)[:, ::3]
    out = hvd.allreduce(g, name="strided", compression=hvdquant.Compression.dqsg(levels=1, bucket_size=64, seed=2))
    ref = hvd.allreduce(g.contiguous(), name="strided",
                        compression=hvdquant.Compression.dqsg(levels=1, bucket_size=64, seed=2))
    assert torch.equal(out, ref)


def test_seed_out_of_range_refused():
    with pytest.raises(ValueError, match="seed"):
        hvdquant.Compression.dqsg(seed=-1)
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="seed"):
        hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters()),
                                      codec=hvdquant.DQSG(), seed=1 << 64)


def test_parameter_names_mismatch_is_named():
    model = nn.Sequential(nn.Linear(64, 32))
    named = [(f"rank{hvd.rank()}.w" if n == "0.weight" else n, p) for n, p in model.named_parameters()]
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named,
                                        codec=hvdquant.DQSG(), min_numel=16)
    with pytest.raises(ValueError, match="parameters: rank 0 has"):
        model(torch.randn(2, 64)).sum().backward()
    opt._handles.clear()


def test_different_hvdquant_versions_are_named(monkeypatch):
    """Payload formats may change between versions (the nested checksum did): ranks running different
    hvdquant versions are refused at the first exchange, naming the rank and both versions."""
    if hvd.rank() == 1:
        monkeypatch.setattr(hvdquant.transports.session, "__version__", "0.0.0")
    model = nn.Sequential(nn.Linear(64, 32))
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(), codec=hvdquant.DQSG(), min_numel=16)
    with pytest.raises(ValueError, match=r"hvdquant_version: rank 0 has '[0-9.]+', rank 1 has '0.0.0'"):
        model(torch.randn(2, 64)).sum().backward()
    opt._handles.clear()


def train(model, opt, steps: range) -> None:
    x, y = load_digits()
    for step in steps:
        idx = (torch.arange(32) + 32 * (hvd.rank() + hvd.size() * step)) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def fresh(codec_factory, seed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                        named_parameters=model.named_parameters(), codec=codec_factory(),
                                        min_numel=16, seed=seed)
    return model, opt


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


RESUMABLE = {"dqsg": lambda: hvdquant.DQSG(1, 256), "onebit-ef": hvdquant.OneBitSGD,
             # checkpoint at step 4, inside the autoencoder-training stage (steps 2-4); the resumed run
             # trains once more, switches (broadcast) after step 4, and compresses in steps 5-7
             "lgc-ps": lambda: hvdquant.LGC(ratio=0.1, warmup_steps=2, train_steps=3, form="ps"),
             "lgc-ring": lambda: hvdquant.LGC(ratio=0.1, warmup_steps=2, train_steps=3, form="ring")}


@pytest.mark.parametrize("codec", sorted(RESUMABLE))
@pytest.mark.parametrize("seed", [None, 11])
def test_determinism_and_checkpoint_resume(codec, seed):
    """Two runs with the same seed give the same bits; checkpoint at step k and resume gives, at
    step 2k, the bits of the uninterrupted run (momentum, residuals, step counters and the agreed
    seed travel in the optimizer's state_dict; for LGC also the autoencoder, its Adam state and
    whether it is frozen). seed=None: rank 0's torch.initial_seed()."""
    make = RESUMABLE[codec]
    k = 4
    a_model, a_opt = fresh(make, seed)
    train(a_model, a_opt, range(2 * k))
    b_model, b_opt = fresh(make, seed)
    train(b_model, b_opt, range(2 * k))
    c_model, c_opt = fresh(make, seed)
    train(c_model, c_opt, range(k))
    checkpoint = {"model": c_model.state_dict(), "opt": c_opt.state_dict()}
    d_model, d_opt = fresh(make, None if seed is None else seed + 1)  # a different seed is overridden
    d_model.load_state_dict(checkpoint["model"])
    d_opt.load_state_dict(checkpoint["opt"])
    train(d_model, d_opt, range(k, 2 * k))
    identical = same_on_all_ranks(flat(d_model), f"resume.{codec}.{seed}")
    if seed is not None:
        assert torch.equal(flat(a_model), flat(b_model))
    assert torch.equal(flat(a_model), flat(d_model)) and identical


def test_resumed_ranks_with_different_steps_are_detected():
    model, opt = fresh(lambda: hvdquant.DQSG(1, 256), 5)
    train(model, opt, range(2))
    state = opt.state_dict()
    if hvd.rank() == 1:
        state["hvdquant"]["steps"] = {k: v + 1 for k, v in state["hvdquant"]["steps"].items()}
    model2, opt2 = fresh(lambda: hvdquant.DQSG(1, 256), 5)
    opt2.load_state_dict(state)
    with pytest.raises(ValueError, match="steps: rank 0 has"):
        train(model2, opt2, range(2, 3))
    opt2._handles.clear()


def test_lgc_checkpoint_and_optimizer_must_agree():
    """Restoring a checkpoint without LGC state into an LGC optimizer (or the reverse) is refused by
    name, instead of failing later at the compression stage."""
    lgc = functools.partial(hvdquant.LGC, ratio=0.1, warmup_steps=1, train_steps=1)
    dqsg_model, dqsg_opt = fresh(RESUMABLE["dqsg"], 3)
    lgc_model, lgc_opt = fresh(lgc, 3)
    train(dqsg_model, dqsg_opt, range(2))
    train(lgc_model, lgc_opt, range(2))
    for (make, match), checkpoint in (((lgc, "has no LGC state"), dqsg_opt.state_dict()),
                                      ((RESUMABLE["dqsg"], "has LGC state"), lgc_opt.state_dict())):
        target = fresh(make, 3)[1]
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(checkpoint)
        assert target.state_dict()["hvdquant"]["steps"] == {}  # nothing restored from the refused checkpoint
