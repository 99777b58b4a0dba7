#!/usr/bin/env bash
# hvdquant test command: lint, unit tests, the packaging check (launch/check_wheel.sh: the built wheel,
# installed on its own, imports and trains), pytest-mpi tests under mpirun -n 1 … 5, then
# Horovod tests under horovodrun -np 2 and -np 4, each with Gloo and with MPI, then the DDP hook's tests under
# torchrun --nproc_per_node 2 and 4 (Gloo, CPU; no Horovod), then the dry runs of launch/gpu_check.sh,
# launch/gpu_e2e.sh and launch/bench_gpu_step.sh (no GPU). Exits non-zero if any stage fails or if any rank of a stage ran no
# test. Logs: runs/test-logs/.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
LOGS="$HVDQ_ROOT/runs/test-logs"
mkdir -p "$LOGS"
PYTEST=(python -m pytest -q --color=no -p no:cacheprovider)
failed=()
summary=()

# run_stage NAME RANKS CMD...: runs CMD; requires exit 0 and, from each of RANKS ranks, a report
# (tests/conftest.py writes one per rank) with passed tests and no failures or errors.
run_stage() {
    local name=$1 ranks=$2; shift 2
    local log="$LOGS/$name.log" reports="$LOGS/$name.reports"
    rm -rf "$reports"
    printf '\n===== %s: %s\n' "$name" "$*"
    local t0=$SECONDS
    HVDQ_TEST_REPORT="$reports" timeout --kill-after=30 "${HVDQ_STAGE_TIMEOUT:-1800}" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local verdict
    verdict=$(python - "$reports" "$ranks" <<'PY'
import json, pathlib, sys
folder, ranks = pathlib.Path(sys.argv[1]), int(sys.argv[2])
files = sorted(p for p in folder.glob("rank*.json") if p.stem[4:].isdigit()) if folder.is_dir() else []
reports = [json.loads(p.read_text()) for p in files]
passed = sum(r.get("passed", 0) for r in reports)
bad = [r for r in reports if r.get("failed") or r.get("error") or not r.get("passed")]
ok = len(reports) == ranks and not bad
print(f"{'ok' if ok else 'bad'} {passed} {len(reports)}")
PY
)
    read -r status total nreports <<<"$verdict"
    if [ "$rc" -ne 0 ]; then
        failed+=("$name (exit $rc)")
    elif [ "$status" != ok ]; then
        failed+=("$name ($nreports of $ranks ranks reported, each must have passed tests and no failures)")
    fi
    summary+=("$(printf '%-16s exit %-3s %4s tests passed over %s of %s rank(s) in %ss' \
        "$name" "$rc" "$total" "$nreports" "$ranks" $((SECONDS - t0)))")
}

# run_check NAME CMD...: a stage that is not pytest (no per-rank reports): CMD must exit 0. The summary
# shows CMD's last line (its verdict).
run_check() {
    local name=$1; shift
    local log="$LOGS/$name.log"
    printf '\n===== %s: %s\n' "$name" "$*"
    local t0=$SECONDS
    timeout --kill-after=30 "${HVDQ_CHECK_TIMEOUT:-600}" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && failed+=("$name (exit $rc)")
    summary+=("$(printf '%-16s exit %-3s in %ss: %s' "$name" "$rc" $((SECONDS - t0)) "$(tail -n 1 "$log" | cut -c 1-100)")")
}

printf '\n===== lint: ruff check .\n'
if ruff check .; then summary+=("lint             ruff clean"); else failed+=("lint (ruff)"); fi
run_stage unit 1 "${PYTEST[@]}" tests/unit
run_check wheel bash launch/check_wheel.sh
for n in 1 2 3 4 5; do
    run_stage "mpi-n$n" "$n" mpirun -n "$n" "${PYTEST[@]}" --with-mpi tests/mpi
done
run_stage horovod-gloo 2 horovodrun -np 2 --gloo "${PYTEST[@]}" tests/horovod
run_stage horovod-mpi 2 horovodrun -np 2 --mpi "${PYTEST[@]}" tests/horovod
run_stage horovod-gloo-4 4 horovodrun -np 4 --gloo "${PYTEST[@]}" tests/horovod
run_stage horovod-mpi-4 4 horovodrun -np 4 --mpi "${PYTEST[@]}" tests/horovod
# torchrun runs a module: "-m pytest …" (PYTEST without its leading "python -m")
for n in 2 4; do
    run_stage "ddp-gloo-$n" "$n" torchrun --standalone --nproc_per_node "$n" -m "${PYTEST[@]:2}" tests/ddp
done
# the device checks without a GPU (training on the CPU, CUDA kernels in Numba's simulator), so that
# they work the first time they meet a GPU
run_check gpu-check-dry env DRY_RUN=1 OUT=runs/gpu-dry bash launch/gpu_check.sh
run_check gpu-e2e-dry env DRY_RUN=1 OUT=runs/gpu-dry bash launch/gpu_e2e.sh
run_check gpu-step-dry env DRY_RUN=1 OUT=runs/gpu-dry/step bash launch/bench_gpu_step.sh

printf '\n===== summary\n'
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all stages passed"
