"""The paper-reproduction runner (launch/experiments/paper.py) and its report, on a few iterations:
every method path it uses (Horovod stock compression, hvdquant stock compression, payload codecs,
LGC) runs under horovodrun, keeps replicas identical, and records measured bits that match what
the method sends."""

import importlib.util
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import pytest

pytestmark = pytest.mark.horovod
ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "launch" / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paper_runner_records_every_method_kind(tmp_path, monkeypatch):
    paper = load("paper")
    out = tmp_path / "runs"
    methods = "fp32,fp16,dqsg-s3,ndqsg-sum-3.31,1bit-ef,ndqsg-3.31-d512,lgc-ps"
    paper.main(["--model", "fc", "--iterations", "6", "--eval-every", "3", "--methods", methods,
                "--out", str(out)])
    if hvd.rank() != 0:
        return
    data = json.loads((out / f"paper-fc-P{hvd.size()}-seed0-it6.json").read_text())
    results = {r["method"]: r for r in data["results"]}
    assert list(results) == methods.split(",")
    assert results["fp32"]["bits_per_coordinate"] == 32.0 and results["fp16"]["bits_per_coordinate"] == 16.0
    for r in results.values():
        assert r["replicas_bit_identical"] and [c[0] for c in r["curve"]] == [3, 6]
        assert 0.0 < r["final_accuracy"] <= 1.0
    assert results["1bit-ef"]["bits_per_coordinate"] < 2.0  # packed signs + column means, biases at 32
    for m in ("ndqsg-3.31-d512", "ndqsg-sum-3.31"):
        assert 0.0 <= results[m]["decode_failure_rate"] <= 1.0
    assert results["fp32"]["decode_failure_rate"] is None
    assert results["lgc-ps"]["ae_parameters"] > 0 and results["lgc-ps"]["ae_flops_per_step"] > 0

    report = load("report")
    docs = tmp_path / "docs"
    docs.mkdir()
    kept = "<!-- bench_quality: begin (another report) -->\ntime to quality\n<!-- bench_quality: end -->"
    (docs / "RESULTS.md").write_text(f"# stale\n\n{kept}\n")
    monkeypatch.setattr(sys, "argv", ["report.py", "--runs", str(out), "--stat", str(tmp_path / "none.json"),
                                      "--docs", str(docs)])
    report.main()
    text = (docs / "RESULTS.md").read_text()
    assert "`ndqsg-3.31-d512`" in text and (docs / "results_fc_6.png").stat().st_size > 0
    assert kept in text and "# stale" not in text  # another report's block survives the rewrite
    assert "#### Against the baselines" in text and "FC 784-300-100-10, P = " in text  # FC only: no CNN table


def test_paper_runner_merges_a_rerun_of_some_methods(tmp_path):
    """Rerunning one method replaces its result and keeps the others' (a sweep split by method)."""
    paper = load("paper")
    args = ["--model", "fc", "--iterations", "4", "--eval-every", "2", "--out", str(tmp_path)]
    paper.main(args + ["--methods", "fp32,fp16"])
    path = tmp_path / f"paper-fc-P{hvd.size()}-seed0-it4.json"
    first = json.loads(path.read_text())["results"] if hvd.rank() == 0 else None
    paper.main(args + ["--methods", "fp16,dqsg-s3"])
    if hvd.rank() != 0:
        return
    merged = json.loads(path.read_text())["results"]
    assert [r["method"] for r in merged] == ["fp16", "dqsg-s3", "fp32"]  # this run's, then the kept ones
    assert merged[2] == first[0]  # fp32 kept as recorded, with its date
