"""Property-based tests (hypothesis) of every codec's invariants, 1,000 generated cases per codec
(derandomized, so CI sees the same cases every run). Bounds come from the maths:
- DQSG: |ĝ − g| ≤ Δ/2 per coordinate, Δ = max|g_b|/s (docs/ALGORITHMS.md §1);
- QSGD: |ĝ − g| ≤ ‖g_b‖/s (one level spacing), |k| ≤ s (Alistarh et al., QSGD);
- NDQSG: decode equals DQSG(s₁) bit for bit whenever |g − y + eΔ| < ρΔ/2 (docs/ALGORITHMS.md §2);
- 1-bit SGD: every decoded value is its column's bin mean; error feedback conserves g + r;
- every payload's size equals the codec's formula; fixed codes decode from their bytes exactly.
Cases run are counted per codec (tests/unit/property_counts.py) for launch/reliability_report.py.
"""

import dataclasses
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from property_counts import record

from hvdquant import DQSG, NDQSG, QSGD, OneBitSGD
from hvdquant.codecs import CodecState, TensorContext
from hvdquant.kernels import DitherKey

CASES = settings(max_examples=1000, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=1, max_size=150).map(lambda v: torch.tensor(v, dtype=torch.float32))
seeds = st.integers(min_value=0, max_value=(1 << 64) - 1)


def ctx(n: int, seed: int, sender: int = 0, ranks: int = 1, shape=None) -> TensorContext:
    return TensorContext("p", shape or (n,), DitherKey(seed, seed % 1000, 3, sender), ranks)


def per_coord(scales: torch.Tensor, bucket: int, n: int) -> torch.Tensor:
    return scales.double().repeat_interleave(bucket)[:n]


@CASES
@given(g=vectors, levels=st.integers(1, 20), bucket=st.integers(1, 64), seed=seeds)
def test_dqsg_properties(g, levels, bucket, seed):
    record("DQSG")
    codec, c = DQSG(levels, bucket), ctx(g.numel(), seed)
    enc = codec.encode(g, c)
    assert enc.to_bytes().numel() * 8 == round(codec.formula_bits(g.numel(), c) * g.numel())
    ghat = codec.decode(codec.from_bytes(enc.to_bytes(), g.numel(), c), c).double()
    delta = per_coord(enc.fields["delta"], bucket, g.numel())
    assert bool(((ghat - g.double()).abs() <= delta / 2 * (1 + 1e-5) + 1e-30).all())


@CASES
@given(g=vectors, levels=st.integers(1, 20), bucket=st.integers(1, 64), seed=seeds,
       norm=st.sampled_from(["l2", "max"]), coding=st.sampled_from(["fixed", "elias"]))
def test_qsgd_properties(g, levels, bucket, seed, norm, coding):
    record("QSGD")
    codec, c = QSGD(levels, bucket, norm, coding), ctx(g.numel(), seed)
    enc = codec.encode(g, c)
    if coding == "fixed":
        assert enc.to_bytes().numel() * 8 == round(codec.formula_bits(g.numel(), c) * g.numel())
    ghat = codec.decode(codec.from_bytes(enc.to_bytes(), g.numel(), c), c).double()
    spacing = per_coord(enc.fields["norm"], bucket, g.numel()) / levels
    assert bool(((ghat - g.double()).abs() <= spacing * (1 + 1e-5) + 1e-30).all())
    assert bool((enc.symbols.int() - levels).abs().max() <= levels)


@CASES
@given(g=vectors, s2=st.integers(1, 3), rho=st.integers(2, 9), bucket=st.integers(1, 64), seed=seeds,
       frac=st.floats(0.0, 0.99))
def test_ndqsg_decode_exact_under_the_condition(g, s2, rho, bucket, seed, frac):
    """Side information y = g + t·(ρ−1)Δ/2, |t| ≤ 0.99: then |g − y + eΔ| < ρΔ/2 and the nested
    decode must equal DQSG(s₁)'s reconstruction exactly."""
    record("NDQSG")
    s1 = s2 * rho
    if s1 > 127:
        return
    codec = NDQSG((s1, s2), bucket, 0.5, adaptive=False)
    c = ctx(g.numel(), seed, sender=1, ranks=2)
    enc = codec.encode(g, c)
    assert enc.to_bytes().numel() * 8 == round(codec.formula_bits(g.numel(), c) * g.numel())
    delta = per_coord(enc.fields["delta"], bucket, g.numel()).float()
    t = torch.linspace(-frac, frac, g.numel())
    side = g + t * (rho - 1) * delta / 2
    ghat = codec.decode(codec.from_bytes(enc.to_bytes(), g.numel(), c), c, side=side)
    fine = codec.fine
    assert torch.equal(ghat, fine.decode(fine.encode(g, c), c))


@CASES
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_onebit_properties(rows, cols, seed):
    record("OneBitSGD")
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * (1 + seed % 7)
    codec, state = OneBitSGD(), CodecState()
    c = dataclasses.replace(ctx(rows * cols, seed, shape=(rows, cols)), state=state)
    for _ in range(2):
        old = state.residuals.get("p", torch.zeros(rows * cols, dtype=torch.float64)).clone()
        enc = codec.encode(g, c)
        assert enc.to_bytes().numel() * 8 == round(codec.formula_bits(rows * cols, c) * rows * cols)
        dec = codec.decode(codec.from_bytes(enc.to_bytes(), rows * cols, c), c)
        pos, neg = enc.fields["pos_mean"], enc.fields["neg_mean"]
        m = dec.reshape(rows, cols)
        assert bool(((m == pos) | (m == neg)).all())
        assert torch.allclose(g.reshape(-1).double() + old, dec.double() + state.residuals["p"], rtol=0, atol=1e-9)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(g=st.lists(finite, min_size=1, max_size=32).map(torch.tensor), seed=seeds,
       scheme=st.sampled_from(["dqsg", "qsgd", "ndqsg"]))
def test_decoded_mean_is_unbiased_over_seeds(g, seed, scheme):
    """Average of T = 200 decodes with independent dithers: every coordinate within 6 standard errors
    (per-coordinate variance ≤ Δ²/12 for DQSG/NDQSG, ≤ spacing²/4 for QSGD)."""
    record(f"unbiased-{scheme}")
    n, T = g.numel(), 200
    codec = {"dqsg": DQSG(2, 16), "qsgd": QSGD(2, 16, "max", "fixed"),
             "ndqsg": NDQSG((3, 1), 16, adaptive=False)}[scheme]
    acc = torch.zeros(n, dtype=torch.float64)
    for t in range(T):
        c = TensorContext("p", (n,), DitherKey(seed, t, 1, 0), 1)  # sender 0: DQSG(3) for NDQSG
        enc = codec.encode(g, c)
        acc += codec.decode(enc, c).double()
    scale = enc.fields["delta"] if "delta" in enc.fields else enc.fields["norm"] / 2
    sd = per_coord(scale, 16, n) * (1 / math.sqrt(12) if scheme != "qsgd" else 0.5) / math.sqrt(T)
    assert bool(((acc / T - g.double()).abs() <= 6 * sd + 1e-6 * g.double().abs() + 1e-30).all())
