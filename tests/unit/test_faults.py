"""A rank killed mid-training (SIGKILL) under mpirun and under horovodrun: the job must end with a
non-zero exit and a message within 60 seconds, never hang (docs/RELIABILITY.md)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "faults" / "kill_rank.py"
BIN = Path(sys.executable).parent


def launch(cmd: list[str]) -> tuple[int, float, str]:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PATH=f"{BIN}:{os.environ['PATH']}")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd[0]} still running after 90 s: the survivors hung\n{e.stdout}\n{e.stderr}")
    return proc.returncode, time.monotonic() - t0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI")
@pytest.mark.parametrize("path", ["stock", "payload"])
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo", "horovodrun-mpi"])
def test_killed_rank_ends_the_job(launcher, path):
    py = [sys.executable, str(SCRIPT), path]
    cmd = {"mpirun": ["mpirun", "-n", "2", *py],
           "horovodrun-gloo": [str(BIN / "horovodrun"), "-np", "2", "--gloo", *py],
           "horovodrun-mpi": [str(BIN / "horovodrun"), "-np", "2", "--mpi", *py]}[launcher]
    rc, seconds, out = launch(cmd)
    assert rc != 0, out
    assert seconds < 60, f"took {seconds:.0f} s"
    assert "unreachable" not in out
    assert any(s in out.lower() for s in ("signal 9", "killed", "exit with status", "exited", "terminated")), out
