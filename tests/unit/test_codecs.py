"""Codecs in one process: payload round trips, measured sizes against the formulas, NDQSG's
side-information decoding and recovery, QSGD's Elias stream, error-feedback conservation."""

import math

import pytest
import torch

from hvdquant import DQSG, NDQSG, QSGD, ErrorFeedback, OneBitSGD, TopK
from hvdquant.codecs import CodecState, TensorContext, empirical_entropy
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.kernels import DitherKey, elias, ops


def ctx_for(shape, sender=0, ranks=1, name="w", step=0, state=None):
    return TensorContext(name, tuple(shape), DitherKey(77, step, 5, sender), ranks, state)


FIXED = {"dqsg1": lambda: DQSG(1, 512), "dqsg3": lambda: DQSG(3, 100), "qsgd-max4": lambda: QSGD(4, 64, "max", "fixed"),
         "qsgd-l2-1": lambda: QSGD(1, 512, "l2", "fixed"), "onebit": OneBitSGD,
         "topk": lambda: TopK(0.1), "topk-ef": lambda: TopK.with_feedback(0.05)}


@pytest.mark.parametrize("make", FIXED.values(), ids=FIXED.keys())
@pytest.mark.parametrize("shape", [(1,), (3, 5), (300, 7), (1031,)])
def test_payload_roundtrip_and_size_equals_formula(make, shape):
    codec = make()
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ctx = ctx_for(shape, state=CodecState())
    enc = codec.encode(g, ctx)
    buf = enc.to_bytes()
    n = g.numel()
    assert buf.numel() * 8 / n == pytest.approx(codec.formula_bits(n, ctx), rel=1e-12)
    back = codec.from_bytes(buf, n, ctx)
    assert torch.equal(codec.decode(back, ctx), codec.decode(enc, ctx))
    with pytest.raises(ValueError):
        codec.from_bytes(buf[:-1], n, ctx)


@pytest.mark.parametrize("dither", ["independent", "stratified"])
def test_dqsg_payload_decodes_to_the_kernel_reconstruction(dither):
    g = torch.randn(2000)
    codec, ctx = DQSG(3, 128, dither), ctx_for((2000,), 1, 3)
    ghat = codec.decode(codec.encode(g, ctx), ctx)
    delta = codec.step_size(codec.bucket_absmax(g))
    key = codec.keyed(ctx.key, ctx.ranks)
    assert key.ranks == (3 if dither == "stratified" else 0)
    assert torch.equal(ghat, codec.decode_sum(codec.quantize(g, delta, key), delta, key))


def test_qsgd_elias_roundtrip_and_seed001_bound():
    """Seed 001: for one bucket of n with s levels, expected bits ≤ F + (3 + 1.5·log2(2(s²+n)/(s²+√n)))(s²+√n)
    (F = 32 for the norm). The stream here also carries ω(nnz+1): it must still be within the bound."""
    n = 1 << 14
    codec = QSGD(levels=1, bucket_size=n, norm="l2", coding="elias")
    ctx = ctx_for((n,))
    total = 0
    for step in range(5):
        g = torch.randn(n, generator=torch.Generator().manual_seed(step))
        c = ctx_for((n,), step=step)
        enc = codec.encode(g, c)
        total += enc.to_bytes().numel() * 8
        codes = elias.decode(enc.fields["levels"], n)
        assert torch.equal(codes + 1, enc.symbols.to(torch.int8))
    assert total / 5 / n <= codec.formula_bits(n, ctx)


def test_elias_rejects_corrupt_streams():
    codes = torch.tensor([0, 2, 0, -1], dtype=torch.int8)
    stream, _ = elias.encode(codes)
    assert torch.equal(elias.decode(stream, 4), codes)
    with pytest.raises(ValueError, match="corrupt"):
        elias.decode(stream, 1)


def test_qsgd_unbiased_through_payloads():
    """Mean over T = 400 steps of decoded QSGD payloads → g: per-coordinate std ≤ ‖v‖/(2s√T), 5σ."""
    codec = QSGD(levels=2, bucket_size=64, norm="l2", coding="elias")
    g = torch.randn(64, generator=torch.Generator().manual_seed(3))
    T = 400
    acc = torch.zeros(64, dtype=torch.float64)
    for t in range(T):
        c = ctx_for((64,), step=t)
        acc += codec.decode(codec.from_bytes(codec.encode(g, c).to_bytes(), 64, c), c).double()
    sd = float(g.norm()) / (2 * 2 * math.sqrt(T))
    assert float((acc / T - g.double()).abs().max()) < 5 * sd


