# Sourced by the launchers: the checkout's virtual environment and Open MPI settings.
HVDQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVDQ_VENV:-$HVDQ_ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "no virtual environment at $VENV: run 'bash launch/setup.sh' first" >&2
    exit 1
fi
export PATH="$VENV/bin:$PATH"
# Open MPI refuses to start as root without these (containers, CI).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# More ranks than cores (this project's machines have 2) need oversubscription.
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
# No NUMBA_NUM_THREADS: hvdquant's kernels choose their threads themselves (kernels/threads.py),
# as they must in users' jobs, which set no thread variables. OMP_NUM_THREADS=1 is for torch, not
# for the kernels: torch's CPU results depend on its thread count (a small CNN's gradients differ
# between 1 and 2 threads), every result recorded in docs/ ran torch on one thread per rank, and the
# test stages put up to 5 ranks on 2 cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
cd "$HVDQ_ROOT"
