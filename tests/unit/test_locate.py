"""NDQSG's locating recovery (docs/ALGORITHMS.md §2): a failed bucket is first asked for power-sum
syndromes mod 65521 that locate and correct up to t wrong coordinates; only buckets they do not
explain are resent whole. Results stay exactly DQSG(s₁)'s; nothing is ever mis-corrected."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from hvdquant import NDQSG
from hvdquant.codecs import syndromes as sy
from hvdquant.codecs.base import TensorContext
from hvdquant.codecs.coset_resolver import bucket_coordinates
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.codecs.nesting_cost import NestingCost, SenderPass
from hvdquant.codecs.requests import SyndromeRequest, WholeBucket
from hvdquant.codecs.state import CodecState
from hvdquant.kernels import DitherKey, ops
from hvdquant.kernels.segments import Segments


def ctx_for(n: int, ranks: int, step: int = 0, name: str = "w", state: CodecState | None = None) -> TensorContext:
    return TensorContext(name, (n,), DitherKey(11, step, 3, 0), ranks, CodecState() if state is None else state)


def emulate(codec: NDQSG, gs: list[torch.Tensor], ctx: TensorContext):
    """The allgather transport in one process: payloads through bytes, the recovery callback, and
    every request and reply it saw."""
    ranks = len(gs)
    encs = [codec.encode(g, ctx.sender(p)) for p, g in enumerate(gs)]
    payloads = [codec.from_bytes(e.to_bytes(), e.n, ctx.sender(p)) for p, e in enumerate(encs)]
    log: list[tuple[dict[int, list[int]], dict[int, torch.Tensor]]] = []

    def recover(failed):
        out = {p: codec.recovery_payload(encs[p], ctx.sender(p), b) for p, b in failed.items()}
        log.append(({p: list(b) for p, b in failed.items()}, out))
        return out

    mean, stats = codec.aggregate(payloads, ctx, recover)
    fine = codec.fine
    ref = sum(fine.decode(fine.encode(g, ctx.sender(p)), ctx.sender(p)) for p, g in enumerate(gs)) / ranks
    return mean, ref, stats, log, encs


@dataclass(frozen=True)
class SingleLocate(NDQSG):
    """Locating that corrects one wrong coordinate at most (two syndromes)."""

    LOCATE_ERRORS = (1,)


def test_checks_syndromes_and_bytes_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(-7, 8, (5 * 64 + 17,), generator=gen, dtype=torch.int32)
    nb = ops.num_buckets(k.numel(), 64)
    blocks, mask = sy.listed_blocks(k, list(range(nb)), 64)
    assert torch.equal(sy.bucket_checks(blocks), ops.bucket_checksum(k, 64))
    assert torch.equal(blocks[mask], k.to(torch.int64))
    syn = sy.bucket_syndromes(k.to(torch.int64), [nb - 1, 0], 64, 0, 6)
    x = torch.arange(1, 65, dtype=torch.int64)
    for row, b in zip(syn, [nb - 1, 0]):
        part = k[b * 64:(b + 1) * 64].to(torch.int64)
        want = [int(sum(int(v) * pow(int(j), m, sy.LOCATE_PRIME) for v, j in zip(part, x)) % sy.LOCATE_PRIME)
                for m in range(6)]
        assert row.tolist() == want
    assert torch.equal(sy.syndrome_words(sy.syndrome_bytes(syn.reshape(-1))), syn.reshape(-1))


@pytest.mark.parametrize("errors", [1, 2, 3, 4, 5, 8, 16, 17, 40, 200])
def test_corrects_up_to_t_errors_and_never_miscorrects(errors):
    """With 2t syndromes, up to t wrong coordinates (each off by a nonzero multiple of ρ) are
    corrected exactly; more are left failed — over many random patterns, never a wrong correction."""
    d, rho = 512, 3
    codec = NDQSG((3, 1), d)
    rng = random.Random(errors)
    gen = torch.Generator().manual_seed(errors)
    for _ in range(20):
        k = torch.randint(-3, 4, (3 * d - 100,), generator=gen, dtype=torch.int32)
        kout = k.clone()
        bad = [0, 1, 2]
        for b in bad:
            size = min(d, k.numel() - b * d)
            for j in rng.sample(range(size), min(errors, size)):
                kout[b * d + j] += rho * rng.choice([-2, -1, 1, 2])
        checks = ops.bucket_checksum(k, d)
        for count in codec.locate_stages():  # (8, 32): t = 4, then 16
            syn = sy.bucket_syndromes(k.to(torch.int64), bad, d, 0, count)
            fixed, truth = codec.resolver.correct(kout, bad, dict(zip(bad, syn)), checks, rho)
            assert torch.equal(truth, k[bucket_coordinates(fixed, d, k.numel())])
            if errors <= count // 2:
                assert sorted(fixed) == bad
            elif errors > count:
                assert not fixed


def test_one_wrong_coordinate_is_corrected_without_resending_the_bucket():
    """Two ranks; rank 1's gradient equals rank 0's except one coordinate, which therefore resolves to
    the wrong coset member: its bucket fails, is corrected from 8 syndromes (16 bytes, one round)
    and nothing is resent whole; the mean is DQSG(s₁)'s bit for bit."""
    n, d = 1500, 256
    g0 = torch.linspace(-1, 1, n)[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    g1 = g0.clone()
    j = 300 + int(torch.argmax(g0[300:500].abs()))  # in bucket 1, not its absmax
    g1[j] = -g0[j] * 0.95
    codec = NDQSG((3, 1), d, adaptive=False, locate=True)
    mean, ref, stats, log, _ = emulate(codec, [g0, g1], ctx_for(n, 2))
    assert torch.equal(mean, ref)
    assert stats.failed_buckets == 1 and stats.failed_coordinates == 1 and stats.recovery_rounds == 1
    (failed, replies), = log
    assert failed == {1: [SyndromeRequest(1, 0)]}  # stage 0 syndromes of bucket 1, no whole bucket
    assert replies[1].numel() == 2 * codec.locate_stages()[0] == 16


def test_two_wrong_coordinates_beyond_single_locating_are_resent_not_miscorrected():
    """A codec locating one coordinate at most: a bucket with two wrong coordinates is not explained
    by its two syndromes, so it is resent whole; with one wrong coordinate it is corrected."""
    n, d = 1024, 256
    g0 = torch.linspace(-1, 1, n)[torch.randperm(n, generator=torch.Generator().manual_seed(2))]
    for wrong in (1, 2):
        g1 = g0.clone()
        js = [520 + int(i) for i in torch.topk(g0[520:700].abs(), 3).indices[1:1 + wrong]]  # bucket 2
        g1[js] = -g0[js] * 0.95
        codec = SingleLocate((3, 1), d, adaptive=False, locate=True)
        assert codec.locate_stages() == (2,)
        mean, ref, stats, log, _ = emulate(codec, [g0, g1], ctx_for(n, 2))
        assert torch.equal(mean, ref)
        assert stats.failed_buckets == 1 and stats.failed_coordinates == wrong
        requests = [r for failed, _ in log for r in failed[1]]
        assert requests == ([SyndromeRequest(2, 0)] if wrong == 1 else [SyndromeRequest(2, 0), WholeBucket(2)])
        assert sum(r[1].numel() for _, r in log) == 4 + (ops.symbol_bytes(d, 7) if wrong == 2 else 0)


@pytest.mark.parametrize("levels,d", [((3, 1), 256), ((8, 1), 512), ((8, 2), 100), ((6, 3), 64)])
def test_locating_decodes_exactly_dqsg_over_seeds_and_correlations(levels, d):
    """Over random seeds, rank counts and correlations from independent to almost equal: the mean is
    DQSG(s₁)'s bit for bit; every reply has exactly the bytes its request names (2 per syndrome +
    the packed symbols of whole buckets) and the payload's bytes are its fields'."""
    codec = NDQSG(levels, d, adaptive=False, locate=True)
    plain = NDQSG(levels, d, adaptive=False)
    stages = codec.locate_stages()
    seen_fix = seen_whole = 0
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        ranks = 2 + seed % 3
        n = 700 + 311 * seed
        for noise in (0.02, 0.08, 0.2, 0.5, 3.0):
            common = torch.randn(n, generator=gen)
            gs = [common + noise * torch.randn(n, generator=gen) for _ in range(ranks)]
            ctx = ctx_for(n, ranks, step=seed)
            mean, ref, stats, log, encs = emulate(codec, gs, ctx)
            assert torch.equal(mean, ref)
            mean2, _, stats2, _, _ = emulate(plain, gs, ctx)
            assert torch.equal(mean2, ref)
            for e in encs:
                assert e.nbytes() == e.to_bytes().numel() == sum(v.numel() * v.element_size()
                                                                 for v in e.fields.values())
            for failed, replies in log:
                for p, req in failed.items():
                    syn = [r for r in req if isinstance(r, SyndromeRequest)]
                    whole = [r.bucket for r in req if isinstance(r, WholeBucket)]
                    words = sum(stages[r.stage] - (stages[r.stage - 1] if r.stage else 0) for r in syn)
                    coords = bucket_coordinates(whole, d, n).numel()
                    assert replies[p].numel() == 2 * words + (ops.symbol_bytes(coords, codec.fine.symbols)
                                                              if whole or not syn else 0)
                    seen_whole += len(whole)
            seen_fix += stats.failed_buckets
    assert stages and seen_fix > 0 and seen_whole > 0


@pytest.mark.parametrize("noise", [0.15, 0.3, 0.7])
def test_adaptive_locating_decides_alike_on_every_rank(noise):
    """P = 4 ranks, each with its own adaptive (locating) codec, at correlations where nesting's
    outcome varies: the same decisions (state_dict) on every rank at every step, the mean DQSG(s₁)'s
    bit for bit, and while nesting is on the decision follows the bytes really handed over."""
    ranks, n, d = 4, 6000, 512
    codecs = [NDQSG((3, 1), d) for _ in range(ranks)]
    states = [CodecState() for _ in range(ranks)]
    assert codecs[0].locating and not NDQSG((3, 1), d, adaptive=False).locating
    fine = codecs[0].fine
    gen = torch.Generator().manual_seed(9)
    common = torch.randn(n, generator=gen)
    for step in range(6):
        common = common + noise * torch.randn(n, generator=gen)
        gs = [common + noise * torch.randn(n, generator=gen) for _ in range(ranks)]
        on = states[0].nesting.is_on("w")
        spent = []
        for codec, state in zip(codecs, states):
            ctx = ctx_for(n, ranks, step=step, state=state)
            mean, ref, _, log, encs = emulate(codec, gs, ctx)
            assert torch.equal(mean, ref)
            spent.append(sum(e.nbytes() for e in encs[2:]) + sum(r.numel() for _, rs in log for r in rs.values()))
        assert all(s.nesting == states[0].nesting for s in states)
        plain = sum(fine.encode(g, ctx.sender(p)).nbytes() for p, g in enumerate(gs[2:], 2))
        if on:
            pays = spent[0] <= NestingPolicy.ADAPTIVE_MARGIN * plain
            assert states[0].nesting.is_on("w") == pays
        else:
            assert spent[0] == plain


def test_locate_parameter_and_state():
    assert NDQSG().locate is None and NDQSG().locating
    assert NDQSG(adaptive=False, locate=True).locating and not NDQSG(locate=False).locating
    assert NDQSG((3, 1), 1 << 17).locate_stages() == ()  # locators must stay distinct mod 65521
    assert NDQSG((3, 1), 512).locate_stages() == (8, 32)
    with pytest.raises(TypeError, match="locate"):
        NDQSG(locate=1)
    old = {"nesting": {"w": True}, "streak": {"w": 0}, "reversals": {"w": 1}}  # the format before locate
    policy = NestingPolicy()
    policy.load_state_dict(old)
    assert policy.state_dict() == {**old, "evidence": {}, "ratios": {}}  # checkpoints from before these rules load
    assert NDQSG().config()["locate"] is None



@pytest.mark.parametrize("rho_levels", [(3, 1), (8, 1)])
@pytest.mark.parametrize("noise", [0.05, 0.2, 0.5, 1.0])
def test_adaptive_probe_prices_nesting_at_what_the_decoder_hands_over(noise, rho_levels):
    """Adaptive nesting's probe (the wrong coordinates of each failed bucket counted on the true
    indices; a stage of 2t syndromes corrects a bucket iff at most t are wrong) prices every
    candidate ratio at exactly the bytes the nested sender hands over when it really nests at that
    ratio (payload, syndromes and resent buckets), for P = 2 (the nested sender's side information
    is the other sender's exact decode either way)."""
    n, ranks = 4096, 2
    gen = torch.Generator().manual_seed(int(noise * 100) + rho_levels[0])
    common = torch.randn(n, generator=gen)
    gs = [common + noise * torch.randn(n, generator=gen) for _ in range(ranks)]
    ctx = ctx_for(n, ranks)
    probe_codec = NDQSG(rho_levels, 256)
    fine = probe_codec.fine
    side = fine.decode(fine.encode(gs[0], ctx.sender(0)), ctx.sender(0))
    key = fine.keyed(ctx.sender(1).key, ranks)
    enc1 = fine.encode(gs[1], ctx.sender(1))
    k = ops.unpack_symbols(enc1.fields["symbols"], fine.symbols, n).to(torch.int32) - fine.levels
    located = False
    for rho in probe_codec.candidate_ratios():
        met = SenderPass(k, enc1.fields["delta"], side, Segments((n,), (key,), probe_codec.bucket_size))
        (priced,) = NestingCost(probe_codec).probe(met, rho, [True])
        state = CodecState()
        state.nesting.nesting["w"], state.nesting.ratios["w"] = True, rho
        mean, ref, _, log, encs = emulate(probe_codec, gs, ctx_for(n, ranks, state=state))
        assert torch.equal(mean, ref)
        replies = sum(reply[1].numel() for _, reply in log)
        assert priced == encs[1].nbytes() + replies, (rho, priced, encs[1].nbytes(), replies)
        located |= replies > 0
    assert located or noise < 0.1  # beyond the smallest noise some ratio needed recovery replies
