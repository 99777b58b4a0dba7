#!/usr/bin/env bash
# hvdquant test command: lint, unit tests, pytest-mpi tests under mpirun -n 2 and -n 4, then
# Horovod tests under horovodrun -np 2 with Gloo and with MPI. Exits non-zero if any stage fails
# or if any rank of a stage ran no test. Logs: runs/test-logs/.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
LOGS="$HVDQ_ROOT/runs/test-logs"
mkdir -p "$LOGS"
PYTEST=(python -m pytest -q --color=no -p no:cacheprovider)
failed=()
summary=()

# run_stage NAME RANKS CMD...: runs CMD, requires exit 0 and a "N passed" line from each of RANKS ranks.
run_stage() {
    local name=$1 ranks=$2; shift 2
    local log="$LOGS/$name.log"
    printf '\n===== %s: %s\n' "$name" "$*"
    local t0=$SECONDS
    timeout --kill-after=30 "${HVDQ_STAGE_TIMEOUT:-900}" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local passed_lines
    passed_lines=$(grep -aEc '[0-9]+ passed' "$log")
    local totals
    totals=$(grep -aEo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
    if [ "$rc" -ne 0 ]; then
        failed+=("$name (exit $rc)")
    elif [ "$passed_lines" -lt "$ranks" ]; then
        failed+=("$name (only $passed_lines of $ranks ranks reported passed tests)")
    elif grep -aqE '[0-9]+ failed|[0-9]+ error' "$log"; then
        failed+=("$name (failures in log)")
    fi
    summary+=("$(printf '%-16s exit %-3s %4s tests passed over %s rank(s) in %ss' "$name" "$rc" "$totals" "$ranks" $((SECONDS - t0)))")
}

run_stage lint 1 bash -c 'ruff check . && echo "1 passed (ruff)"'
run_stage unit 1 "${PYTEST[@]}" tests/unit
run_stage mpi-n2 2 mpirun -n 2 "${PYTEST[@]}" --with-mpi tests/mpi
run_stage mpi-n4 4 mpirun -n 4 "${PYTEST[@]}" --with-mpi tests/mpi
run_stage horovod-gloo 2 horovodrun -np 2 --gloo "${PYTEST[@]}" tests/horovod
run_stage horovod-mpi 2 horovodrun -np 2 --mpi "${PYTEST[@]}" tests/horovod

printf '\n===== summary\n'
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all stages passed"
