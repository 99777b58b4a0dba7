"""hvdquant.Compression.dqsg through real Horovod; run under
``horovodrun -np 2 --gloo python -m pytest tests/horovod`` (and ``--mpi``).

Every rank runs every test in the same order. Each test finishes its collectives before it
asserts, so a failure on one rank cannot leave the others waiting.
"""

import horovod.torch as hvd
import pytest
import torch
from hvd_helpers import same_on_all_ranks
from torch import nn

import hvdquant
from hvdquant.transports.nested_sum import NestedSum

pytestmark = pytest.mark.horovod




@pytest.mark.parametrize("op", ["average", "sum"])
def test_allreduce_gives_mean_or_sum(op):
    """hvd.allreduce with the compression: Average -> mean, Sum -> sum, each within the DQSG bound
    (every sender's error ≤ Δ/2, so the mean's ≤ Δ/2 and the sum's ≤ PΔ/2)."""
    rank, size = hvd.rank(), hvd.size()
    comp = hvdquant.Compression.dqsg(levels=3, bucket_size=128, seed=1)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(rank)) + rank
    hop = hvd.Average if op == "average" else hvd.Sum
    out = hvd.allreduce(g, name=f"t.{op}", compression=comp, op=hop)
    gathered = hvd.allgather(g.unsqueeze(0), name=f"t.{op}.all").double()
    exact = gathered.mean(0) if op == "average" else gathered.sum(0)
    absmax = gathered.abs().reshape(size, -1).max(0).values
    delta = torch.stack([absmax[i:i + 128].max() for i in range(0, 1000, 128)]) / 3
    bound = delta.repeat_interleave(128)[:1000] / 2 * (1 if op == "average" else size)
    identical = same_on_all_ranks(out, f"t.{op}.same")
    assert identical
    assert bool(((out.double() - exact).abs() <= bound + 1e-5).all())
    assert out.shape == g.shape and out.dtype == g.dtype


@pytest.mark.parametrize("dither", ["independent", "stratified"])
def test_decoded_mean_unbiased(dither):
    """T = 150 calls with fresh dithers, fixed inputs. Per coordinate, t = (average − true mean) /
    (sample sd / √T) is ≈ N(0, 1) for an unbiased decoder: over 256 coordinates max|t| < 5 and
    mean t² ∈ [0.75, 1.25] (≈ ±2.8 standard errors of the mean of χ²₁). Independent dither: the
    error variance is Δ²/(12P) at every coordinate, so its average over coordinates lies within
    ±15% of that (standard error ≈ √(2/T) / 16 ≈ 0.7%). Stratified dither: that variance depends on
    how the ranks' inputs sit relative to each other (docs/ALGORITHMS.md §9), so only its bound
    P·Δ²/(12P²)·P = Δ²/12 (all ranks' errors aligned) is checked."""
    rank, size = hvd.rank(), hvd.size()
    comp = hvdquant.Compression.dqsg(levels=1, bucket_size=256, seed=3, dither=dither)
    g = torch.randn(256, generator=torch.Generator().manual_seed(10 + rank))
    true = hvd.allreduce(g.double(), name="unb.true", op=hvd.Average)
    delta = float(hvd.allreduce(g.abs().max(), name="unb.max", op=hvd.Max))
    T = 150
    outs = torch.stack([hvd.allreduce(g, name=f"unb.{dither}", compression=comp).double() for _ in range(T)])
    var = outs.var(0)
    t = (outs.mean(0) - true) / (var / T).sqrt()
    assert float(t.abs().max()) < 5
    assert 0.75 < float((t**2).mean()) < 1.25
    nominal = delta**2 / (12 * size)
    if dither == "independent":
        assert abs(float(var.mean()) / nominal - 1) < 0.15
    else:
        assert float(var.mean()) <= 1.15 * nominal * size


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train_digits(comp, steps: int = 12) -> torch.Tensor:
    """``steps`` DistributedOptimizer steps on the digits data, different batches per rank; the
    flat parameters after them."""
    from hvdquant.data import load_digits

    x, y = load_digits()
    model = make_model(0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=model.named_parameters(), compression=comp)
    for step in range(steps):
        idx = torch.arange(32) + 32 * (hvd.rank() + hvd.size() * step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("compression", ["dqsg", "dqsg-stratified", "dqsg-rotated", "fp16", "none"])
def test_parameters_bit_identical_after_steps(compression):
    """After 12 steps every rank holds the same bits. Horovod's own fp16/none run side by side with
    hvdquant."""
    comp = {"dqsg": hvdquant.Compression.dqsg(levels=1, bucket_size=512),
            "dqsg-stratified": hvdquant.Compression.dqsg(levels=1, bucket_size=512, dither="stratified"),
            "dqsg-rotated": hvdquant.Compression.dqsg(levels=1, bucket_size=512, rotation="hadamard"),
            "fp16": hvd.Compression.fp16, "none": hvd.Compression.none}[compression]
    before = torch.cat([p.detach().reshape(-1).clone() for p in make_model(0).parameters()])
    after = train_digits(comp)
    assert same_on_all_ranks(after, f"bitident.{compression}")
    assert not torch.equal(before, after)
    if compression.startswith("dqsg"):
        # Measured: float64 words of 21 base-5 digits (P=2) + sentinel + float32 scales.
        assert comp.stats.bits_per_coordinate < 8


@pytest.mark.parametrize("levels", [1, (8, 1)])
def test_groups_sent_during_backward_give_the_same_bits(levels):
    """Groups of at least 1 KiB (the model's two weight tensors in separate groups, sent during
    backward) against no groups (everything at the first decompress): the same parameters, bit for
    bit, after 8 steps, for DQSG and nested DQSG."""
    make = hvdquant.Compression.dqsg if levels == 1 else hvdquant.Compression.ndqsg
    grouped = make(levels=levels, bucket_size=128, seed=4, group_threshold=1024)
    alone = make(levels=levels, bucket_size=128, seed=4, group_threshold=None)
    out = [train_digits(comp, 8) for comp in (grouped, alone)]
    assert len(grouped.exchange.plan.groups) == 2 and alone.exchange.plan is None
    assert torch.equal(out[0], out[1])
    assert same_on_all_ranks(out[0], f"grouped.{levels}")


def test_sum_op_returns_sum_in_optimizer():
    """op=hvd.Sum through DistributedOptimizer: gradients are the sum over ranks (≈ P × mean)."""
    rank, size = hvd.rank(), hvd.size()
    lin = nn.Linear(300, 1, bias=False)
    nn.init.zeros_(lin.weight)
    comp = hvdquant.Compression.dqsg(levels=7, bucket_size=300, seed=5)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(lin.parameters(), lr=1.0),
                                   named_parameters=lin.named_parameters(), compression=comp, op=hvd.Sum)
    x = torch.full((1, 300), float(rank + 1))
    opt.zero_grad()
    lin(x).sum().backward()  # each rank's gradient is rank+1 everywhere
    opt.synchronize()
    with opt.skip_synchronize():
        opt.step()
    expected = size * (size + 1) / 2  # Σ_r (r + 1); the mean would be (P + 1) / 2
    delta = size / 7  # common step: max |g| over ranks / levels
    assert float((-lin.weight.detach() - expected).abs().max()) <= size * delta / 2 + 1e-5