def emulate_allgather(codec, gs, ranks, name="w"):
    """What the allgather transport does, in one process (recover callback included)."""
    base = ctx_for(gs[0].shape, ranks=ranks, name=name, state=CodecState())
    encs = [codec.encode(gs[p], base.sender(p)) for p in range(ranks)]
    payloads = [codec.from_bytes(e.to_bytes(), e.n, base.sender(p)) for p, e in enumerate(encs)]

    def recover(failed):
        return {p: codec.recovery_payload(encs[p], base.sender(p), b) for p, b in failed.items()}

    return codec.aggregate(payloads, base, recover)


@pytest.mark.parametrize("dither", ["independent", "stratified"])
@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
@pytest.mark.parametrize("noise", [0.01, 3.0])
def test_ndqsg_equals_dqsg_s1_bit_for_bit(ranks, noise, dither):
    """docs/ALGORITHMS.md §2: a successful nested decode reproduces DQSG(s₁)'s reconstruction exactly.
    With correlated gradients (noise 0.01) decoding succeeds; with independent ones (noise 3) buckets
    fail, are detected by checksum and recovered — the mean must equal DQSG(s₁)'s either way. Under
    the stratified dither each nested rank's u_p is regenerated on its own (docs/ALGORITHMS.md §9)."""
    n = 3000
    common = torch.randn(n, generator=torch.Generator().manual_seed(0))
    gs = [common + noise * torch.randn(n, generator=torch.Generator().manual_seed(p + 1)) for p in range(ranks)]
    nd = NDQSG(levels=(3, 1), bucket_size=256, dqsg_fraction=0.5, dither=dither, adaptive=False)
    mean, stats = emulate_allgather(nd, gs, ranks)
    fine = nd.fine
    ref = sum(fine.decode(fine.encode(g, ctx_for((n,), p, ranks)), ctx_for((n,), p, ranks)) for p, g in enumerate(gs))
    assert torch.equal(mean, ref / ranks)
    if noise < 0.1:
        assert stats.failed_buckets == 0
    elif ranks > 1:
        assert stats.failed_buckets > 0 and stats.recovery_rounds >= 1 and stats.failed_coordinates > 0


@pytest.mark.parametrize("locate", [None, False])
@pytest.mark.parametrize("noise,expect_nesting", [(0.01, True), (3.0, False)])
def test_adaptive_ndqsg_nests_only_where_it_pays(noise, expect_nesting, locate):
    """Adaptive nesting on the allgather path, P = 4 ranks each with its own codec object: every
    rank decides alike from what it decoded (no collective). Steps 0 and 1 send DQSG(s₁) everywhere
    and probe (CONFIRM_STEPS = 2); correlated gradients (noise 0.01, correlation ≈ 0.9999) then nest and send at most
    ADAPTIVE_MARGIN (0.95) × DQSG(s₁)'s bytes for the nested senders, recovery (syndromes and
    resent buckets) included; independent ones (noise 3 around a fixed common part, correlation
    0.1) never nest, so they send exactly DQSG(s₁)'s bytes. The mean always equals DQSG(s₁)'s bit
    for bit. With and without locating (``locate``)."""
    ranks, n, steps = 4, 4096, 5
    codecs = [NDQSG((3, 1), 256, adaptive=True, locate=locate) for _ in range(ranks)]
    states = [CodecState() for _ in range(ranks)]  # each rank's own
    fine = codecs[0].fine
    gen = torch.Generator().manual_seed(5)
    common = torch.randn(n, generator=gen)
    for step in range(steps):
        if expect_nesting:  # a drift of the common part as large as the noise raises the correlation
            common = common + noise * torch.randn(n, generator=gen)
        gs = [common + noise * torch.randn(n, generator=gen) for _ in range(ranks)]
        encs = [codecs[p].encode(gs[p], ctx_for((n,), p, ranks, step=step, state=states[p])) for p in range(ranks)]
        for rank in range(ranks):  # every rank aggregates every payload, as allgather does
            codec = codecs[rank]
            base = ctx_for((n,), ranks=ranks, step=step, state=states[rank])
            payloads = [codec.from_bytes(e.to_bytes(), n, base.sender(p)) for p, e in enumerate(encs)]
            recovered = [0]

            def recover(failed, codec=codec, encs=encs, base=base, recovered=recovered):
                out = {p: codec.recovery_payload(encs[p], base.sender(p), b) for p, b in failed.items()}
                recovered[0] += sum(v.numel() for v in out.values())
                return out

            mean, _ = codec.aggregate(payloads, base, recover)
            ref = sum(fine.decode(fine.encode(g, base.sender(p)), base.sender(p)) for p, g in enumerate(gs))
            assert torch.equal(mean, ref / ranks)
        assert all(s.nesting == states[0].nesting for s in states)  # the same decisions on every rank
        nested_bytes = sum(e.nbytes() for e in encs[2:]) + recovered[0]
        plain_bytes = sum(fine.encode(g, base.sender(p)).nbytes() for p, g in enumerate(gs[2:], 2))
        if step < NestingPolicy.CONFIRM_STEPS or not expect_nesting:
            assert nested_bytes == plain_bytes  # nesting off: exactly DQSG(s₁)
        else:
            assert nested_bytes <= NestingPolicy.ADAPTIVE_MARGIN * plain_bytes
        assert states[0].nesting.is_on("w") == (expect_nesting and step + 1 >= NestingPolicy.CONFIRM_STEPS)
    restored = CodecState()
    restored.load_state_dict(states[0].state_dict())
    assert restored.nesting == states[0].nesting


