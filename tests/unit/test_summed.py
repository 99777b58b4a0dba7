"""The summable-allreduce exchange's fusion, on one process with a recording Collectives.

The invariants of :mod:`hvdquant.transports.summed`: ``start`` (the gradient hook) starts
collectives but never waits on one; the first finisher exchanges every started buffer in one SUM
allreduce however many tensors they hold; a non-finite gradient raises on every finisher of the
exchange. And the Horovod shim's reading of the framework's factor off the reduced word.
"""

import pytest
import torch
from one_tensor import start

from hvdquant.adapters.horovod import SummedCompression
from hvdquant.codecs import DQSG
from hvdquant.transports.collectives import Started
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.session import Session, dither_key
from hvdquant.transports.summed import DQSGSum, NestedSum, SummedExchange


class Recording:
    """One rank (P = 1): collectives return their input; every call and every wait is logged."""

    rank, size = 0, 1

    def __init__(self) -> None:
        self.log: list[str] = []

    def _started(self, what: str, value):
        self.log.append(f"start {what}")

        def wait():
            self.log.append(f"wait {what}")
            return value

        return Started(wait, 0)

    def allreduce(self, tensor, name, op="sum"):
        return self._started(f"{op} {name}", tensor.clone())

    def allgather_bytes(self, buf, name):
        return self._started(f"allgather {name}", [buf])

    def allgather_object(self, obj, name):
        self.log.append(f"object {name}")
        return [obj]


def gradients(count: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {f"layer{i}.weight": torch.randn(37 * (i + 1), 5, generator=gen) for i in range(count)}


@pytest.mark.parametrize("scheme", [DQSGSum(1, 64), NestedSum((3, 1), 64)])
def test_encode_never_waits_and_one_round_sums_the_batch(scheme):
    coll = Recording()
    ex = SummedExchange(scheme, False, coll)
    grads = gradients()
    for step in range(3):  # nested: steps 2 and 3 decode cosets with side information
        coll.log.clear()
        handed = {name: start(ex, name, g, 5, step) for name, g in grads.items()}
        assert all(line.startswith("start max") for line in coll.log), coll.log  # nothing waited on
        outs = {name: finish() for name, finish in handed.items()}
        sums = [line for line in coll.log if line.startswith("start sum")]
        assert sums == ["start sum hvdquant.sum.fields"]  # one round for the six tensors (P = 1: no recovery)
        for name, g in grads.items():
            # P = 1: DQSG(s) error per coordinate ≤ Δ/2 = max|g_bucket|/(2s) ≤ max|g|/(2s)
            bound = float(g.abs().max()) / (2 * ex.codec.levels)
            assert outs[name].shape == g.shape and float((outs[name] - g).abs().max()) <= bound * (1 + 1e-6)


def test_factor_of_the_framework_reduction_is_applied():
    """The Horovod shim: the reduced word holds c·P; Average (c = 1/P) and Sum (c = 1) are read off
    it and applied to the exchange's sum; a factor that destroys the fields is refused."""
    def shim() -> SummedCompression:
        comp = SummedCompression(DQSG(1, 64), seed=1)
        comp._session = Session(SummedExchange(DQSGSum(1, 64), False, Recording()), 1, "test")
        return comp

    g = torch.randn(300)
    outs = []
    for factor in (1.0, 0.5):
        comp = shim()
        word, ctx = comp.compress(g, "w")
        outs.append(comp.decompress(word * factor, ctx))
    assert outs[1].shape == g.shape and torch.equal(outs[1], outs[0] * 0.5)
    word, ctx = comp.compress(g, "w")
    with pytest.raises(ValueError, match="scaled the payload"):
        comp.decompress(word * 0.0, ctx)


def test_nonfinite_gradient_raises_on_every_finisher_of_its_exchange():
    ex = SummedExchange(DQSGSum(1, 64), False, Recording())
    bad = torch.ones(100)
    bad[7] = float("inf")
    finishers = [start(ex, "a.weight", torch.ones(100), 1, 0), start(ex, "b.weight", bad, 1, 0)]
    for finish in finishers:
        with pytest.raises(FloatingPointError, match="'b.weight'"):
            finish()


def test_starting_a_name_twice_in_one_exchange_is_refused():
    ex = SummedExchange(DQSGSum(1, 64), False, Recording())
    start(ex, "w", torch.ones(10), 1, 0)
    with pytest.raises(ValueError, match="started twice"):
        start(ex, "w", torch.ones(10), 1, 1)


def test_one_buffer_of_many_tensors_costs_one_max_and_one_sum_round():
    """A fused buffer (a DDP bucket): one MAX allreduce of all its bucket maxima at start, one SUM
    allreduce of all fields, one allgather of its uncompressed tensors; the result is the
    single-tensor exchanges' result, bit for bit."""
    grads = gradients(4)
    coll = Recording()
    fused = SummedExchange(DQSGSum(1, 64), False, coll)
    items = [(name, g, dither_key(2, 0, name, 0)) for name, g in grads.items()] + [("bias", torch.randn(7), None)]
    buf = FusedBuffer.of(items)
    out = buf.unflatten(fused.start(buf)())
    assert [line.split()[1] for line in coll.log if line.startswith("start")] == ["max", "sum", "allgather"]
    alone = SummedExchange(DQSGSum(1, 64), False, Recording())
    for name, g in grads.items():
        assert torch.equal(out[name], start(alone, name, g, 2, 0)())
    assert torch.equal(out["bias"], items[-1][1])


@pytest.mark.parametrize("drift,expect_nesting", [(1e-4, True), (1.0, False)])
def test_adaptive_nested_sum_switches_by_the_probe_and_stays_exact(drift, expect_nesting):
    """NestedSum(adaptive=True), one rank: step 0 has no side information (DQSG(s₁)), steps 1 and 2
    are sent as DQSG(s₁) and probed against the previous mean, and from step 3 the tensor nests only
    if both probes said cosets + checksums + recovery cost at most ADAPTIVE_MARGIN × the DQSG(s₁)
    fields (NestingPolicy.CONFIRM_STEPS = 2; slow drift: yes; drift as large as the gradient: no). Every
    step equals plain DQSGSum's result bit for bit."""
    nested = SummedExchange(NestedSum((8, 1), 64, adaptive=True), False, Recording())
    plain = SummedExchange(DQSGSum(8, 64, dither="independent"), False, Recording())
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2000, generator=gen)
    for step in range(5):
        g = base + drift * torch.randn(2000, generator=gen)
        outs = [start(ex, "w", g, 3, step)() for ex in (nested, plain)]
        assert torch.equal(outs[0], outs[1])
        assert nested.scheme.policy.is_on("w") == (expect_nesting and step > 1)
    if expect_nesting:  # steps 3 and 4 went through the cosets and never needed the recovery round
        assert nested.decode_stats.failed_buckets == 0 and nested.decode_stats.recovery_rounds == 0


