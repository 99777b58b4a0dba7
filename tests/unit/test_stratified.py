"""The stratified shared dither (docs/ALGORITHMS.md §9): rank p of P dithers coordinate c with
u_p = (π_c(p) + v_c)/P − ½, so each u_p is uniform and Σ_p u_p = v_c − ½ is one shared stream.

Exact checks (the strata form a permutation; the GF(2^m) map is a sharply 2-transitive family;
a pure-Python reimplementation gives the kernels' bits; the sum of all ranks' dithers is the one
stream the decoder regenerates) and statistical checks with fixed seeds whose bounds are stated
beside them.
"""

import math

import numpy as np
import pytest
import torch

from hvdquant import DQSG
from hvdquant.codecs.base import TensorContext
from hvdquant.kernels import DitherKey, arith, cpu, ops

SHARED_V = 0xFFFFFFFF


def strata(n: int, ranks: int, key: DitherKey) -> np.ndarray:
    """π_c(p) for p < ranks, read back from the dithers: (u_p + ½)·P = π + v with v ∈ (0, 1)."""
    us = np.stack([ops.dither(n, key.for_sender(p)).numpy() for p in range(ranks)])
    return np.floor((us.astype(np.float64) + 0.5) * ranks).astype(np.int64)


# ----------------------------------------------------------------------------- exact
def poly_mod(a: int, b: int) -> int:
    while a and a.bit_length() >= b.bit_length():
        a ^= b << (a.bit_length() - b.bit_length())
    return a


@pytest.mark.parametrize("m", range(1, 17))
def test_gf_moduli_are_irreducible(m):
    p = arith.GF_POLY[m]
    assert p.bit_length() == m + 1
    assert all(poly_mod(p, q) for q in range(2, 1 << (m // 2 + 1)))


def gf_mul(a: int, x: int, m: int) -> int:
    r = 0
    for i in range(m):
        if x >> i & 1:
            r ^= a << i
    for i in range(2 * m - 2, m - 1, -1):
        if r >> i & 1:
            r ^= arith.GF_POLY[m] << (i - m)
    return r


def reference_dither(i: int, p: int, key: DitherKey) -> np.float32:
    """The stratified dither of element i for rank p, from the definitions alone (pure Python)."""
    P = key.ranks
    m = max(1, (P - 1).bit_length())
    q = 1 << m

    def word(sender: int) -> int:
        words = [np.uint64(w) for w in (i // 4, key.step, key.tensor_id, sender, key.seed & 0xFFFFFFFF,
                                        key.seed >> 32)]
        return int(cpu.philox4x32(*words)[i % 4])

    w = word(arith.SHARED_PERM if m > 1 else arith.SHARED_V)  # P = 2: c is bit 0 of the v word
    a, c = 1 + ((w >> 16) * (q - 1) >> 16), w & (q - 1)
    x = gf_mul(a, p, m) ^ c
    while x >= P:
        x = gf_mul(a, x, m) ^ c
    if q != P:
        x = (x + (word(arith.SHARED_SHIFT) * P >> 32)) % P
    v = np.float32((word(arith.SHARED_V) >> 9) + 0.5) * np.float32(2.0**-23)
    return (np.float32(x) + v) / np.float32(P) - np.float32(0.5)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 6, 8])
def test_kernel_bits_equal_the_definition(ranks):
    key = DitherKey(0x0123456789ABCDEF, 9, 77, 0, ranks)
    for p in range(ranks):
        u = ops.dither(13, key.for_sender(p)).numpy()
        assert [float(x) for x in u] == [float(reference_dither(i, p, key)) for i in range(13)]


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gf_affine_family_is_sharply_two_transitive(m):
    """Over all (a ≠ 0, c): each ordered pair of distinct points goes to each ordered pair exactly once
    (what makes the variance of a sum equal to that of uniformly random permutations)."""
    q = 1 << m
    counts: dict[tuple[int, int, int, int], int] = {}
    for a in range(1, q):
        for c in range(q):
            img = [gf_mul(a, x, m) ^ c for x in range(q)]
            assert sorted(img) == list(range(q))
            for x in range(q):
                for y in range(q):
                    if x != y:
                        counts[(x, y, img[x], img[y])] = counts.get((x, y, img[x], img[y]), 0) + 1
    assert set(counts.values()) == {1} and len(counts) == (q * (q - 1)) ** 2


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5, 6, 7, 8, 12])
def test_strata_are_permutations_and_the_sum_is_one_stream(ranks):
    n = 4099
    key = DitherKey(5, 2, 3, 0, ranks)
    pi = strata(n, ranks, key)
    assert (np.sort(pi, axis=0) == np.arange(ranks)[:, None]).all()
    total = sum(ops.dither(n, key.for_sender(p)).double() for p in range(ranks))
    one = ops.dither(n, DitherKey(5, 2, 3, SHARED_V)).double()
    # float32 rounding of P terms in (−½, ½): at most P half-ulps of 2^-24 apart
    assert float((total - one).abs().max()) <= ranks * 2.0**-24
    decoded = ops.dqsg_decode(torch.zeros(n, dtype=torch.int32), torch.ones(1), n, key, senders=ranks)
    assert torch.equal(decoded, -ops.dither(n, DitherKey(5, 2, 3, SHARED_V)))


