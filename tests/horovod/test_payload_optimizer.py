"""hvdquant.DistributedOptimizer (payload path) through real Horovod; run under
``horovodrun -np 2`` and ``-np 4``, ``--gloo`` and ``--mpi``. Every rank runs every test in the same
order; collectives come before asserts."""

import math

import horovod.torch as hvd
import pytest
import torch
from hvd_helpers import same_on_all_ranks
from one_tensor import start
from torch import nn

import hvdquant
from hvdquant.codecs import TensorContext
from hvdquant.data import load_digits
from hvdquant.kernels import DitherKey, tensor_id
from hvdquant.transports import HorovodCollectives, make_exchange

pytestmark = pytest.mark.horovod




def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


SCHEMES = {
    "dqsg1-allgather": (lambda: hvdquant.DQSG(1, 256), "allgather"),
    "dqsg3-scatter": (lambda: hvdquant.DQSG(3, 128), "scatter_reduce"),
    "dqsg1-stratified-allgather": (lambda: hvdquant.DQSG(1, 256, "stratified"), "allgather"),
    "dqsg3-stratified-scatter": (lambda: hvdquant.DQSG(3, 128, "stratified"), "scatter_reduce"),
    "ndqsg-allgather": (lambda: hvdquant.NDQSG((3, 1), 128, 0.5, adaptive=False), "allgather"),
    "ndqsg-adaptive-allgather": (lambda: hvdquant.NDQSG((3, 1), 128, 0.5), "allgather"),
    "qsgd-elias-allgather": (lambda: hvdquant.QSGD(2, 128, "l2", "elias"), "allgather"),
    "qsgd-fixed-scatter": (lambda: hvdquant.QSGD(4, 128, "max", "fixed"), "scatter_reduce"),
    "onebit-allgather": (hvdquant.OneBitSGD, "allgather"),
    "onebit-scatter": (hvdquant.OneBitSGD, "scatter_reduce"),
    "ecdq-allgather": (lambda: hvdquant.ECDQ(1.1, 128), "allgather"),
    "ecdq-tensor-scatter": (lambda: hvdquant.ECDQ(2.0, 100, scope="tensor"), "scatter_reduce"),
    "ef-dqsg1-allgather": (lambda: hvdquant.ErrorFeedback(hvdquant.DQSG(1, 256)), "allgather"),
    "topk-ef-allgather": (lambda: hvdquant.TopK.with_feedback(0.05), "allgather"),
    "topk-ef-scatter": (lambda: hvdquant.TopK.with_feedback(0.05), "scatter_reduce"),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_keeps_replicas_bit_identical_and_bits_are_measured(scheme):
    make, reducer = SCHEMES[scheme]
    codec = make()
    x, y = load_digits()
    model = mlp()
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                        named_parameters=model.named_parameters(), codec=codec,
                                        reducer=reducer, min_numel=16)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    for step in range(6):
        idx = torch.arange(32) + 32 * (hvd.rank() + hvd.size() * step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    identical = same_on_all_ranks(after, f"payload.{scheme}")
    stats = opt.hvdquant_stats()
    assert identical, "replicas differ"
    assert not torch.equal(before, after)
    if reducer == "allgather":
        # Measured payload bits = Σ over compressed weights of the codec's formula (per step, this rank).
        rank, size = hvd.rank(), hvd.size()
        weights = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
        state = opt._hvdquant.exchange.codec_state  # adaptive nesting's decisions decide the layout
        expected = sum(codec.formula_bits(p.numel(), TensorContext(n, tuple(p.shape), DitherKey(0, 0, 0, rank), size,
                                                                   state))
                       * p.numel() for n, p in weights) / sum(p.numel() for _, p in weights)
        measured = stats["payload_bits_per_coordinate"]
        if isinstance(codec, hvdquant.QSGD) and codec.coding == "elias":
            assert measured <= expected  # the QSGD paper's bound on the expected length
        elif isinstance(codec, hvdquant.ECDQ) and codec.scope == "bucket":
            assert measured == pytest.approx(expected, rel=0.05)  # its formula is the Gaussian model's length
        elif isinstance(codec, hvdquant.ECDQ):
            # the formula is the Gaussian model's length with every bucket at the tensor's RMS; buckets
            # of unequal energy cost less in the tensor scope (one step for all: quiet ones go silent)
            assert 0.5 * expected < measured <= 1.05 * expected
        else:
            assert measured == pytest.approx(expected, rel=0.01)
    assert stats["bits_per_coordinate"] >= stats["payload_bits_per_coordinate"]
    # every weight matrix goes through the codec, every bias (1-D) travels as float32
    compressed = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert stats["compressed_coordinates"] == 6 * compressed
    assert stats["coordinates"] == 6 * sum(p.numel() for p in model.parameters())
    assert stats["entropy_bits_per_coordinate"] <= stats["payload_bits_per_coordinate"] + 1e-9


@pytest.mark.parametrize("shared_data", [True, False])
def test_adaptive_ndqsg_decides_alike_on_every_rank(shared_data):
    """NDQSG(adaptive=True): with the same minibatch on every rank (gradients equal up to nothing)
    every weight tensor nests from its third step on (two paying probes, NestingPolicy.CONFIRM_STEPS); with
    each rank's own minibatch of 8 digits (weakly correlated gradients) nesting stays off. Either way
    every rank holds the same decisions and bit-identical replicas after every step."""
    codec = hvdquant.NDQSG((3, 1), 64, adaptive=True)
    x, y = load_digits()
    model = mlp()
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                        named_parameters=model.named_parameters(), codec=codec,
                                        reducer="allgather", min_numel=16)
    weights = sorted(n for n, p in model.named_parameters() if p.dim() >= 2)
    agree = []
    for step in range(4):
        idx = torch.arange(8) + 8 * (step if shared_data else hvd.rank() + hvd.size() * step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        policy = opt._hvdquant.exchange.codec_state.nesting
        decisions = torch.tensor([policy.is_on(n) for n in weights])
        agree.append(same_on_all_ranks(decisions, f"adaptive.{shared_data}.{step}"))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    identical = same_on_all_ranks(after, f"adaptive.{shared_data}.weights")
    assert all(agree) and identical
    assert {n: policy.is_on(n) for n in weights} == {n: shared_data for n in weights}
    assert opt.state_dict()["hvdquant"]["exchange"]["codec_state"]["nesting"] == policy.state_dict()


def exchange_once(codec, g, step, name="layer.weight", reducer="allgather"):
    ex = make_exchange(codec, reducer, True, HorovodCollectives())
    return start(ex, name, g, 1234, step)(), ex


@pytest.mark.parametrize("dither", ["independent", "stratified"])
def test_ndqsg_equals_dqsg_s1_bit_for_bit_when_decoding_succeeds(dither):
    """Identical gradients on every rank: |g − y + eΔ| ≤ Δ < ρΔ/2, so every nested decode succeeds
    and NDQSG's mean must be DQSG(3)'s, bit for bit, with the same dithers (either family)."""
    g = torch.randn(40, 50, generator=torch.Generator().manual_seed(5))
    nd, ex = exchange_once(hvdquant.NDQSG((3, 1), 100, dither=dither, adaptive=False), g, step=0)
    dq, _ = exchange_once(hvdquant.DQSG(3, 100, dither), g, step=0)
    assert ex.decode.failed_buckets == 0
    assert torch.equal(nd, dq)


@pytest.mark.parametrize("dither", ["independent", "stratified"])
def test_ndqsg_recovers_failed_buckets(dither):
    """Independent gradients of different scales: nested decodes fail, are detected and recovered;
    the result is still exactly DQSG(3)'s mean, on every rank."""
    rank = hvd.rank()
    g = torch.randn(40, 50, generator=torch.Generator().manual_seed(50 + rank)) * (1 + 3 * rank)
    nd, ex = exchange_once(hvdquant.NDQSG((3, 1), 100, dither=dither, adaptive=False), g, step=1)
    dq, _ = exchange_once(hvdquant.DQSG(3, 100, dither), g, step=1)
    failed = hvd.allreduce(torch.tensor([ex.decode.failed_buckets]), op=hvd.Sum, name="ndqsg.failed")
    identical = same_on_all_ranks(nd, "ndqsg.recovered")
    assert identical and torch.equal(nd, dq)
    assert int(failed) > 0


@pytest.mark.parametrize("codec_name", ["dqsg", "ndqsg"])
def test_decoded_mean_is_unbiased(codec_name):
    """T = 120 exchanges of fixed per-rank gradients with fresh dithers. The error of the average
    over exchanges has per-coordinate std Δ_eff/√(12·P·T) with Δ_eff² = mean over ranks of Δ_p²
    (each rank's own scale); z-scores: max |z| < 5 over 200 coordinates, mean z² ∈ [0.7, 1.3]."""
    rank, size = hvd.rank(), hvd.size()
    g = torch.randn(2, 100, generator=torch.Generator().manual_seed(rank)) * (1 + rank)
    codec = hvdquant.DQSG(3, 200) if codec_name == "dqsg" else hvdquant.NDQSG((3, 1), 200, adaptive=False)
    true = hvd.allreduce(g.double(), op=hvd.Average, name=f"unbiased.{codec_name}.true").reshape(-1)
    delta2 = hvd.allreduce(((g.abs().max() / 3) ** 2).double(), op=hvd.Average,
                           name=f"unbiased.{codec_name}.delta")
    T = 120
    acc = torch.zeros(200, dtype=torch.float64)
    for t in range(T):
        out, _ = exchange_once(codec, g, step=t, name="unbiased")
        acc += out.reshape(-1).double()
    sd = math.sqrt(float(delta2) / (12 * size * size) * size / T)  # Var(mean) = Σ_p Δ_p²/12 / P²
    z = (acc / T - true) / sd
    assert float(z.abs().max()) < 5
    assert 0.7 < float((z**2).mean()) < 1.3


def accuracy_after_training(make_opt, steps: int = 250) -> float:
    x, y = load_digits()
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
    model = mlp()
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(100 + hvd.rank())
    for _ in range(steps):
        idx = torch.randint(0, 1500, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float((model(test_x).argmax(1) == test_y).float().mean())


def test_training_within_two_points_of_uncompressed():
    """250 steps of the digits MLP: DQSG s=3 and NDQSG (3)/(3,1) within 2 points of Horovod fp32."""
    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    base = accuracy_after_training(lambda m: hvd.DistributedOptimizer(sgd(m), named_parameters=m.named_parameters()))
    accs = {name: accuracy_after_training(lambda m, c=c: hvdquant.DistributedOptimizer(
        sgd(m), named_parameters=m.named_parameters(), codec=c, min_numel=16))
        for name, c in (("dqsg3", hvdquant.DQSG(3, 512)), ("ndqsg", hvdquant.NDQSG((3, 1), 512)))}
    for name, acc in accs.items():
        assert acc >= base - 0.02, f"{name}: {acc:.3f} vs uncompressed {base:.3f}"


def test_refusals_are_clear():
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    named = list(model.named_parameters())
    with pytest.raises(NotImplementedError, match="groups"):
        hvdquant.DistributedOptimizer(sgd, named, codec=hvdquant.DQSG(), groups=2)
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvdquant.DistributedOptimizer(sgd, named, codec=hvdquant.DQSG(), op=hvd.Adasum)
    with pytest.raises(ValueError, match="NDQSG needs reducer='allgather'"):
        hvdquant.DistributedOptimizer(sgd, named, codec=hvdquant.NDQSG(), reducer="scatter_reduce")
    with pytest.raises(TypeError, match="hvdquant codec"):
        hvdquant.DistributedOptimizer(sgd, named, codec=hvd.Compression.fp16)
    with pytest.raises(ValueError, match="reducer"):
        hvdquant.DistributedOptimizer(sgd, named, codec=hvdquant.DQSG(), reducer="ring")
    emb = nn.Embedding(10, 4, sparse=True)
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1), list(emb.named_parameters()),
                                        codec=hvdquant.DQSG(), min_numel=1)
    with pytest.raises(NotImplementedError, match="sparse"):
        emb(torch.tensor([1, 2])).sum().backward()
    opt._handles.clear()


def test_configuration_mismatch_is_named():
    model = mlp()
    codec = hvdquant.DQSG(1, 256 if hvd.rank() == 0 else 128)
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(), codec=codec, min_numel=16)
    with pytest.raises(ValueError, match=r"codec.bucket_size: rank 0 has 256, rank 1 has 128"):
        model(torch.randn(4, 64)).sum().backward()
    opt._handles.clear()


def test_dither_keys_do_not_depend_on_hook_order():
    """The key of a parameter's dither is (seed, step, crc32(name), rank): two exchanges of the same
    name and step give the same bits whatever else was exchanged in between."""
    g = torch.randn(30, 40, generator=torch.Generator().manual_seed(hvd.rank()))
    a, _ = exchange_once(hvdquant.DQSG(1, 100), g, step=3, name="order.a")
    exchange_once(hvdquant.DQSG(1, 100), g * 2, step=3, name="order.b")
    b, _ = exchange_once(hvdquant.DQSG(1, 100), g, step=3, name="order.a")
    assert torch.equal(a, b)
    assert tensor_id("order.a") != tensor_id("order.b")
