"""The summable-allreduce reducer's batching, on one process with a recording Collectives.

The invariants of :mod:`hvdquant.transports.summed`: ``encode`` (the gradient hook) starts
collectives but never waits on one; the first ``decode`` exchanges the whole batch in one SUM
allreduce however many tensors it holds; a non-finite gradient raises on every decode of its batch.
"""

import pytest
import torch

from hvdquant.transports.collectives import Started
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
    ex = SummedExchange(scheme, seed=5, collectives=coll)
    grads = gradients()
    for _step in range(3):  # nested: steps 2 and 3 decode cosets with side information
        coll.log.clear()
        handed = {name: ex.encode(g, name) for name, g in grads.items()}
        assert all(line.startswith("start max") for line in coll.log), coll.log  # nothing waited on
        outs = {name: ex.decode(word * 1.0, ctx) for name, (word, ctx) in handed.items()}
        sums = [line for line in coll.log if line.startswith("start sum")]
        assert sums == ["start sum hvdquant.sum.fields"]  # one round for the six tensors (P = 1: no recovery)
        for name, g in grads.items():
            # P = 1: DQSG(s) error per coordinate ≤ Δ/2 = max|g_bucket|/(2s) ≤ max|g|/(2s)
            bound = float(g.abs().max()) / (2 * ex.codec.levels)
            assert outs[name].shape == g.shape and float((outs[name] - g).abs().max()) <= bound * (1 + 1e-6)


def test_factor_of_the_framework_reduction_is_applied():
    """The reduced word holds c·P; Average (c = 1/P) and Sum (c = 1) are read off it."""
    coll = Recording()
    ex = SummedExchange(DQSGSum(1, 64), seed=1, collectives=coll)
    g = torch.randn(300)
    word, ctx = ex.encode(g, "w")
    half = ex.decode(word * 0.5, ctx)
    word, ctx = ex.encode(g, "w")
    with pytest.raises(ValueError, match="scaled the payload"):
        ex.decode(word * 0.0, ctx)
    assert half.shape == g.shape


def test_nonfinite_gradient_raises_on_every_decode_of_its_batch():
    ex = SummedExchange(DQSGSum(1, 64), seed=1, collectives=Recording())
    bad = torch.ones(100)
    bad[7] = float("inf")
    a = ex.encode(torch.ones(100), "a.weight")
    b = ex.encode(bad, "b.weight")
    for word, ctx in (a, b):
        with pytest.raises(FloatingPointError, match="'b.weight'"):
            ex.decode(word, ctx)


def test_encoding_a_name_twice_in_one_batch_is_refused():
    ex = SummedExchange(DQSGSum(1, 64), seed=1, collectives=Recording())
    ex.encode(torch.ones(10), "w")
    with pytest.raises(ValueError, match="encoded twice"):
        ex.encode(torch.ones(10), "w")


@pytest.mark.parametrize("drift,expect_nesting", [(1e-4, True), (1.0, False)])
def test_adaptive_nested_sum_switches_by_the_probe_and_stays_exact(drift, expect_nesting):
    """NestedSum(adaptive=True), one rank: step 0 has no side information (DQSG(s₁)), steps 1 and 2
    are sent as DQSG(s₁) and probed against the previous mean, and from step 3 the tensor nests only
    if both probes said cosets + checksums + recovery cost at most ADAPTIVE_MARGIN × the DQSG(s₁)
    fields (NestingPolicy.CONFIRM_STEPS = 2; slow drift: yes; drift as large as the gradient: no). Every
    step equals plain DQSGSum's result bit for bit."""
    nested = SummedExchange(NestedSum((8, 1), 64, adaptive=True), seed=3, collectives=Recording())
    plain = SummedExchange(DQSGSum(8, 64, dither="independent"), seed=3, collectives=Recording())
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2000, generator=gen)
    for step in range(5):
        g = base + drift * torch.randn(2000, generator=gen)
        outs = []
        for ex in (nested, plain):
            word, ctx = ex.encode(g, "w")
            outs.append(ex.decode(word, ctx))
        assert torch.equal(outs[0], outs[1])
        assert nested.scheme.policy.is_on("w") == (expect_nesting and step > 1)
    if expect_nesting:  # steps 3 and 4 went through the cosets and never needed the recovery round
        assert nested.decode_stats.failed_buckets == 0 and nested.decode_stats.recovery_rounds == 0


def test_adaptive_nested_sum_chooses_the_cheapest_ratio():
    """On slowly drifting gradients the nested sum's probes find that ρ = 2 (a 1-bit coset field
    instead of ρ = 8's 3 bits) resolves every bucket: the tensor nests at ρ = 2 (the candidates for
    s₁ = 8: 2, 4, 8, 16) and every step still equals plain DQSGSum's result bit for bit."""
    nested = SummedExchange(NestedSum((8, 1), 64, adaptive=True), seed=3, collectives=Recording())
    plain = SummedExchange(DQSGSum(8, 64, dither="independent"), seed=3, collectives=Recording())
    codec = nested.scheme.nested
    assert codec.candidate_ratios() == (2, 4, 8, 16)
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2000, generator=gen)
    for _step in range(5):
        g = base + 1e-4 * torch.randn(2000, generator=gen)
        outs = []
        for ex in (nested, plain):
            word, ctx = ex.encode(g, "w")
            outs.append(ex.decode(word, ctx))
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
