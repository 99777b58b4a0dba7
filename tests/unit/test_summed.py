"""The summable-allreduce exchange's fusion, on one process with a recording Collectives.

The invariants of :mod:`hvdquant.transports.summed`: ``start`` (the gradient hook) never waits on
a collective; the first finisher exchanges every started buffer in one MAX and one SUM allreduce
however many tensors they hold; with a group plan, groups are sent during the hooks as soon as
their maxima are in, with the same result bits; a non-finite gradient raises on every finisher of
the exchange, never in a hook. And the Horovod shim's reading of the framework's factor off the
reduced word.
"""

import pytest
import torch
from one_tensor import start

from hvdquant.adapters.horovod import SummedCompression
from hvdquant.codecs import DQSG
from hvdquant.transports.collectives import Started
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.nested_sum import NestedSum
from hvdquant.transports.session import Session, dither_key
from hvdquant.transports.sum_schemes import DQSGSum
from hvdquant.transports.summed import SummedExchange


class Recording:
    """One rank (P = 1): collectives return their input; every call and every wait is logged.
    ``arrived``: whether a started collective reports itself done before it is waited on."""

    rank, size = 0, 1

    def __init__(self, arrived: bool = True) -> None:
        self.log: list[str] = []
        self.arrived = arrived

    def _started(self, what: str, value):
        self.log.append(f"start {what}")

        def wait():
            self.log.append(f"wait {what}")
            return value

        return Started(wait, 0, lambda: self.arrived)

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
        assert coll.log == []  # the hooks only take maxima: nothing started, nothing waited on
        outs = {name: finish() for name, finish in handed.items()}
        rounds = [line.split()[1] for line in coll.log if line.startswith("start")]
        assert rounds == ["max", "sum"]  # one round each for the six tensors (P = 1: no recovery)
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


def run_steps(ex: SummedExchange, grads: dict[str, torch.Tensor], steps: int, log: list[str] | None = None
              ) -> list[dict[str, torch.Tensor]]:
    """``steps`` exchanges of ``grads`` (scaled per step), started in reverse name order as a
    backward pass would; per step, the results, and (``log``) what ran before the first finisher."""
    outs = []
    for step in range(steps):
        if log is not None:
            ex.coll.log.clear()
        handed = {name: start(ex, name, g * (step + 1), 5, step) for name, g in reversed(grads.items())}
        if log is not None:
            log.append(list(ex.coll.log))
        outs.append({name: finish() for name, finish in handed.items()})
    return outs


@pytest.mark.parametrize("scheme", [DQSGSum(3, 64, rotation="hadamard"), NestedSum((8, 1), 64)])
def test_groups_are_sent_during_the_hooks_with_the_same_bits(scheme):
    """group_threshold: the first step goes in one exchange and agrees the plan (rank 0's start
    order cut into groups of at least 6000 gradient bytes); from the second step each group's MAX
    and SUM rounds start inside the hooks, named after its members, and the results equal the
    ungrouped exchange's bit for bit."""
    grads = gradients()
    coll = Recording()
    grouped = SummedExchange(scheme, False, coll, group_threshold=6000)
    seen: list[list[str]] = []
    outs = run_steps(grouped, grads, 3, seen)
    alone = SummedExchange(type(scheme)(**scheme_args(scheme)), False, Recording())
    assert all(torch.equal(a[name], b[name]) for a, b in zip(outs, run_steps(alone, grads, 3)) for name in grads)
    order = [name for name in reversed(grads)]  # the hooks' order at the first step
    sizes = {name: g.numel() for name, g in grads.items()}
    expect, members, size = [], [], 0
    for name in order:
        members.append(name)
        size += 4 * sizes[name]
        if size >= 6000:
            expect.append(tuple(members))
            members, size = [], 0
    expect += [tuple(members)] if members else []
    assert grouped.plan.groups == expect and len(expect) > 2
    assert seen[0] == []  # no plan yet: nothing in the hooks
    for hooks in seen[1:]:
        sums = [line for line in hooks if line.startswith("start sum")]
        assert len(sums) == len(expect)  # every group was sent before any finisher ran
        assert len(set(sums)) == len(sums)  # each group its own round name