@pytest.mark.parametrize("ranks,levels", [(1, 1), (2, 1), (3, 3), (4, 127), (6, 1), (8, 1)])
def test_aggregate_of_own_scale_payloads_equals_the_sum_of_single_decodes(ranks, levels):
    """The fused kernel (shared words once per coordinate) against P separate one-sender decodes: same
    terms in the same sender order, so equal up to the final scaling (×1/P vs ÷P: one rounding)."""
    n = 1501
    codec = DQSG(levels, 128, "stratified")
    gen = torch.Generator().manual_seed(ranks)
    ctxs = [TensorContext("t", (n,), DitherKey(4, 5, 6, p), ranks) for p in range(ranks)]
    encs = [codec.encode(torch.randn(n, generator=gen) * (p + 1), c) for p, c in enumerate(ctxs)]
    sym = torch.stack([ops.unpack_symbols(e.fields["symbols"], codec.symbols, n) for e in encs])
    delta = torch.stack([e.fields["delta"] for e in encs])
    fused = ops.dqsg_aggregate(sym, delta, 128, DitherKey(4, 5, 6, 0, ranks), factor=1.0 / ranks, offset=levels)
    codes = (sym - levels).view(torch.int8)  # the same indices as int8 codes: the same bits
    assert torch.equal(fused, ops.dqsg_aggregate(codes, delta, 128, DitherKey(4, 5, 6, 0, ranks), factor=1.0 / ranks))
    single = sum(codec.decode(e, c) for e, c in zip(encs, ctxs)) / ranks
    assert torch.equal(codec.aggregate(encs, ctxs[0])[0], fused if ranks & (ranks - 1) else single)
    assert torch.allclose(fused, single, rtol=0, atol=2e-6 * float(single.abs().max()))


def test_cpu_kernels_are_named_after_the_arithmetic_they_compile():
    """Numba's disk cache keys a kernel by its own file's content: the names carry the hash of the
    arithmetic's sources (kernels/arith/) and of the kernel table, so editing either can never load a
    stale compiled kernel."""
    import hashlib
    from pathlib import Path

    from hvdquant.kernels import table

    files = sorted(Path(arith.__file__).parent.glob("*.py")) + [Path(table.__file__)]
    assert {f.name for f in files} >= {"__init__.py", "scalars.py", "streams.py", "dqsg.py", "table.py"}
    stamp = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    assert cpu.ARITH_STAMP == stamp
    assert cpu.KERNELS == tuple(k.name for k in table.KERNELS) + tuple(
        k.name + "_segments" for k in table.KERNELS if k.segments)
    for name in cpu.KERNELS:
        assert getattr(cpu.parallel, name).py_func.__name__ == f"{name}_{stamp}"
        assert getattr(cpu.serial, name).py_func.__name__ == f"{name}_{stamp}_serial"


def test_bad_keys_are_refused():
    with pytest.raises(ValueError, match="not a rank"):
        DitherKey(1, 0, 0, 4, 4)
    with pytest.raises(ValueError, match="ranks"):
        DitherKey(1, 0, 0, 0, (1 << 16) + 1)
    with pytest.raises(ValueError, match="not all among"):
        ops.dqsg_decode(torch.zeros(4, dtype=torch.int32), torch.ones(1), 4, DitherKey(1, 0, 0, 2, 4), senders=3)
    with pytest.raises(ValueError, match="dither must be one of"):
        DQSG(1, 64, "shared")


# ----------------------------------------------------------------------------- statistics
def chi2_bound(df: int) -> float:
    """χ² quantile far in the tail: df + 6√(2 df) (≈ 6σ of the χ² law; fixed seeds make it exact anyway)."""
    return df + 6.0 * math.sqrt(2.0 * df)


