"""Shared test setup.

CUDA kernels are tested on machines without a GPU through Numba's CUDA simulator; this must be
switched on before numba.cuda is first imported. launch/gpu_check.sh sets HVDQ_REAL_GPU=1 to test
them on a real GPU instead.
"""

import os

if os.environ.get("HVDQ_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


def _rank() -> str:
    for var in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK", "RANK"):  # RANK: torchrun
        if var in os.environ:
            return os.environ[var]
    return "0"


_OUTCOMES: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _OUTCOMES.append((report.nodeid, report.outcome))


def pytest_sessionfinish(session, exitstatus):
    """With HVDQ_TEST_REPORT=<dir>, every rank writes <dir>/rank<R>.json with its own counts, so
    launch/test.sh can require that each rank ran tests (interleaved stdout cannot tell).
    With HVDQ_PROPERTY_COUNTS=<file>, the property-test case counts are written there."""
    import sys

    counts_file = os.environ.get("HVDQ_PROPERTY_COUNTS")
    if counts_file and "property_counts" in sys.modules:
        import json

        with open(counts_file, "w") as f:
            json.dump(dict(sys.modules["property_counts"].COUNTS), f)
    folder = os.environ.get("HVDQ_TEST_REPORT")
    if not folder:
        return
    import json
    from pathlib import Path

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter else {}
    counts = {k: len(v) for k, v in stats.items() if k in ("passed", "failed", "error", "skipped")}
    counts["exitstatus"] = int(exitstatus)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{_rank()}.json").write_text(json.dumps(counts))
    (Path(folder) / f"rank{_rank()}-cases.json").write_text(json.dumps(_OUTCOMES))
