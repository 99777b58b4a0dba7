"""Verdicts and reports of launch/gpu_e2e.sh and launch/gpu_check.sh (no GPU needed).

    python launch/gpu_report.py run DIR --target cuda     # a training run's summary (DIR/train-*.json)
    python launch/gpu_report.py pytest DIR FILE...        # the kernel tests' reports (tests/conftest.py)
    python launch/gpu_report.py bench DIR --sizes 1e6 1e8 # the throughput table's JSON
    python launch/gpu_report.py e2e WORK OUT.json         # merge: verdicts, codes, runs
    python launch/gpu_report.py check WORK OUT.json       # merge: verdicts, tests, throughput

``run``, ``pytest`` and ``bench`` judge one part: they print one line, its details, or exit 1
after a line ``FAILED: <why>``. ``e2e`` and ``check`` merge a script's work folder (its parts'
verdicts in ``verdicts.tsv``: name, PASS or FAIL, seconds, details) into one JSON report, so the
device returns a few files, not one per run.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any


def fail(why: str) -> None:
    print(f"FAILED: {why}")
    raise SystemExit(1)


def one(folder: Path, pattern: str) -> dict[str, Any]:
    """The JSON file matching ``pattern`` in ``folder`` (there must be exactly one)."""
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        fail(f"expected one {pattern} in {folder}, found {len(found)}")
    return json.loads(found[0].read_text())


def judge_run(folder: Path, target: str) -> None:
    """A training run passes with replicas bit-identical, on ``target``'s device, with kernel launches there."""
    s = one(folder, "train-*.json")
    launches = s.get("kernel_launches", {}).get(target, 0)
    if not s["replicas_bit_identical"]:
        fail("replicas differ")
    if not str(s.get("device", "")).startswith(target):
        fail(f"the model ran on {s.get('device')}, not {target}")
    if not launches:
        fail(f"no kernel ran on {target} (launches: {s.get('kernel_launches')})")
    print(f"{s['steps']} steps on {s['device']}, replicas bit-identical, {launches:,} {target} kernel launches "
          f"(rank 0), median step {number(s.get('step_seconds_median'), 1e3, '.1f', ' ms')}, "
          f"accuracy {s['test_accuracy']:.4f}, {s['bits_per_coordinate']:.3f} bits/coordinate")


def judge_pytest(folder: Path, files: list[str]) -> None:
    """The kernel tests pass when every test file's pytest reported (``folder/<file stem>/``), with
    passed tests and none failed."""
    passed = skipped = 0
    bad, silent = [], []
    for stem in (Path(f).stem for f in files):
        if not (folder / stem / "rank0.json").exists():
            silent.append(stem)
            continue
        passed += one(folder / stem, "rank0.json").get("passed", 0)
        cases = one(folder / stem, "rank0-cases.json")
        skipped += sum(outcome == "skipped" for _, outcome in cases)
        bad += [node.split("::", 1)[-1] for node, outcome in cases if outcome not in ("passed", "skipped")]
    why = []
    if bad:
        why.append(f"{len(bad)} of {passed + len(bad)} tests failed or errored: {', '.join(bad[:6])}"
                   + (f" and {len(bad) - 6} more" if len(bad) > 6 else ""))
    if silent:
        why.append(f"no report from {', '.join(silent)}")
    if why or not passed:
        fail("; ".join(why) or "no test passed")
    print(f"{passed} passed, {skipped} skipped ({', '.join(Path(f).name for f in files)})")


def judge_bench(folder: Path, sizes: list[float]) -> None:
    report = one(folder, "bench_kernels_*.json")
    rows = report["rows"]
    codecs = sorted({r["codec"] for r in rows})
    missing = [f"{c} at {n:.0e}" for c in codecs for n in sizes if not any(r["codec"] == c and abs(r["n"] - n) <= 1000
                                                                          for r in rows)]
    if not rows or missing:
        fail(f"no throughput for {', '.join(missing) or 'any codec'}")
    print(f"{len(rows)} rows ({len(codecs)} codecs x {len(sizes)} sizes) on {report['meta']['device']}")


def verdicts(work: Path) -> list[dict[str, Any]]:
    out = []
    path = work / "verdicts.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, verdict, seconds, details = (line.split("\t") + [""] * 4)[:4]
        out.append({"part": name, "verdict": verdict, "seconds": int(seconds or 0), "details": details})
    return out