def test_adaptive_nested_sum_chooses_the_cheapest_ratio():
    """On slowly drifting gradients the nested sum's probes find that ρ = 2 (a 1-bit coset field
    instead of ρ = 8's 3 bits) resolves every bucket: the tensor nests at ρ = 2 (the candidates for
    s₁ = 8: 2, 4, 8, 16) and every step still equals plain DQSGSum's result bit for bit."""
    nested = SummedExchange(NestedSum((8, 1), 64, adaptive=True), False, Recording())
    plain = SummedExchange(DQSGSum(8, 64, dither="independent"), False, Recording())
    codec = nested.scheme.nested
    assert codec.candidate_ratios() == (2, 4, 8, 16)
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2000, generator=gen)
    for step in range(5):
        g = base + 1e-4 * torch.randn(2000, generator=gen)
        outs = [start(ex, "w", g, 3, step)() for ex in (nested, plain)]
        assert torch.equal(outs[0], outs[1])
    policy = nested.scheme.policy
    assert policy.is_on("w") and codec.ratio("w", policy) == 2
    restored = NestedSum((8, 1), 64, adaptive=True)
    restored.load_state_dict(nested.scheme.state_dict())  # the decisions travel in the checkpoint
    assert restored.policy == policy
    with pytest.raises(ValueError, match="nesting state"):
        restored.load_state_dict({"side": {}, "nesting": {"nesting": {"w": "yes"}}})
    assert restored.policy == policy  # nothing changed by the refused checkpoint
    assert nested.decode_stats.failed_buckets == 0
