"""launch/bench_error.py's reference estimators against what their papers state, and a smoke run of
the benchmark (table, JSON, report block). DRIVE's unbiased 1-bit estimate has normalised error
π/2 − 1 ≈ 0.571 for one sender on a long vector; the 1-bit Lloyd–Max quantizer of N(0, 1) is
±√(2/π); the 2-bit one ±0.4528, ±1.5104 (Max, 1960). EDEN's error falls as 1/P over independent
senders."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_error", ROOT / "launch" / "bench_error.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_lloyd_max_centroids_of_the_gaussian():
    assert np.allclose(bench.lloyd_max_gaussian(1), [-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], atol=1e-4)
    assert np.allclose(bench.lloyd_max_gaussian(2), [-1.5104, -0.4528, 0.4528, 1.5104], atol=2e-3)


def test_fwht_is_orthonormal_and_pieces_cover():
    x = np.random.default_rng(0).standard_normal(64)
    assert math.isclose(np.linalg.norm(bench.fwht(x)), np.linalg.norm(x), rel_tol=1e-12)
    assert np.allclose(bench.fwht(bench.fwht(x)), x)
    assert bench.pieces(100) == [(0, 64), (64, 96), (96, 100)]


@pytest.mark.parametrize("bits, expected", [(1, math.pi / 2 - 1), (2, 0.1331)])
def test_eden_unbiased_error_matches_the_papers(bits, expected):
    """One sender, d = 2^16, 8 rotations: the mean normalised error within 3% of the stated value (the
    error is a sum over 2^16 nearly independent coordinates: its spread is well under 1%)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1 << 16) * np.exp(rng.standard_normal(1 << 16))  # heavy-tailed: the rotation's job
    c = bench.lloyd_max_gaussian(bits)
    errs = []
    for _ in range(8):
        est, b = bench.eden(x, bits, rng, c)
        errs.append(float(((est - x) ** 2).sum() / (x ** 2).sum()))
        assert b == pytest.approx(bits + 32 / x.size)
    assert abs(np.mean(errs) / expected - 1) < 0.03


def test_eden_is_unbiased_over_rotations():
    """Mean of 400 one-bit estimates of a fixed 256-vector: the squared norm of the mean error is
    E/T (T = 400 draws, E = (π/2 − 1)‖x‖² each) within 30%."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(256)
    c = bench.lloyd_max_gaussian(1)
    mean = np.mean([bench.eden(x, 1, rng, c)[0] for _ in range(400)], axis=0)
    expected = (math.pi / 2 - 1) * (x ** 2).sum() / 400
    assert abs(((mean - x) ** 2).sum() / expected - 1) < 0.3


def test_smoke_run_writes_table_json_and_report(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept\n")
    bench.main(["--quick", "--senders", "1", "2", "--correlations", "0", "--jobs", "--repeats", "1",
                "--out", str(tmp_path / "out"), "--report", str(results), "--quiet"])
    rows = json.loads((tmp_path / "out" / "bench_error.json").read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"dqsg-strat-hada-s1", "drive-b1", "eden-b2", "qsgd-elias-s1", "onebit", "topk-0.01"} <= methods
    for r in rows:
        assert r["bits_per_coordinate"] > 0 and math.isfinite(r["normalised_error"])
    dqsg = next(r for r in rows if r["method"] == "dqsg-strat-none-s1" and r["senders"] == 1
                and r["data"] == "gaussian")
    # base-3 symbols, 5 a byte, and a float32 scale per bucket of 512: the bytes handed over
    n = 1 << 14
    assert dqsg["bits_per_coordinate"] == pytest.approx(8 * (math.ceil(n / 5) + 4 * n // 512) / n)
    # NDQSG decodes its nested senders' indices exactly (recovering what side information missed),
    # so its mean is DQSG(s₁)'s with the same dither keys, at its own measured bits
    for senders in (1, 2):
        pick = {r["method"]: r for r in rows if r["senders"] == senders and r["data"] == "gaussian"}
        assert pick["ndqsg-none-s3"]["normalised_error"] == pick["dqsg-indep-none-s3"]["normalised_error"]
    text = results.read_text()
    assert "kept" in text and bench.BEGIN in text and (tmp_path / "bench_error.png").is_file()