@pytest.mark.parametrize("scheme", [DQSGSum(3, 64, rotation="hadamard"), NestedSum((8, 1), 64)])
def test_send_starts_each_buffers_rounds_in_an_order_fixed_by_the_calls(scheme):
    """send() after each start (the DDP hook): buffer i's MAX round starts at call i, its maxima are
    waited for and its SUM round started at call i + 1 (never a wait on a round of the same call: no
    polling), and the finishers, called after the last, give the unpipelined exchange's bits."""
    grads = gradients(4)
    coll = Recording(arrived=False)
    ex = SummedExchange(scheme, False, coll)
    alone = SummedExchange(type(scheme)(**scheme_args(scheme)), False, Recording())
    for step in range(3):
        calls, finishers = [], []
        for name, g in reversed(grads.items()):
            coll.log.clear()
            finishers.append((name, start(ex, name, g * (step + 1), 5, step)))
            ex.send()
            calls.append(list(coll.log))
        handed = {name: start(alone, name, g * (step + 1), 5, step) for name, g in reversed(grads.items())}
        expected = {name: finish() for name, finish in handed.items()}
        outs = {name: finish() for name, finish in finishers}
        assert [line.split()[:2] for line in calls[0]] == [["start", "max"]]
        for prev, call in zip(calls, calls[1:]):
            assert call[0].startswith("start max")
            assert call[1] == "wait " + prev[0][len("start "):]  # the previous call's maxima
            assert call[2].startswith("start sum")
        assert all(torch.equal(outs[n], expected[n]) for n in grads)


def scheme_args(scheme) -> dict:
    if isinstance(scheme, DQSGSum):
        return {"levels": scheme.levels, "bucket_size": scheme.bucket_size, "dither": scheme.dither,
                "rotation": scheme.rotation}
    return {"levels": scheme.nested.levels, "bucket_size": scheme.nested.bucket_size}


def test_a_group_whose_maxima_have_not_arrived_waits_for_the_finisher():
    """The hooks poll: maxima not yet arrived leave the group for the finisher, which waits for them
    (a hook never waits)."""
    grads = gradients(3)
    coll = Recording(arrived=False)
    ex = SummedExchange(DQSGSum(1, 64), False, coll, group_threshold=1)
    seen: list[list[str]] = []
    run_steps(ex, grads, 2, seen)
    assert len(ex.plan.groups) == 3
    assert [line.split()[1] for line in seen[1]] == ["max"] * 3  # started, not waited, not sent


def test_nonfinite_gradient_in_a_group_raises_at_every_finisher_not_in_the_hook():
    grads = gradients(3)
    ex = SummedExchange(DQSGSum(1, 64), False, Recording(), group_threshold=1)
    run_steps(ex, grads, 1)
    bad = dict(grads)
    bad["layer1.weight"] = bad["layer1.weight"].clone()
    bad["layer1.weight"][0, 0] = float("nan")
    handed = [start(ex, name, g, 5, 1) for name, g in reversed(bad.items())]  # no raise in the hooks
    for finish in handed:
        with pytest.raises(FloatingPointError, match="'layer1.weight'"):
            finish()
    outs = run_steps(ex, grads, 1)  # the next step exchanges normally
    assert all(torch.isfinite(out).all() for out in outs[0].values())


def test_group_plan_cuts_rank_zeros_order():
    from hvdquant.transports.groups import GroupPlan

    plan = GroupPlan.from_order([("c", 10), ("a", 300), ("b", 5), ("d", 1)], threshold=1024)
    assert plan.groups == [("c", "a"), ("b", "d")]
    assert plan.completed(["a"], {"a"}) == []
    assert plan.completed(["a", "b"], {"a", "c", "b"}) == [("c", "a")]
    assert plan.completed(["zz"], {"zz"}) == []
    with pytest.raises(ValueError, match="positive"):
        GroupPlan.from_order([], threshold=0)
    with pytest.raises(ValueError, match="group_threshold"):
        SummedExchange(DQSGSum(1, 64), False, Recording(), group_threshold=0)