def test_nonfinite_gradient_fails_on_every_rank():
    """A NaN on rank 1 only: every rank raises FloatingPointError naming the tensor (no hang)."""
    comp = hvdquant.Compression.dqsg(levels=1, bucket_size=16, seed=1)
    g = torch.ones(40)
    if hvd.rank() == 1:
        g[5] = float("nan")
    with pytest.raises(FloatingPointError, match="nanny"):
        hvd.allreduce(g, name="nanny", compression=comp)


def test_configuration_mismatch_names_rank():
    comp = hvdquant.Compression.dqsg(levels=1, bucket_size=16 if hvd.rank() == 0 else 32, seed=1)
    with pytest.raises(ValueError, match=r"bucket_size: rank 0 has 16, rank 1 has 32"):
        hvd.allreduce(torch.ones(40), name="mismatch", compression=comp)


def test_unnamed_allreduce_refused():
    comp = hvdquant.Compression.dqsg()
    with pytest.raises(ValueError, match="needs name="):
        hvd.allreduce(torch.ones(4), compression=comp)


def test_nested_sum_compression_equals_dqsg_and_recovers():
    """Compression.ndqsg through hvd.allreduce: the first call has no side information (plain DQSG);
    later calls resolve coset sums with the previous mean. Whatever fails is recovered, so every
    call equals Compression.dqsg(s₁) with the same seed, bit for bit, under Average and Sum."""
    rank = hvd.rank()
    nested = hvdquant.Compression.ndqsg(levels=(8, 1), bucket_size=64, seed=9, adaptive=False)  # ρ = 8 > P
    plain = hvdquant.Compression.dqsg(levels=8, bucket_size=64, seed=9, dither="independent")  # NestedSum's dither
    base = torch.randn(500, generator=torch.Generator().manual_seed(1))
    for step in range(6):
        noise = 0.01 if step < 4 else 2.0  # slowly changing, then a jump that breaks the side information
        g = base + noise * torch.randn(500, generator=torch.Generator().manual_seed(10 * step + rank))
        op = hvd.Average if step % 2 == 0 else hvd.Sum
        a = hvd.allreduce(g, name="t", compression=nested, op=op)  # same name, same dithers
        b = hvd.allreduce(g, name="t", compression=plain, op=op)
        assert torch.equal(a, b), f"step {step}"
    assert nested.decode_stats.failed_buckets > 0 and nested.decode_stats.recovery_rounds > 0
    assert nested.decode_stats.failed_buckets < 5 * 8  # 5 nested calls × 8 buckets: some decoded without recovery
    assert nested.stats.bits_per_coordinate < plain.stats.bits_per_coordinate + 8  # measured, recovery included


def test_unsummable_codecs_refuse_the_stock_path():
    with pytest.raises(TypeError, match="hvdquant.DistributedOptimizer"):
        hvdquant.Compression.qsgd(levels=2)
    with pytest.raises(TypeError, match="codec=hvdquant.OneBitSGD"):
        hvdquant.Compression.for_codec(hvdquant.OneBitSGD())
    assert isinstance(hvdquant.Compression.for_codec(hvdquant.NDQSG()).exchange.scheme, NestedSum)
    comp = hvdquant.Compression.for_codec(hvdquant.DQSG(2, 64))
    hvd.allreduce(torch.randn(300), name="entropy.t", compression=comp)
    assert 0 < comp.entropy_bits_per_coordinate <= comp.stats.bits_per_coordinate
