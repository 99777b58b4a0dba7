"""launch/experiments/stat_claims.py on one step of the FC model: the measured quantities obey the
bounds the maths gives for ~10⁶ samples (4 ranks × 266k weights)."""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_stat_claims_one_step_within_theory():
    spec = importlib.util.spec_from_file_location("experiments_stat_claims",
                                                  ROOT / "launch" / "experiments" / "stat_claims.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from hvdquant.examples.models import fc

    torch.manual_seed(0)
    r = module.measure("fc", fc(), steps=1, every=1)
    # DQSG's error is uniform on [−Δ/2, Δ/2] and independent of g: with N ≈ 1.07e6 errors the variance
    # ratio's standard deviation is ≈ sqrt(0.8/N) < 0.001 and the correlation's ≈ 1/sqrt(N) < 0.001.
    assert abs(r["dqsg_error_variance_over_theory"] - 1) < 0.01
    assert abs(r["dqsg_error_gradient_correlation"]) < 0.01
    # QSGD's p(1−p)Δ² ≤ Δ²/4 = 3× DQSG's Δ²/12 per coordinate (0 where g sits on the grid, e.g. g = 0)
    assert 0 < r["qsgd_over_dqsg_variance"] <= 3
    assert abs(r["ndqsg_over_dqsg_mean_variance"] - 1) < 1e-6  # recovered buckets: exactly DQSG's indices
    f = r["ndqsg_failed_coordinate_fraction"]
    assert 0 < f < 0.5 and 0 < r["ndqsg_failed_bucket_fraction"] <= 1
    # Flags cost H(f) ≤ 1 bit per nested coordinate, half of all coordinates at r = 0.5.
    ideal, raw = r["ndqsg_bits_with_ideal_escapes"], r["ndqsg_bits_without_recovery"]
    assert raw < ideal <= raw + 0.5
    assert r["ndqsg_bits_without_recovery"] < r["dqsg3_bits"] < r["ndqsg_bits_with_recovery"]