def test_adaptive_rule_switches_on_after_confirmation_then_backs_off():
    """NestingPolicy.observe: off → on after CONFIRM_STEPS (2) steps in a row that would have paid;
    each switch-off doubles the good steps needed to switch on again (2, 4, 8, …); the state
    round-trips through state_dict."""
    assert NestingPolicy.CONFIRM_STEPS == 2
    nd = NestingPolicy()
    outcomes = [True, False, True, True, False] + [True] * 4 + [False] + [True] * 8
    seen = []
    for pays in outcomes:
        nd.observe("w", pays)
        seen.append(nd.is_on("w"))
    assert seen == [False, False, False, True, False] + [False] * 3 + [True, False] + [False] * 7 + [True]
    twin = NestingPolicy()
    twin.load_state_dict(nd.state_dict())
    assert twin.state_dict() == nd.state_dict() == {"nesting": {"w": True}, "streak": {"w": 0}, "reversals": {"w": 2},
                                                    "evidence": {"w": 0}, "ratios": {}}


def test_adaptive_rule_needs_evidence_from_enough_buckets():
    """A tensor of 2 nested buckets per step switches on only after MIN_EVIDENCE_BUCKETS / 2 paying
    steps in a row (a large tensor: CONFIRM_STEPS steps); a failing step resets the evidence."""
    need = NestingPolicy.MIN_EVIDENCE_BUCKETS // 2
    small, large = NestingPolicy(), NestingPolicy()
    for _ in range(NestingPolicy.CONFIRM_STEPS):
        assert not large.is_on("w")
        large.observe("w", True, buckets=NestingPolicy.MIN_EVIDENCE_BUCKETS)
    assert large.is_on("w")
    for pays in [True] * (need - 1) + [False] + [True] * (need - 1):
        small.observe("w", pays, buckets=2)
        assert not small.is_on("w")
    small.observe("w", True, buckets=2)
    assert small.is_on("w")


def test_ndqsg_without_recovery_refuses_to_return_wrong_values():
    n, ranks = 2000, 2
    gs = [torch.randn(n, generator=torch.Generator().manual_seed(p)) * 5 for p in range(ranks)]
    nd = NDQSG((3, 1), 128, adaptive=False)
    base = ctx_for((n,), ranks=ranks)
    payloads = [nd.encode(g, base.sender(p)) for p, g in enumerate(gs)]
    with pytest.raises(RuntimeError, match="failed"):
        nd.aggregate(payloads, base, recover=None)


def test_ndqsg_rates():
    """Rank 0 sends DQSG(3) (3 bits + 32/d), rank 1 coset indices (base-3: 1.6 bits + 64/d)."""
    nd = NDQSG((3, 1), 512, 0.5, adaptive=False)
    ctx = ctx_for((51200,), ranks=2)
    assert nd.formula_bits(51200, ctx.sender(0)) == pytest.approx(3 + 32 / 512)
    assert nd.formula_bits(51200, ctx.sender(1)) == pytest.approx(1.6 + 64 / 512)
    assert nd.dqsg_senders(2) == 1 and nd.dqsg_senders(8) == 4 and NDQSG((3, 1), 8, 0.0).dqsg_senders(4) == 1


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"levels": (3, 2)}, ValueError, "multiple of s2"),
    ({"levels": 3}, TypeError, "tuple"),
    ({"levels": (1, 1)}, ValueError, "s1"),
    ({"dqsg_fraction": 1.5}, ValueError, "dqsg_fraction"),
    ({"bucket_size": 0}, ValueError, "bucket_size"),
])
def test_ndqsg_bad_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NDQSG(**kwargs)