@pytest.mark.parametrize("ranks", [2, 3, 4, 5, 6, 8])
def test_each_ranks_stratum_is_uniform_and_pairs_are_spread(ranks):
    n = 60_000
    pi = strata(n, ranks, DitherKey(11, 4, 9, 0, ranks))
    for p in range(ranks):
        counts = np.bincount(pi[p], minlength=ranks)
        chi2 = float(((counts - n / ranks) ** 2 / (n / ranks)).sum())
        assert chi2 < chi2_bound(ranks - 1), (p, counts)
    if ranks & (ranks - 1) == 0:  # powers of 2: (π(0), π(1)) uniform over the P(P−1) ordered pairs
        cells = np.bincount(pi[0] * ranks + pi[1], minlength=ranks * ranks)
        expected = n / (ranks * (ranks - 1))
        off = cells[np.arange(ranks * ranks) % (ranks + 1) != 0]
        assert cells[:: ranks + 1].sum() == 0
        assert float(((off - expected) ** 2 / expected).sum()) < chi2_bound(ranks * (ranks - 1) - 1)


def encode_decode(x: np.ndarray, dither: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """P senders quantize rows x_p with Δ = 1 (levels large enough never to clip); returns each rank's
    reconstruction error and the error of the decoded sum (one decode of Σ_p k_p)."""
    ranks, n = x.shape
    codec = DQSG(127, n, dither)
    delta = torch.ones(1)
    errors, ksum = [], torch.zeros(n, dtype=torch.int32)
    for p in range(ranks):
        ctx = TensorContext("t", (n,), DitherKey(seed, 1, 2, p), ranks)
        key = codec.keyed(ctx.key, ranks)
        g = torch.from_numpy(x[p].astype(np.float32))
        k = codec.quantize(g, delta, key).to(torch.int32)
        errors.append(codec.decode_sum(k, delta, key).double().numpy() - x[p].astype(np.float32))
        ksum += k
    total = codec.decode_sum(ksum, delta, codec.keyed(DitherKey(seed, 1, 2, 0), ranks), senders=ranks)
    return np.stack(errors), total.double().numpy() - x.astype(np.float32).astype(np.float64).sum(0)


def test_each_ranks_error_is_uniform_unbiased_and_uncorrelated_with_its_input():
    """Per rank: mean error within 5 standard errors of 0 (σ = 1/√12), variance within 2% of 1/12,
    the 20-bin histogram χ² under the 6σ bound, |corr(error, input)| < 5/√n."""
    ranks, n = 4, 200_000
    rng = np.random.default_rng(0)
    x = np.tile(rng.normal(0, 3, n), (ranks, 1)) - np.arange(ranks)[:, None] / ranks  # adversarial pattern
    errors, _ = encode_decode(x, "stratified", 3)
    for p in range(ranks):
        e = errors[p]
        assert abs(e.mean()) < 5 / math.sqrt(12 * n)
        assert abs(e.var() * 12 - 1) < 0.02
        counts, _ = np.histogram(e, bins=20, range=(-0.5, 0.5))
        assert float(((counts - n / 20) ** 2 / (n / 20)).sum()) < chi2_bound(19)
        assert abs(np.corrcoef(e, x[p])[0, 1]) < 5 / math.sqrt(n)


def test_decoded_sum_is_unbiased():
    """z-test on the mean error of the decoded sum over n coordinates: |z| < 5."""
    ranks, n = 8, 100_000
    x = np.random.default_rng(1).normal(0, 2, (ranks, n))
    _, err = encode_decode(x, "stratified", 4)
    assert abs(err.mean()) / (err.std() / math.sqrt(n)) < 5


PATTERNS = {
    # name: (inputs of P ranks, bound on var(stratified) / var(independent) of the decoded sum's error)
    "identical": (lambda rng, P, n: np.tile(rng.normal(0, 3, n), (P, 1)), lambda P: 1.1 / P),
    "independent": (lambda rng, P, n: rng.normal(0, 3, (P, n)), lambda P: 1.05),
    "adversarial": (lambda rng, P, n: np.tile(rng.normal(0, 3, n), (P, 1)) - np.arange(P)[:, None] / P,
                    lambda P: 1.05 * (1 + 2 / P)),
}


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_variance_of_the_decoded_sum_relative_to_independent_dither(pattern, ranks):
    """Expected ratios (uniformly random strata; the GF(2^m) family is exactly 2-transitive for these P):
    identical inputs 1/P, independent inputs 1, inputs offset by Δ/P per rank 1 + 2/P. With n = 2e5 the
    ratio's relative standard error is ≈ 2/√n ≈ 0.5%, far inside the stated bounds."""
    n = 200_000
    make, bound = PATTERNS[pattern]
    x = make(np.random.default_rng(ranks), ranks, n)
    _, strat = encode_decode(x, "stratified", 21)
    _, indep = encode_decode(x, "independent", 21)
    assert strat.var() / indep.var() <= bound(ranks)
