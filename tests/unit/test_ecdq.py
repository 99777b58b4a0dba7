"""ECDQ (docs/ALGORITHMS.md §12), in both scopes of its step: the payload decodes to Δ(k − u) with
every index inside its alphabet (never clipped, however peaked the bucket), the error is unbiased
with variance Δ²/12, the measured bytes follow the model's code length and undercut a coder that
ignores the dither, one step per tensor spends fewer bits than one per bucket where buckets differ
in energy (at the same error), and bad input is refused by name."""

import pytest
import torch

import hvdquant
from hvdquant import ECDQ
from hvdquant.codecs import TensorContext
from hvdquant.codecs.base import counts_entropy
from hvdquant.kernels import DitherKey, ops


def ctx(n: int, step: int = 0, sender: int = 0, ranks: int = 1) -> TensorContext:
    return TensorContext("w", (n,), DitherKey(7, step, 11, sender), ranks)


def gaussian(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


SCOPES = ["tensor", "bucket"]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("n", [1, 511, 512, 5000])
def test_decode_is_the_dithered_reconstruction(scope, rotation, n):
    """decode = R⁻¹(Δ_b (k − u)) with the encoder's symbols: the rANS stream gives them back exactly."""
    codec, c = ECDQ(1.3, 512, rotation=rotation, scope=scope), ctx(n)
    g = gaussian(n) * 3
    enc = codec.encode(g, c)
    x = codec.rotator.rotate(g, c.key)
    delta, _ = codec.payload_steps(enc)
    symbols = ops.dqsg_encode(x, delta, 512, codec.half_width, codec.keyed(c.key, 1), symbols=True)
    expected = codec.rotator.unrotate(ops.dqsg_decode(symbols, delta, 512, codec.keyed(c.key, 1),
                                                      offset=codec.half_width), c.key)
    assert torch.equal(codec.decode(enc, c), expected)
    assert torch.equal(enc.counts.sum(0), torch.bincount(symbols, minlength=2 * codec.half_width + 1))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("step", [3.0, 1.0, 0.19])
def test_indices_are_never_clipped(scope, step):
    """Buckets holding one spike (the largest |x|/σ there is: √d), a constant, a spike among tiny
    values: every coordinate's error stays within Δ_b/2, which a clipped index would break. (In the
    tensor scope the spikes' buckets take a coarser step, 4^e_b times the tensor's.)"""
    d = 512
    spike = torch.zeros(d)
    spike[17] = -1e3
    const = torch.full((d,), 0.25)
    mixed = torch.full((d,), 1e-6)
    mixed[3] = 50.0
    g = torch.cat([spike, const, mixed])
    codec, c = ECDQ(step, d, rotation="none", scope=scope), ctx(g.numel())
    enc = codec.encode(g, c)
    out = codec.decode(enc, c)
    delta = codec.payload_steps(enc)[0].repeat_interleave(d)
    assert bool(((out - g).abs() <= delta * (0.5 + 1e-6) + 1e-30).all())
    if scope == "tensor" and step < 1:  # σ ≈ 1e3/√1536, so the spike is 1e3/(0.19σ) ≈ 206 > 125 steps
        assert codec.payload_steps(enc)[0].unique().numel() > 1  # its bucket took a coarser step


@pytest.mark.parametrize("scope", SCOPES)
def test_unbiased_with_variance_delta_squared_over_twelve(scope):
    """Over T = 64 steps (fresh dithers and rotations), the mean reconstruction's squared error is
    Σ_t E_t/T², E_t = Σ_i Δ_i²/12 of draw t (the errors are independent across draws): within 25% (a
    sum of many nearly independent terms). One draw's error is E_t within 3% on average. (Unrotated:
    the rotation of a 512-piece is √2 times an orthogonal map, which halves the error it maps back.)"""
    n, T = 1 << 14, 64
    g = gaussian(n, 1) * torch.linspace(0.1, 3, n)
    codec = ECDQ(1.6, 512, rotation="none", scope=scope)
    outs, expected, ratios = [], [], []
    for step in range(T):
        c = ctx(n, step)
        enc = codec.encode(g, c)
        out = codec.decode(enc, c)
        deltas = codec.payload_steps(enc)[0]
        expected.append(float((deltas ** 2).sum()) * 512 / 12)
        ratios.append(float(((out - g) ** 2).sum()) / expected[-1])
        outs.append(out)
    got = float(((torch.stack(outs).mean(0) - g) ** 2).sum())
    assert abs(got / (sum(expected) / T ** 2) - 1) < 0.25
    assert abs(sum(ratios) / T - 1) < 0.03


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("step", [2.6, 1.1, 0.5])
def test_bytes_follow_the_model_and_beat_a_coder_blind_to_the_dither(scope, step):
    """On Gaussian data the measured bits are within 2% of the model's code length (the formula) and
    below the symbols' zeroth-order entropy plus the same side bits, which a static table pays."""
    n = 1 << 18
    codec, c = ECDQ(step, 512, scope=scope), ctx(n)
    enc = codec.encode(gaussian(n, 2), c)
    bits = 8 * enc.nbytes() / n
    side = (codec.side_bits(n) + 32 * ops.rans_chunks(n)) / n
    assert abs(bits / codec.formula_bits(n) - 1) < 0.02
    assert bits < counts_entropy(enc.counts.sum(0)) + side
    # the conditional entropy the statistic reports is what an ideal context coder reaches: at most the bytes
    assert enc.entropy() < bits < enc.entropy() + side + 0.03


def test_error_per_bit_against_the_closed_form():
    """One sender, Gaussian: at step 1.1 the error is step²/12 ≈ 0.101 of the energy at about 2 bits
    (EDEN's unbiased 2-bit error is 0.133)."""
    n = 1 << 18
    g = gaussian(n, 3)
    codec, c = ECDQ(1.1, 512), ctx(n)
    enc = codec.encode(g, c)
    err = float(((codec.decode(enc, c) - g) ** 2).sum() / (g ** 2).sum())
    assert abs(err / (1.1 ** 2 / 12) - 1) < 0.03
    assert 8 * enc.nbytes() / n < 2.05


@pytest.mark.parametrize("scope", SCOPES)
def test_zero_and_empty_tensors(scope):
    codec = ECDQ(scope=scope)
    assert torch.equal(codec.decode(codec.encode(torch.zeros(700), ctx(700)), ctx(700)), torch.zeros(700))
    empty = codec.encode(torch.zeros(0), ctx(0))
    assert codec.decode(empty, ctx(0)).numel() == 0


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_is_refused_by_name(scope, bad):
    g = gaussian(1000)
    g[400] = bad
    with pytest.raises(FloatingPointError, match="'w'"):
        ECDQ(scope=scope).encode(g, ctx(1000))


def test_one_step_per_tensor_spends_its_bits_where_the_energy_is():
    """Half the buckets loud (σ = 1), half quiet (σ = 2^-8), step 1.1. Bucket scope: every bucket at
    relative step 1.1, about 2 bits each. Tensor scope: Δ = 1.1·σ with σ² ≈ ½, so the loud buckets
    sit at relative step 1.1/√2 (about 2.5 bits) and the quiet ones at 1.1·2^7.5 (the silent class,
    almost nothing): about 1.3 bits in all. The normalised error is step²/12 in both (the tensor
    scope's absolute error Δ²/12 per coordinate over ‖x‖²/n = σ²)."""
    d, buckets = 512, 128
    scale = torch.tensor([1.0, 2.0 ** -8]).repeat(buckets // 2).repeat_interleave(d)
    g = gaussian(d * buckets, 5) * scale
    c = ctx(g.numel())
    result = {}
    for scope in SCOPES:
        codec = ECDQ(1.1, d, scope=scope)
        enc = codec.encode(g, c)
        err = float(((codec.decode(enc, c) - g) ** 2).sum() / (g ** 2).sum())
        assert abs(err / (1.1 ** 2 / 12) - 1) < 0.03, scope
        result[scope] = 8 * enc.nbytes() / g.numel()
    assert 1.9 < result["bucket"] < 2.1
    assert 1.15 < result["tensor"] < 1.45


@pytest.mark.parametrize("scope", SCOPES)
def test_a_bucket_of_zeros_decodes_to_exact_zeros(scope):
    """A gradient that is zero in some buckets (an embedding's rows no token of the batch used) gets
    exact zeros there, not the dither's noise: its Δ_b is 0 (the tensor scope's byte ZERO_BUCKET)."""
    d = 512
    g = gaussian(4 * d, 6)
    g[d:2 * d] = 0.0
    g[3 * d + 5:] = 0.0  # part of a bucket: that bucket is not zero, and its zeros carry noise
    codec, c = ECDQ(1.1, d, scope=scope), ctx(g.numel())
    out = codec.decode(codec.encode(g, c), c)
    assert bool((out[d:2 * d] == 0).all())
    assert not bool((out[3 * d + 5:] == 0).all())


def test_a_step_too_fine_for_the_exponents_is_refused_by_name():
    """The tensor scope's spike bucket needs 4^e_b ≥ peak/(125·Δ); e_b stops at 7."""
    g = torch.zeros(4096)
    g[5] = 1.0
    with pytest.raises(ValueError, match="too fine for 'w'"):
        ECDQ(1e-7, 512, rotation="none", scope="tensor").encode(g, ctx(g.numel()))


@pytest.mark.parametrize("kwargs, match", [({"step": 0}, "positive"), ({"step": -1.0}, "positive"),
                                           ({"step": float("nan")}, "positive"), ({"step": True}, "positive"),
                                           ({"step": 0.1}, "too fine"),
                                           ({"scope": "layer"}, "scope"), ({"dither": "other"}, "dither"),
                                           ({"rotation": "dct"}, "rotation"), ({"bucket_size": 0}, "bucket_size")])
def test_bad_parameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ECDQ(**kwargs)


def test_a_table_that_misses_a_symbol_is_refused_not_looped_on():
    sym = torch.tensor([0, 1, 2, 1], dtype=torch.uint8)
    freq = torch.tensor([[8192, 8192, 0]], dtype=torch.int16)
    with pytest.raises(ValueError, match="frequency 0"):
        ops.rans_encode_modelled(sym, freq, torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no table"):
        ops.rans_encode_modelled(sym, freq, torch.ones(4, dtype=torch.uint8))


def test_mean_over_senders_rotates_back_once():
    """aggregate = the mean of the senders' decodes (formed in rotated coordinates, rotated back once):
    equal to decoding each sender and averaging, up to float rounding of the rotation."""
    n, P = 3000, 4
    codec = ECDQ(1.3, 512)
    grads = [gaussian(n, p) for p in range(P)]
    c = ctx(n, ranks=P)
    encs = [codec.encode(g, c.sender(p)) for p, g in enumerate(grads)]
    mean, _ = codec.aggregate(encs, c)
    each = torch.stack([codec.decode(e, c.sender(p)) for p, e in enumerate(encs)]).mean(0)
    assert torch.allclose(mean, each, atol=1e-5)
    err = float(((mean - torch.stack(grads).mean(0)) ** 2).sum() / (torch.stack(grads).mean(0) ** 2).sum())
    # independent senders: errors and signals both average down as 1/P, so the ratio stays step²/12
    assert abs(err / (1.3 ** 2 / 12) - 1) < 0.1


def test_public_name_and_config():
    assert hvdquant.ECDQ is ECDQ
    assert ECDQ(0.8).config() == {"scheme": "ecdq", "step": 0.8, "bucket_size": 512, "dither": "stratified",
                                  "rotation": "hadamard", "scope": "bucket"}
    assert not ECDQ.summable