@pytest.mark.parametrize("kwargs,match", [({"norm": "l1"}, "norm"), ({"coding": "huffman"}, "coding"),
                                          ({"levels": 0}, "levels")])
def test_qsgd_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSGD(**kwargs)


@pytest.mark.parametrize("inner", [DQSG(1, 64), QSGD(1, 64, "l2", "fixed"), None], ids=["dqsg", "qsgd", "onebit"])
def test_error_feedback_conservation_and_checkpoint(inner):
    """input + old residual == decoded + new residual (float64), step after step; and the residuals
    survive state_dict/load_state_dict."""
    codec = OneBitSGD() if inner is None else ErrorFeedback(inner)
    shape, state = (20, 30), CodecState()
    for t in range(4):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(t))
        ctx = ctx_for(shape, step=t, state=state)
        old = state.residuals.get("w", torch.zeros(600, dtype=torch.float64)).clone()
        dec = codec.decode(codec.encode(g, ctx), ctx).double()
        lhs = g.reshape(-1).double() + old
        rhs = dec + state.residuals["w"]
        assert torch.allclose(lhs, rhs, rtol=0, atol=1e-12)
    twin = CodecState()
    twin.load_state_dict(state.state_dict())
    g = torch.randn(shape)
    assert torch.equal(codec.encode(g, ctx_for(shape, step=9, state=twin)).to_bytes(),
                       codec.encode(g, ctx_for(shape, step=9, state=state)).to_bytes())
    with pytest.raises(ValueError, match="TensorContext.state"):  # no silent fresh residuals
        codec.encode(g, ctx_for(shape, step=9))


def test_error_feedback_refuses_nesting_and_non_codecs():
    with pytest.raises(ValueError, match="wrap once"):
        ErrorFeedback(OneBitSGD())
    with pytest.raises(TypeError, match="hvdquant codec"):
        ErrorFeedback("dqsg")


def test_nonfinite_gradient_named():
    g = torch.ones(10)
    g[2] = float("inf")
    for codec in (DQSG(), QSGD(), OneBitSGD(), NDQSG()):
        with pytest.raises(FloatingPointError, match="layer.w"):
            codec.encode(g, ctx_for((10,), sender=1, ranks=2, name="layer.w", state=CodecState()))


def test_entropy():
    assert empirical_entropy(torch.tensor([0, 1, 0, 1], dtype=torch.uint8), 2) == pytest.approx(1.0)
    assert empirical_entropy(torch.zeros(5, dtype=torch.uint8), 3) == 0.0


def test_topk_keeps_the_largest_and_breaks_ties_by_index():
    g = torch.tensor([0.5, -3.0, 2.0, -2.0, 0.1, 3.0])
    codec, c = TopK(0.5), ctx_for((6,))
    enc = codec.encode(g, c)
    assert enc.fields["indices"].tolist() == [1, 2, 5]  # |−3| = |3| > |2| = |−2|: index 2 before 3
    assert codec.decode(enc, c).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="ratio"):
        TopK(0.0)
    bad = codec.from_bytes(enc.to_bytes(), 6, c)
    bad.fields["indices"][0] = 99
    with pytest.raises(ValueError, match="outside"):
        codec.decode(bad, c)


def test_lgc_ring_decoder_is_linear_and_its_gain_never_adds_energy():
    """The ring form sums latents, so its decoder must satisfy D(Σ α_p z_p) = Σ α_p D(z_p) (exact up
    to float32 rounding: bound 1e-5 relative), and α = argmin ‖x − α·D(z)‖ over α ≥ 0 gives
    ‖x − α·D(z)‖ ≤ ‖x‖ for every chunk (the error feedback's non-expansion)."""
    from hvdquant.codecs.lgc import LGC, ChunkAutoencoder, least_squares_gain, to_chunks

    torch.manual_seed(0)
    ring = ChunkAutoencoder(LGC(form="ring"))
    assert not any(isinstance(m, torch.nn.ReLU) for m in ring.decoder)
    assert all(m.bias is None for m in ring.decoder)
    assert any(isinstance(m, torch.nn.ReLU) for m in ChunkAutoencoder(LGC(form="ps")).decoder)
    with torch.no_grad():
        xs = [to_chunks(torch.randn(640), 64)[0] for _ in range(3)]
        zs, ds = [], []
        for x in xs:
            z = ring.encode(x)
            d = ring.decode(z)
            a = least_squares_gain(x, d)
            assert (a >= 0).all()
            assert ((x - a.unsqueeze(1) * d).norm(dim=1) <= x.norm(dim=1) * (1 + 1e-6)).all()
            zs.append(z * a.view(-1, 1, 1))
            ds.append(d * a.unsqueeze(1))
        summed = ring.decode(sum(zs))
        assert torch.allclose(summed, sum(ds), rtol=1e-5, atol=1e-6 * float(sum(ds).abs().max()))
    x = torch.ones(2, 64)
    assert least_squares_gain(x, torch.zeros(2, 64)).eq(0).all()  # D(z) = 0: nothing sent
    assert least_squares_gain(x, -x).eq(0).all()  # anti-aligned: α clamps to 0
    assert torch.allclose(least_squares_gain(x, 2 * x), torch.full((2,), 0.5))


