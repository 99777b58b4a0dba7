"""CPU kernels against plain NumPy/torch references written for the test, plus the statistical
and exactness properties the codecs rely on (bounds derived from the maths, stated per test)."""

import math

import numpy as np
import pytest
import torch

from hvdquant.kernels import DitherKey, ops

KEY = DitherKey(seed=0xC0FFEE, step=3, tensor_id=77, sender=2)
SIZES = [0, 1, 5, 130, 1031]


def randn(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def per_coord(scales: torch.Tensor, bucket: int, n: int) -> np.ndarray:
    return scales.numpy().repeat(bucket)[:n]


def ref_round_half_up(t: np.ndarray) -> np.ndarray:
    f = np.floor(t)
    return (f + ((t - f) >= np.float32(0.5))).astype(np.int64)


@pytest.mark.parametrize("n", SIZES)
def test_scales(n):
    g = randn(n, 1)
    g32 = g.numpy()
    absmax = ops.bucket_absmax(g, 64).numpy()
    l2 = ops.bucket_l2(g, 64).numpy()
    nb = (n + 63) // 64
    assert absmax.shape == l2.shape == (nb,)
    for b in range(nb):
        chunk = g32[64 * b:64 * (b + 1)]
        assert absmax[b] == np.abs(chunk).max()
        assert l2[b] == pytest.approx(np.sqrt((chunk.astype(np.float64) ** 2).sum()), rel=1e-7)


def test_zero_and_nan_buckets():
    g = torch.tensor([0.0, 0.0, 1.0, float("nan"), -3.0, 0.0])
    assert ops.bucket_absmax(g, 2).tolist() == [0.0, float("inf"), 3.0]
    assert ops.bucket_l2(g, 2)[0] == 0.0


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("levels", [1, 3, 127])
def test_dqsg_encode_matches_reference(n, levels):
    g = randn(n, 2)
    delta = ops.bucket_absmax(g, 32) / levels
    k = ops.dqsg_encode(g, delta, 32, levels, KEY).numpy()
    u = ops.dither(n, KEY).numpy()
    d = per_coord(delta, 32, n)
    ref = np.clip(ref_round_half_up(g.numpy() / d + u), -levels, levels)
    assert np.array_equal(k, ref)
    symbols = ops.dqsg_encode(g, delta, 32, levels, KEY, symbols=True)
    assert symbols.dtype == torch.uint8 and np.array_equal(symbols.numpy(), ref + levels)
    ghat = ops.dqsg_decode(torch.from_numpy(k.astype(np.int32)), delta, 32, KEY).numpy()
    assert np.array_equal(ghat, np.float32(1.0) * (d * (k.astype(np.float32) - u)))


@pytest.mark.parametrize("levels", [1, 2, 3, 7, 127])
@pytest.mark.parametrize("bucket", [7, 512, 70_000, 1 << 20])  # ranges of whole buckets; buckets too long for that
@pytest.mark.parametrize("n", [0, 1, 13, 4097, 150_001])
@pytest.mark.parametrize("key", [KEY, KEY.stratified(4), KEY.stratified(3)], ids=["independent", "strat4", "strat3"])
def test_fused_payload_passes_equal_the_separate_passes(levels, bucket, n, key):
    """dqsg_encode_packed = scales, dqsg_encode(symbols=True), pack_symbols and the histogram, run one
    after the other; dqsg_decode_packed = unpack_symbols then dqsg_decode(offset=s): bit for bit."""
    g = torch.randn(n, generator=torch.Generator().manual_seed(n + levels))
    g[: min(n, 9)] = 0.0  # an all-zero start of the first bucket (Δ = 0 where the bucket is short)
    delta = ops.bucket_absmax(g, bucket) / levels
    sym = ops.dqsg_encode(g, delta, bucket, levels, key, symbols=True)
    alphabet = 2 * levels + 1
    d2, packed, counts = ops.dqsg_encode_packed(g, bucket, levels, key)
    assert torch.equal(d2, delta)
    assert torch.equal(packed, ops.pack_symbols(sym, alphabet))
    assert torch.equal(counts, torch.bincount(sym.long(), minlength=alphabet))
    want = ops.dqsg_decode(ops.unpack_symbols(packed, alphabet, n), delta, bucket, key, offset=levels)
    got = ops.dqsg_decode_packed(packed, d2, bucket, levels, key, n)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
@pytest.mark.parametrize("levels", [1, 3, 20])
@pytest.mark.parametrize("bucket", [7, 512, 1 << 20])
@pytest.mark.parametrize("n", [0, 1, 13, 4097, 100_003])
@pytest.mark.parametrize("stratified", [False, True])
def test_fused_summable_passes_equal_the_separate_passes(ranks, levels, bucket, n, stratified):
    """dqsg_encode_fields = dqsg_encode then pack_sum_fields (offset s), with the symbols' histogram;
    dqsg_decode_fields of the reduced words = unpack_sum_fields (offset P·s) then dqsg_decode over all
    P senders: bit for bit, here after an Average (words × 1/P ... any factor: 0.25)."""
    from hvdquant.transports.summable import SumFieldLayout

    layout = SumFieldLayout.for_levels(levels, ranks)
    keys = [DitherKey(5, 2, 9, p, ranks=ranks if stratified else 0) for p in range(ranks)]
    gs = [torch.randn(n, generator=torch.Generator().manual_seed(p + n)) for p in range(ranks)]
    delta = torch.stack([ops.bucket_absmax(g, bucket) for g in gs]).amax(0) / levels
    total = torch.zeros(layout.field_words(n), dtype=torch.float64)
    for g, key in zip(gs, keys):
        k = ops.dqsg_encode(g, delta, bucket, levels, key)
        words, counts = ops.dqsg_encode_fields(g, delta, bucket, levels, key, layout.radix, layout.per_word)
        assert torch.equal(words, ops.pack_sum_fields(k, levels, layout.radix, layout.per_word))
        assert torch.equal(counts, torch.bincount((k + levels).view(torch.uint8).long(), minlength=2 * levels + 1))
        total += words
    reduced = total * 0.25
    ksum = ops.unpack_sum_fields(reduced, n, levels * ranks, layout.radix, layout.per_word, 0.25)
    want = ops.dqsg_decode(ksum, delta, bucket, keys[0], senders=ranks)
    got = ops.dqsg_decode_fields(reduced, n, 0.25, layout.radix, layout.per_word, levels * ranks, delta, bucket,
                                 keys[0], senders=ranks)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_fused_encode_reports_non_finite_scales():
    g = torch.ones(3000)
    g[2500] = float("nan")
    g[10] = float("-inf")
    delta, _, _ = ops.dqsg_encode_packed(g, 512, 1, KEY)
    assert torch.isinf(delta[0]) and torch.isinf(delta[4]) and bool(torch.isfinite(delta[[1, 2, 3, 5]]).all())


@pytest.mark.parametrize("rho", [2, 3, 4, 5, 8, 9])
def test_nested_encode_is_coset_of_dqsg_code(rho):
    g = randn(1031, 5)
    delta = ops.bucket_absmax(g, 64) / 3
    k = ops.dqsg_encode(g, delta, 64, 3, KEY).numpy().astype(np.int64)
    sym = ops.nested_encode(g, delta, 64, 3, rho, KEY).numpy()
    assert np.array_equal(sym, (k + rho // 2) % rho)
    assert sym.max() < rho


@pytest.mark.parametrize("rho", [3, 4, 7])
def test_nested_decode_exact_under_condition_and_bounded_always(rho):
    """docs/ALGORITHMS.md §2: ĝ equals the DQSG(s₁) reconstruction g + eΔ exactly iff
    |g − y + eΔ| < ρΔ/2, and always |ĝ − y| ≤ ρΔ/2. Side information y = g + noise with noise
    scale chosen so both cases occur."""
    n, levels, bucket = 4096, 3, 128
    g = randn(n, 6)
    delta = ops.bucket_absmax(g, bucket) / levels
    y = g + randn(n, 7, scale=float(delta.mean()) * rho / 3)
    sym = ops.nested_encode(g, delta, bucket, levels, rho, KEY)
    kout = torch.empty(n, dtype=torch.int32)
    ghat = ops.nested_decode(sym, delta, bucket, rho, y, KEY, kout=kout)
    k = ops.dqsg_encode(g, delta, bucket, levels, KEY)
    dqsg = ops.dqsg_decode(k.int(), delta, bucket, KEY).numpy()
    d = per_coord(delta, bucket, n).astype(np.float64)
    cond = np.abs(g.double().numpy() - y.double().numpy() + (dqsg - g.numpy()).astype(np.float64)) < rho * d / 2
    margin = 1e-4 * d  # stay clear of the boundary, where float32 rounding decides
    sure = np.abs(np.abs(g.double().numpy() - y.double().numpy() + (dqsg - g.numpy())) - rho * d / 2) > margin
    assert np.array_equal(ghat.numpy()[cond & sure], dqsg[cond & sure])
    assert np.all(ghat.numpy()[~cond & sure] != dqsg[~cond & sure])
    assert cond.sum() > n // 2 and (~cond).sum() > 10  # both regimes exercised
    assert np.all(np.abs(ghat.double().numpy() - y.double().numpy()) <= rho * d / 2 * (1 + 1e-5) + 1e-6)
    # kout holds the resolved index: the DQSG index where decoding is exact, off by a multiple of ρ elsewhere.
    ki, ko = k.numpy().astype(np.int64), kout.numpy().astype(np.int64)
    assert np.array_equal(ko[cond & sure], ki[cond & sure])
    assert np.all((ko - ki) % rho == 0) and np.all(ko[~cond & sure] != ki[~cond & sure])


def check_weight(j: int) -> int:
    """Reference for the checksum's position weight: the lowbias32 hash of j, made odd."""
    x = j & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x | 1


def position_weights(d: int) -> np.ndarray:
    """The kernel's checksum weights w_0 … w_{d−1}, read off d buckets holding one 1 each."""
    unit = torch.eye(d, dtype=torch.int32).reshape(-1)
    return ops.bucket_checksum(unit, d).numpy()


@pytest.mark.parametrize("n", [0, 1, 130, 1031])
def test_bucket_checksum_matches_reference_and_is_linear(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randint(-7, 8, (n,), generator=gen, dtype=torch.int32)
    b = torch.randint(-7, 8, (n,), generator=gen, dtype=torch.int32)
    ca, cb, cab = (ops.bucket_checksum(t, 64) for t in (a, b, a + b))
    for i in range((n + 63) // 64):
        chunk = a[64 * i:64 * (i + 1)].tolist()
        assert int(ca[i]) == sum(check_weight(j) * k for j, k in enumerate(chunk)) % 2**32
    assert torch.equal((ca + cb) % 2**32, cab)
    assert torch.equal(ops.bucket_checksum(a.to(torch.int8), 64), ca)
    if n:
        bad = a.clone()
        bad[n // 2] += 3  # one coordinate off by ρ = 3
        assert not torch.equal(ops.bucket_checksum(bad, 64), ca)


def test_bucket_checksum_catches_every_pair_of_wrong_indices():
    """Two wrong indices off by m·ρ and m'·ρ (|m|, |m'| ≤ 3, ρ ≤ 32, so 2-adic valuation v ≤ 5) go
    undetected iff m·w_a + m'·w_b ≡ 0 mod 2^(32−v); with w_a·m ≡ −m'·w_b mod 2^27 checked over all
    positions of a 1024-bucket, no pair of positions collides (a single wrong index never cancels:
    every w_j is odd)."""
    w = position_weights(1024).astype(np.int64)
    assert np.all(w % 2 == 1)
    mult = np.array([-3, -2, -1, 1, 2, 3], dtype=np.int64)
    values = (w[:, None] * mult[None, :]) % (1 << 27)
    owners = np.repeat(np.arange(w.size), mult.size)
    order = np.argsort(values.reshape(-1), kind="stable")
    v, o = values.reshape(-1)[order], owners[order]
    same = v[1:] == v[:-1]
    assert not np.any(same & (o[1:] != o[:-1]))


def test_bucket_checksum_catches_patterns_arithmetic_weights_miss():
    """Four indices off by +ρ, +ρ, −ρ, −ρ at positions a + b = c + d cancel in Σ_j (2j+1)·e_j (the
    old arithmetic weights) but not in the hashed weights; random failure patterns (1–40% of a
    512-bucket off by ±ρ or ±2ρ, 12 000 buckets per ρ) all fail the check. Bound: for weights acting
    as independent uniform odd numbers a given pattern passes with probability ≤ 2^−(31−v), v = the
    2-adic valuation of ρ (≤ 4 here), so all 36 000 patterns are caught with probability > 0.99."""
    d = 512
    truth = torch.zeros(d, dtype=torch.int32)
    wrong = truth.clone()
    for pos, e in ((10, 3), (20, 3), (12, -3), (18, -3)):
        wrong[pos] += e
    assert sum((2 * j + 1) * int(e) for j, e in enumerate(wrong)) == 0  # the weakness being fixed
    assert not torch.equal(ops.bucket_checksum(wrong, d), ops.bucket_checksum(truth, d))
    gen = torch.Generator().manual_seed(7)
    for rho in (3, 4, 16):
        frac = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.2, 0.4]).repeat_interleave(2000)[:, None]
        hit = torch.rand(frac.shape[0], d, generator=gen) < frac
        size = torch.randint(1, 3, hit.shape, generator=gen) * (2 * torch.randint(0, 2, hit.shape, generator=gen) - 1)
        e = (hit * size * rho).to(torch.int32)
        e[~hit.any(1), 0] = rho  # every bucket has failed somewhere
        base = torch.randint(-8, 9, e.shape, generator=gen, dtype=torch.int32)
        good, bad = (ops.bucket_checksum(t.reshape(-1).contiguous(), d) for t in (base, base + e))
        assert bool((good != bad).all()), f"ρ = {rho}: {(good == bad).sum().item()} failed buckets undetected"


def test_nested_decode_of_a_modular_sum():
    """Σ_p symbols mod ρ decodes to Σ_p ĝ_p (common Δ) when the side information is the true sum."""
    P, n, levels, rho, bucket = 4, 777, 2, 9, 64
    gs = [randn(n, 20 + p) for p in range(P)]
    delta = torch.stack([ops.bucket_absmax(g, bucket) for g in gs]).max(0).values / levels
    keys = [KEY.for_sender(p) for p in range(P)]
    total = torch.zeros(n, dtype=torch.int64)
    for g, k in zip(gs, keys):
        total += ops.nested_encode(g, delta, bucket, levels, rho, k).long()
    symbols = (total % rho).to(torch.uint8)
    truth = sum(gs)
    kout = torch.empty(n, dtype=torch.int32)
    ghat = ops.nested_decode(symbols, delta, bucket, rho, truth, KEY.for_sender(0), senders=P, kout=kout)
    ksum = sum(ops.dqsg_encode(g, delta, bucket, levels, k).int() for g, k in zip(gs, keys))
    assert torch.equal(kout, ksum.int())
    expected = ops.dqsg_decode(ksum.int(), delta, bucket, KEY.for_sender(0), senders=P)
    # |Σg − S| = 0 < (ρ − P)Δ/2: the sufficient condition of docs/ALGORITHMS.md §3 holds everywhere.
    assert torch.equal(ghat, expected)


def test_nested_decode_wrong_side_information_fails_checksum():
    """Side information off by 2ρΔ: every resolved index is off by a nonzero multiple of ρ, and the
    bucket checksum (what the callers compare) detects it in every bucket."""
    n, levels, rho, bucket = 300, 1, 3, 100
    g = randn(n, 8)
    delta = ops.bucket_absmax(g, bucket) / levels
    y = g + 2 * rho * per_coord(delta, bucket, n).max()
    sym = ops.nested_encode(g, delta, bucket, levels, rho, KEY)
    kout = torch.empty(n, dtype=torch.int32)
    ops.nested_decode(sym, delta, bucket, rho, y.float(), KEY, kout=kout)
    k = ops.dqsg_encode(g, delta, bucket, levels, KEY).int()
    assert bool(((kout - k) % rho == 0).all()) and bool((kout != k).all())
    assert bool((ops.bucket_checksum(kout, bucket) != ops.bucket_checksum(k, bucket)).all())


@pytest.mark.parametrize("norm", ["l2", "max"])
def test_qsgd_unbiased_and_variance_bound(norm):
    """Seed 001: E[Q(v)] = v and E‖Q(v)‖² ≤ (1 + min(d/s², √d/s))‖v‖² per bucket of d.
    T = 300 independent streams; per coordinate the mean's std is ≤ ‖v_b‖/(s·√T)·½, bound 5σ."""
    d, s, T = 64, 2, 300
    v = randn(4 * d, 9)
    scale = ops.bucket_l2(v, d) if norm == "l2" else ops.bucket_absmax(v, d)
    acc = torch.zeros(4 * d, dtype=torch.float64)
    second = torch.zeros(4, dtype=torch.float64)
    for t in range(T):
        key = DitherKey(1, t, 2, 0)
        codes = ops.qsgd_encode(v, scale, d, s, key)
        assert int(codes.abs().max()) <= s
        q = ops.scale_decode(codes, scale, d, s).double()
        acc += q
        second += (q**2).reshape(4, d).sum(1)
    sd = per_coord(scale, d, 4 * d).astype(np.float64) / s / 2 / math.sqrt(T)
    assert np.all(np.abs((acc / T).numpy() - v.double().numpy()) < 5 * sd)
    if norm == "l2":
        norms2 = (v.double() ** 2).reshape(4, d).sum(1)
        bound = (1 + min(d / s**2, math.sqrt(d) / s)) * norms2
        assert bool((second / T <= bound).all())


def test_qsgd_max_norm_hits_top_level_exactly():
    v = torch.tensor([1.0, -1.0, 0.0, 0.5])
    codes = ops.qsgd_encode(v, ops.bucket_absmax(v, 4), 4, 3, KEY)
    assert codes[:3].tolist() == [3, -3, 0]


@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 3), (64, 10)])
def test_onebit_matches_reference(rows, cols):
    g = randn(rows * cols, 10)
    pos, neg = ops.onebit_column_means(g, cols)
    m = g.numpy().reshape(rows, cols)
    for c in range(cols):
        col = m[:, c]
        assert pos[c] == pytest.approx(col[col >= 0].mean() if (col >= 0).any() else 0.0, rel=1e-6)
        assert neg[c] == pytest.approx(col[col < 0].mean() if (col < 0).any() else 0.0, rel=1e-6)
    bits = ops.onebit_encode(g)
    assert np.array_equal(bits.numpy(), (g.numpy() >= 0).astype(np.uint8))
    out = ops.onebit_decode(bits, cols, pos, neg).numpy().reshape(rows, cols)
    assert np.array_equal(out, np.where(m >= 0, pos.numpy()[None, :], neg.numpy()[None, :]))


def ref_bitpack(sym: np.ndarray, b: int) -> np.ndarray:
    acc = sum(int(s) << (b * i) for i, s in enumerate(sym))
    return np.frombuffer(acc.to_bytes((len(sym) * b + 7) // 8 or 0, "little"), dtype=np.uint8)


@pytest.mark.parametrize("b", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_bitpack_roundtrip_and_layout(b, n):
    sym = torch.randint(0, 1 << b, (n,), generator=torch.Generator().manual_seed(b * n), dtype=torch.uint8)
    packed = ops.bitpack(sym, b)
    assert packed.numel() == (n * b + 7) // 8  # no padding beyond the last byte
    assert np.array_equal(packed.numpy(), ref_bitpack(sym.numpy(), b))
    assert torch.equal(ops.bitunpack(packed, b, n), sym)
    if b == 1:
        assert np.array_equal(packed.numpy(), np.packbits(sym.numpy(), bitorder="little"))


@pytest.mark.parametrize("radix,per_byte", [(3, 5), (5, 3), (6, 3), (7, 2), (9, 2), (15, 2)])
@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 1003])
def test_radixpack_roundtrip_and_layout(radix, per_byte, n):
    assert ops.radix_per_byte(radix) == per_byte
    sym = torch.randint(0, radix, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = ops.radixpack(sym, radix)
    assert packed.numel() == -(-n // per_byte)
    s = sym.numpy().astype(np.int64)
    ref = [sum(int(x) * radix**j for j, x in enumerate(s[i:i + per_byte])) for i in range(0, n, per_byte)]
    assert packed.tolist() == ref
    assert torch.equal(ops.radixunpack(packed, radix, n), sym)


@pytest.mark.parametrize("rho", [2, 3, 4, 5, 7, 8, 9, 15, 16])
@pytest.mark.parametrize("n", [1, 13, 1000])
def test_modadd_cosets(rho, n):
    gen = torch.Generator().manual_seed(rho * n)
    x = torch.randint(0, rho, (n,), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, rho, (n,), generator=gen, dtype=torch.uint8)
    summed = ops.modadd_cosets(ops.pack_cosets(x, rho), ops.pack_cosets(y, rho), rho)
    assert torch.equal(ops.unpack_cosets(summed, rho, n), ((x.int() + y.int()) % rho).to(torch.uint8))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.bucket_absmax(torch.ones(4, dtype=torch.float64), 2), TypeError, "g must have dtype"),
    (lambda: ops.bucket_absmax(torch.ones(4, 4)[:, 0], 2), ValueError, "contiguous 1-D"),
    (lambda: ops.bucket_absmax(torch.ones(4), 0), ValueError, "bucket=0"),
    (lambda: ops.dqsg_encode(torch.ones(4), torch.ones(2), 2, 0, KEY), ValueError, "levels=0"),
    (lambda: ops.dqsg_encode(torch.ones(4), torch.ones(3), 2, 1, KEY), ValueError, "delta has 3"),
    (lambda: ops.nested_encode(torch.ones(4), torch.ones(1), 4, 3, 1, KEY), ValueError, "nesting_ratio=1"),
    (lambda: ops.nested_encode(torch.ones(4), torch.ones(1), 4, 3, 2.0, KEY), TypeError, "nesting_ratio"),
    (lambda: ops.bitpack(torch.zeros(3, dtype=torch.uint8), 9), ValueError, "nbits=9"),
    (lambda: ops.bitunpack(torch.zeros(3, dtype=torch.uint8), 2, 5), ValueError, "need 2"),
    (lambda: ops.qsgd_encode(torch.ones(4), torch.ones(1), 4, 128, KEY), ValueError, "levels=128"),
    (lambda: ops.pack_sum_fields(torch.zeros(3, dtype=torch.int8), 1, 5, 22), ValueError, r"5\*\*22 > 2\^50"),
    (lambda: ops.pack_sum_fields(torch.zeros(3, dtype=torch.int8), 1, 1, 2), ValueError, "radix"),
    (lambda: ops.dqsg_encode_fields(torch.ones(4), torch.ones(1), 4, 3, KEY, 6, 4), ValueError, "radix=6"),
])
def test_bad_arguments_are_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
