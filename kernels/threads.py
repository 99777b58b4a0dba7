"""How many threads a CPU kernel call uses: fast by default, with no environment variables set.

Numba's ``parallel=True`` kernels are fork-join regions: a launch returns when every thread of its
team has run its share, and idle team members spin. Where more threads are runnable than there are
cores (two ranks on a 2-core host each with a team of 2, another job, torch's OpenMP team), a launch
waits for a descheduled member's time slice, which can cost a thousand times the kernel's own
time, and on an idle machine a second thread saves at most half (docs/BENCHMARKS.md, "Kernels on
the CPU: why a call picks its threads"). Hence, per call
(:func:`plan`, with the cost units :mod:`.ops` passes):

- below :data:`SERIAL_BELOW` units of work (memory-bound kernels below 2^24 elements, Philox-driven
  range kernels below 2^20), or with a budget of one thread: the kernel's serial twin (:mod:`.cpu`
  compiles every loop a second time without ``parallel=True``). It runs on the calling thread, wakes
  no thread and does not start Numba's threading layer;
- otherwise the parallel kernel on ``min(budget, numba.get_num_threads())`` threads. The budget is
  the usable cores (affinity mask, cgroup CPU quota) divided by the ranks on this host
  (``OMPI_COMM_WORLD_LOCAL_SIZE``, ``HOROVOD_LOCAL_SIZE``, ``LOCAL_WORLD_SIZE``, ``MPI_LOCALNRANKS``,
  which the launchers set; 1 rank if none is), or the user's explicit ``NUMBA_NUM_THREADS``. The
  count is set for the call and restored after (``numba.set_num_threads`` is per calling thread, and
  a lower value a user set there stands).

No threading layer is chosen here: an explicit ``NUMBA_THREADING_LAYER`` (or its priority list) is
the user's, and Numba's default (tbb if installed, else omp) serves the parallel path (workqueue
aborts the process when two Python threads launch kernels at once). What remains slow under load is
torch's own thread team; ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` are the user's to set.

torch's settings stay as they are. In pip wheels Numba's OpenMP layer binds to the libgomp torch
loaded, and starting the layer calls ``omp_set_num_threads(NUMBA_NUM_THREADS)`` on it: it turned
``torch.set_num_threads(1)`` back into 2 (and ``NUMBA_NUM_THREADS=1`` made torch single-threaded).
Small calls no longer start the layer; the first parallel call puts torch's count back if the start
changed it.

The choice never changes results: every ``prange`` iteration writes its own outputs and every
reduction runs in a fixed order inside one iteration, so serial twins and parallel kernels give the
same bits on any number of threads (tests/unit/test_threads.py).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numba

SERIAL_BELOW = 1 << 24
"""Cost units of work below which a call runs serially: one unit per element of a memory-bound
kernel (bucket_absmax: 0.55 ns per element on one core here)."""

RANGE_COST = 16
"""Units per element of a Philox-driven range kernel (dqsg_encode: 6.5 ns per element, 12x
bucket_absmax): these go parallel from 2^20 elements, the others from 2^24."""

LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "HOROVOD_LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS")

_layer_started = False
_lock = threading.Lock()


@functools.cache
def usable_cores() -> int:
    """Cores this process may use: its affinity mask (which container CPU sets narrow), capped by a
    cgroup CPU quota (``docker --cpus``) where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _cgroup_cpu_quota() -> int | None:
    """⌈quota / period⌉ CPUs from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                quota = f.read().strip()
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                period = f.read().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return -(-q // p) if q > 0 and p > 0 else None


def local_ranks() -> int:
    """Ranks sharing this host, from the launcher's environment (1 when no launcher says)."""
    for var in LOCAL_SIZE_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def budget() -> int:
    """Threads one call may use: the user's NUMBA_NUM_THREADS if set, else usable cores // local
    ranks (at least 1)."""
    if "NUMBA_NUM_THREADS" in os.environ:
        return max(1, int(numba.config.NUMBA_NUM_THREADS))
    return max(1, usable_cores() // local_ranks())


def plan(work: int) -> int:
    """Threads for a call of ``work`` cost units (1: the serial twin)."""
    return 1 if work < SERIAL_BELOW else budget()


@contextmanager
def using(threads: int) -> Iterator[int]:
    """Run the body with this thread's Numba thread count at ``threads``, never more than it is
    now (a user's ``numba.set_num_threads`` stands); yields the count in force and restores the old
    one after. Starts Numba's threading layer on first use, leaving torch's thread count as it was."""
    current = _start_layer()
    n = max(1, min(threads, current))
    if n == current:
        yield n
        return
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(current)


def _start_layer() -> int:
    """numba.get_num_threads(), which starts the threading layer the first time; torch's intra-op
    thread count is put back if that start changed it (a shared OpenMP runtime)."""
    global _layer_started
    if _layer_started:
        return numba.get_num_threads()
    import torch

    with _lock:
        before = torch.get_num_threads()
        current = numba.get_num_threads()
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        _layer_started = True
    return current
