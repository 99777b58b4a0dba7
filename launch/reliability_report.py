"""Reliability summary (docs/RELIABILITY.md): runs the bad-input, fault, determinism and
property-based tests and tables how many cases of each kind ran and how they ended.

    bash -c 'source launch/env.sh && python launch/reliability_report.py'

Runs: the unit tests (codecs, kernels, properties, faults), the Horovod tests under
``horovodrun -np 2 --gloo``, and the MPI tests under ``mpirun -n 3``; classifies every test case
by its name; rewrites the table between the report markers of docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [  # first match wins
    ("faults: rank killed (SIGKILL) under mpirun / horovodrun", r"test_faults"),
    ("property-based invariants (hypothesis)", r"test_properties"),
    ("ranks that disagree (config, seed, names, steps)", r"mismatch|differ|names_mismatch|different_steps"),
    ("nested decoding with bad side information", r"forced_failure|recover|without_recovery|flags_wrong|"
                                                   r"ndqsg_equals|side_information|nested_sum"),
    ("determinism, checkpoint/resume, bit-identical replicas",
     r"determinism|checkpoint|bit_identical|bit_for_bit|hook_order|regenerates|same_on"),
    ("bad input values (NaN/Inf, zero buckets, denormals, near float32 max, dtypes, shapes)",
     r"nonfinite|nan|overflow|large_but_safe|zero_bucket|zero_and_nan|dtype|non_contiguous|zero_size|"
     r"integer_tensor|other_float|empty|corrupt"),
    ("bad parameters and arguments (range, type, refused call sites)",
     r"bad_param|bad_argument|refus|out_of_range|wrong_type|unnamed|unsummable|seed_out|too_wide|bad_scaling"),
]


def run(cmd: list[str], env_extra: dict[str, str]) -> None:
    import os

    env = dict(os.environ, **env_extra)
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=False)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hvdq-rel-"))
    py = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no"]
    stages = {
        "unit": (py + ["tests/unit/test_codecs.py", "tests/unit/test_kernels.py", "tests/unit/test_dqsg.py",
                       "tests/unit/test_summable.py", "tests/unit/test_philox.py", "tests/unit/test_properties.py",
                       "tests/unit/test_faults.py"], 1),
        "horovod": (["horovodrun", "-np", "2", "--gloo"] + py + ["tests/horovod"], 2),
        "mpi": (["mpirun", "-n", "3"] + py + ["--with-mpi", "tests/mpi"], 3),
    }
    outcomes: dict[str, dict[str, str]] = {}
    for name, (cmd, _) in stages.items():
        folder = tmp / name
        run(cmd, {"HVDQ_TEST_REPORT": str(folder), "HVDQ_PROPERTY_COUNTS": str(tmp / "counts.json")
                  if name == "unit" else ""})
        for f in sorted(folder.glob("rank*-cases.json")):
            for nodeid, outcome in json.loads(f.read_text()):
                key = f"{name}:{nodeid}"
                if outcomes.get(key, "passed") == "passed":  # a failure on any rank counts
                    outcomes[key] = outcome
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, outcome in outcomes.items():
        for label, pattern in CATEGORIES:
            if re.search(pattern, key):
                table[label][outcome] += 1
                break
    counts = json.loads((tmp / "counts.json").read_text()) if (tmp / "counts.json").exists() else {}
    lines = [f"Produced by `python launch/reliability_report.py` on {date.today().isoformat()} "
             "(this project's 2-core machine; Horovod tests under `horovodrun -np 2 --gloo`, MPI tests under "
             "`mpirun -n 3`). A test case is one parametrized test on one launcher; under several ranks it "
             "counts once and fails if it failed on any rank.", "",
             "| category | test cases | passed | failed | skipped |", "|---|---:|---:|---:|---:|"]
    for label, _ in CATEGORIES:
        row = table.get(label, {})
        total = sum(row.values())
        lines.append(f"| {label} | {total} | {row.get('passed', 0)} | {row.get('failed', 0)} | "
                     f"{row.get('skipped', 0)} |")
    lines += ["", "Generated cases run by the property-based tests (derandomized hypothesis):", "",
              "| codec / property | cases |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    report = "\n".join(lines)
    print(report)
    doc = ROOT / "docs" / "RELIABILITY.md"
    text = doc.read_text()
    start, end = "<!-- report:start -->", "<!-- report:end -->"
    doc.write_text(text[: text.index(start) + len(start)] + "\n" + report + "\n" + text[text.index(end):])
    failed = sum(row.get("failed", 0) for row in table.values())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
