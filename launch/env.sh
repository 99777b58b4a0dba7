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
# Keep each rank to one thread: ranks already share the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" NUMBA_NUM_THREADS="${NUMBA_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
cd "$HVDQ_ROOT"