def test_lgc_ps_innovation_never_adds_energy():
    """A non-leader's message in the parameter-server form, β per chunk and the ki largest entries of
    v − β·b: ‖v − rebuild‖ ≤ ‖v − β·b‖ ≤ ‖v‖ for any decoded leader values b (β ≥ 0 is the least-
    squares gain), β = 0 where b opposes v, β = 1 and an exact rebuild where b = v; positions
    ascending and ties to the lower index, so every rank rebuilds the same values."""
    from hvdquant.codecs.lgc import innovation, rebuild

    torch.manual_seed(0)
    v = torch.randn(200)
    for b in (torch.randn(200), -3 * v, 5 * v + torch.randn(200), torch.zeros(200)):
        beta, j, vals = innovation(v, b, 64, 30)
        assert beta.shape == (4,) and (beta >= 0).all()
        assert j.tolist() == sorted(j.tolist()) and len(set(j.tolist())) == 30
        out = rebuild(b, beta, j, vals, 64)
        assert (v - out).norm() <= v.norm() * (1 + 1e-6)
        scaled = rebuild(b, beta, j, torch.zeros(30), 64)
        assert (v - out).norm() <= (v - scaled).norm() * (1 + 1e-6)
    beta, j, vals = innovation(v, -3 * v, 64, 30)
    assert beta.eq(0).all() and torch.equal(vals, v[j])
    beta, _, vals = innovation(v, v.clone(), 64, 30)
    assert torch.allclose(beta, torch.ones(4)) and vals.abs().max() <= 1e-6
    tied = torch.tensor([1.0, -1.0, 1.0, 0.5])
    assert innovation(tied, torch.zeros(4), 32, 2)[1].tolist() == [0, 1]


def test_adaptive_ndqsg_chooses_the_cheapest_ratio():
    """Adaptive nesting picks the nesting ratio per tensor: on nearly equal gradients (correlation
    ≈ 1) ρ = 2 resolves as surely as ρ = 3 and sends 1 bit per coordinate instead of log2 3, so it
    is chosen (candidates for s₁ = 3: 2, 3, 4); after CONFIRM_STEPS probing steps the nested
    payloads carry ρ = 2 cosets, every rank decides alike, and the mean stays DQSG(s₁)'s bit for bit."""
    ranks, n = 4, 4096
    codecs = [NDQSG((3, 1), 256) for _ in range(ranks)]
    states = [CodecState() for _ in range(ranks)]
    assert codecs[0].candidate_ratios() == (2, 3, 4)
    fine = codecs[0].fine
    gen = torch.Generator().manual_seed(11)
    common = torch.randn(n, generator=gen)
    for step in range(NestingPolicy.CONFIRM_STEPS + 2):
        gs = [common + 0.001 * torch.randn(n, generator=gen) for _ in range(ranks)]
        encs = [codecs[p].encode(gs[p], ctx_for((n,), p, ranks, step=step, state=states[p])) for p in range(ranks)]
        if step >= NestingPolicy.CONFIRM_STEPS:
            assert all(e.fields["cosets"].numel() == ops.coset_bytes(n, 2) for e in encs[2:])
        for rank in range(ranks):
            codec = codecs[rank]
            base = ctx_for((n,), ranks=ranks, step=step, state=states[rank])
            payloads = [codec.from_bytes(e.to_bytes(), n, base.sender(p)) for p, e in enumerate(encs)]
            mean, stats = codec.aggregate(payloads, base)  # no recovery round needed (none is offered)
            ref = sum(fine.decode(fine.encode(g, base.sender(p)), base.sender(p)) for p, g in enumerate(gs))
            assert torch.equal(mean, ref / ranks) and stats.failed_buckets == 0
        assert all(s.nesting == states[0].nesting for s in states)
        assert codecs[0].ratio("w", states[0].nesting) == 2
        assert states[0].nesting.is_on("w") == (step + 1 >= NestingPolicy.CONFIRM_STEPS)
    assert NDQSG((3, 1), 256, adaptive=False).ratio("w") == 3  # the paper's fixed nesting keeps s1/s2