def machine() -> dict[str, Any]:
    import torch

    return {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def number(x: float | None, scale: float, fmt: str, unit: str = "") -> str:
    return "-" if x is None else f"{scale * x:{fmt}}{unit}"


def merge_e2e(work: Path, out: Path) -> None:
    """gpu_e2e.json: the parts' verdicts, the codes part's tables, every run's summary with its
    codec's time per step beside the run's median step (the codec's share)."""
    codes_path = work / "codes.json"
    codes = json.loads(codes_path.read_text()) if codes_path.exists() else {}
    seconds = codes.get("codec_seconds", {})
    runs = []
    for folder in sorted(p for p in (work / "runs").glob("*") if p.is_dir()):
        found = sorted(folder.glob("train-*.json"))
        if not found:
            continue
        s = json.loads(found[0].read_text())
        step, codec = s.get("step_seconds_median"), seconds.get(folder.name)
        runs.append({"run": folder.name, "codec_seconds": codec,
                     "codec_share": codec / step if codec is not None and step else None, "summary": s})
    report = {"machine": machine(), "parts": verdicts(work), **{k: v for k, v in codes.items() if k != "codec_seconds"},
              "runs": runs}
    out.write_text(json.dumps(report, indent=2))
    if runs:
        print(f"\n{'run':26} {'device':>7} {'steps':>5} {'step ms':>8} {'codec ms':>9} {'share':>6} "
              f"{'launches':>9} {'identical':>9} {'accuracy':>8} {'bits':>6}")
    for r in runs:
        s, step, codec, share = (r["summary"], r["summary"].get("step_seconds_median"), r["codec_seconds"],
                                 r["codec_share"])
        target = "cuda" if str(s["device"]).startswith("cuda") else "cpu"
        print(f"{r['run']:26} {s['device']:>7} {s['steps']:>5} {number(step, 1e3, '.1f'):>8} "
              f"{number(codec, 1e3, '.2f'):>9} {number(share, 100, '.0f', '%'):>6} "
              f"{s['kernel_launches'].get(target, 0):>9} {str(s['replicas_bit_identical']):>9} "
              f"{s['test_accuracy']:>8.4f} {s['bits_per_coordinate']:>6.2f}")
    print(f"report: {out}")


def merge_check(work: Path, out: Path) -> None:
    """gpu_check.json: the parts' verdicts, the kernel tests' counts and failures, the throughput rows."""
    tests = {}
    for report in sorted((work / "pytest").glob("*/rank0.json")):
        counts = json.loads(report.read_text())
        cases = json.loads((report.parent / "rank0-cases.json").read_text())
        tests[report.parent.name] = {**counts, "not_passed": [c for c in cases if c[1] != "passed"]}
    bench = sorted((work / "bench").glob("bench_kernels_*.json"))
    report = {"machine": machine(), "parts": verdicts(work), "kernel_tests": tests,
              "throughput": json.loads(bench[0].read_text()) if bench else None}
    out.write_text(json.dumps(report, indent=2))
    print(f"report: {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="judge a training run")
    run.add_argument("folder", type=Path)
    run.add_argument("--target", choices=["cuda", "cpu"], required=True)
    tests = sub.add_parser("pytest", help="judge the kernel tests")
    tests.add_argument("folder", type=Path)
    tests.add_argument("files", nargs="+", help="the test files run, one report folder each")
    bench = sub.add_parser("bench", help="judge the throughput table")
    bench.add_argument("folder", type=Path)
    bench.add_argument("--sizes", nargs="+", type=float, required=True)
    for name in ("e2e", "check"):
        merge = sub.add_parser(name, help=f"merge launch/gpu_{name}.sh's work folder into one JSON report")
        merge.add_argument("work", type=Path)
        merge.add_argument("out", type=Path)
    args = p.parse_args()
    if args.cmd == "run":
        judge_run(args.folder, args.target)
    elif args.cmd == "pytest":
        judge_pytest(args.folder, args.files)
    elif args.cmd == "bench":
        judge_bench(args.folder, args.sizes)
    elif args.cmd == "e2e":
        merge_e2e(args.work, args.out)
    else:
        merge_check(args.work, args.out)


if __name__ == "__main__":
    main()
