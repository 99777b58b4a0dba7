"""DQSG codec (docs/ALGORITHMS.md §1): exact properties, error statistics, multi-sender sums."""

import math

import numpy as np
import pytest
import torch

from hvdquant import DQSG
from hvdquant.kernels import DitherKey

KEY = DitherKey(seed=2024, step=0, tensor_id=17, sender=0)


def roundtrip(codec: DQSG, g: torch.Tensor, key: DitherKey = KEY):
    delta = codec.step_size(codec.bucket_absmax(g))
    codes = codec.quantize(g, delta, key)
    return codes, delta, codec.decode_sum(codes, delta, key)


@pytest.mark.parametrize("n", [0, 1, 7, 511, 512, 513, 2000])
@pytest.mark.parametrize("levels", [1, 3, 7])
def test_codes_in_range_and_error_within_half_step(n, levels):
    codec = DQSG(levels=levels, bucket_size=512)
    g = torch.randn(n, generator=torch.Generator().manual_seed(n))
    codes, delta, ghat = roundtrip(codec, g)
    assert codes.dtype == torch.int8 and codes.shape == (n,)
    assert n == 0 or int(codes.abs().max()) <= levels
    per_coord = delta.repeat_interleave(512)[:n]
    # |ĝ − g| = Δ·|k − (x+u)| ≤ Δ/2, plus float32 rounding of a few ulps of |g|.
    assert bool(((ghat - g).abs() <= per_coord / 2 + 4e-7 * g.abs().clamp_min(1)).all())


def test_known_values_by_hand():
    """g = (0.5, -1, 0.25, 0): Δ = 1/s = 1 for s=1; k = round(g + u); ĝ = k − u."""
    codec = DQSG(levels=1, bucket_size=4)
    g = torch.tensor([0.5, -1.0, 0.25, 0.0])
    codes, delta, ghat = roundtrip(codec, g)
    from hvdquant.kernels import ops
    u = ops.dither(4, KEY)
    assert delta.tolist() == [1.0]
    assert codes.tolist() == [int(math.floor(x + 0.5)) for x in (g + u).tolist()]
    assert torch.equal(ghat, codes.float() - u)


def test_error_statistics_match_theory():
    """Subtractive dither (docs/ALGORITHMS.md §1): error uniform on (−Δ/2, Δ/2], mean 0, variance Δ²/12,
    uncorrelated with g. n = 262144 coordinates; bounds are 5 standard errors of each estimate:
    mean: 5·σ/√n; variance ratio: 5·√(0.8/n) (uniform kurtosis 1.8); correlation: 5/√n."""
    n = 1 << 18
    g = torch.randn(n, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, n)
    codec = DQSG(levels=3, bucket_size=256)
    _, delta, ghat = roundtrip(codec, g)
    err = (ghat - g).double()
    var_theory = (delta.double().repeat_interleave(256)[:n] ** 2 / 12)
    z = err / var_theory.sqrt()  # standardized: mean 0, variance 1
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float((z ** 2).mean()) - 1) < 5 * math.sqrt(0.8 / n)
    corr = float(torch.corrcoef(torch.stack([err, g.double()]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(n)


def test_unbiased_over_seeds():
    """Mean of ĝ over T = 400 independent dithers → g; per-coordinate std of that mean is
    Δ/√(12T); every one of the 64 coordinates must be within 5 of those."""
    codec = DQSG(levels=1, bucket_size=64)
    g = torch.randn(64, generator=torch.Generator().manual_seed(5))
    delta = codec.step_size(codec.bucket_absmax(g))
    T = 400
    acc = torch.zeros(64, dtype=torch.float64)
    for step in range(T):
        key = DitherKey(7, step, 1, 0)
        acc += codec.decode_sum(codec.quantize(g, delta, key), delta, key).double()
    sd = float(delta) / math.sqrt(12 * T)
    assert float((acc / T - g.double()).abs().max()) < 5 * sd


def test_common_scale_sum_of_senders():
    """P senders with one Δ per bucket: decode_sum of Σk equals Σ of single-sender decodes."""
    P, n = 5, 1500
    codec = DQSG(levels=2, bucket_size=128)
    gs = [torch.randn(n, generator=torch.Generator().manual_seed(p)) for p in range(P)]
    delta = codec.step_size(torch.stack([codec.bucket_absmax(g) for g in gs]).max(0).values)
    keys = [DitherKey(3, 9, 11, p) for p in range(P)]
    codes = [codec.quantize(g, delta, k) for g, k in zip(gs, keys)]
    ksum = torch.stack([c.int() for c in codes]).sum(0)
    total = codec.decode_sum(ksum, delta, keys[0], senders=P)
    separate = sum(codec.decode_sum(c, delta, k).double() for c, k in zip(codes, keys))
    assert torch.allclose(total.double(), separate, atol=1e-5)
    per_coord = delta.repeat_interleave(128)[:n].double()
    assert bool(((total.double() - sum(g.double() for g in gs)).abs() <= P * per_coord / 2 + 1e-5).all())


def test_zero_bucket_gives_zero_not_nan():
    codec = DQSG(levels=3, bucket_size=4)
    g = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -2.0])
    codes, delta, ghat = roundtrip(codec, g)
    assert delta[0] == 0 and codes[:4].eq(0).all()
    assert torch.isfinite(ghat).all() and ghat[:4].eq(0).all()


def test_nan_reported_as_inf_scale():
    codec = DQSG()
    g = torch.ones(10)
    g[3] = float("nan")
    assert codec.bucket_absmax(g)[0] == float("inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_work_in_float32(dtype):
    codec = DQSG(levels=3, bucket_size=32)
    g = torch.randn(100).to(dtype)
    _, delta, ghat = roundtrip(codec, g)
    assert ghat.dtype == torch.float32
    assert float((ghat - g.float()).abs().max()) <= float(delta.max()) / 2 + 1e-6


def test_non_contiguous_input():
    codec = DQSG(levels=2, bucket_size=8)
    g = torch.randn(6, 10)[:, ::2]
    codes, delta, ghat = roundtrip(codec, g)
    assert codes.numel() == 30
    _, _, ghat2 = roundtrip(codec, g.contiguous())
    assert torch.equal(ghat, ghat2)


def test_integer_tensor_refused():
    with pytest.raises(TypeError, match="floating-point"):
        DQSG().bucket_absmax(torch.arange(5))


@pytest.mark.parametrize("kwargs,exc", [({"levels": 0}, ValueError), ({"levels": 128}, ValueError),
                                        ({"levels": 1.5}, TypeError), ({"levels": True}, TypeError),
                                        ({"bucket_size": 0}, ValueError), ({"bucket_size": "8"}, TypeError)])
def test_bad_parameters_refused(kwargs, exc):
    with pytest.raises(exc, match=next(iter(kwargs))):
        DQSG(**kwargs)


def test_nominal_bits():
    assert DQSG(levels=1, bucket_size=512).entropy_bound_bits() == pytest.approx(math.log2(3) + 32 / 512)
    assert np.isclose(DQSG(levels=3).entropy_bound_bits() - 32 / 512, 2.807, atol=1e-3)
