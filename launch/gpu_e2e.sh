#!/usr/bin/env bash
# On the device: `bash launch/gpu_carry.sh` here, then one run call (carry [".gpu"], timeout_s 540): `bash launch/gpu_check.sh; bash launch/gpu_e2e.sh` (both write to the tool's $OUT)
#
# GPU end to end, under 3 minutes on one H200 with 16 cores: NP ranks (default 4) share the GPU
# over Gloo, the kernels from the offline kit (.gpu/, checked by launch/gpu_env.sh; nothing is built
# or downloaded here). Parts, run side by side (JOBS at a time), each ending in one line
# "PASS <part>: <details>" or "FAIL <part>: <why>":
#   ddp-*   the main job under torchrun with the hvdquant DDP hook: DQSG s=1 over the summable
#           allreduce (the README's DDP example) and NDQSG over allgather;
#   hvd-*   the main job under Horovod (the kit's CPU-only Gloo build: payloads staged through host
#           memory): the stock path (hvd.DistributedOptimizer + hvdquant.Compression.dqsg), and the
#           payload path (hvdquant.DistributedOptimizer) with QSGD s=4 over allgather and DQSG over
#           scatter_reduce;
#           a run passes when its replicas end bit-identical and CUDA kernels ran (its JSON summary);
#   codes   launch/gpu_e2e_codes.py: every codec's codes and decoded values on the GPU equal the
#           CPU's on real gradients (both dither families), and so does everything the adapters'
#           exchanges hand to the collectives; plus each run's codec time per step.
# Ends with one line "gpu_e2e: PASS 6/6 in S s" or "gpu_e2e: FAIL k/6 in S s: <parts>"; exits 1 on
# any FAIL. Results in $OUT (default runs/gpu_e2e): gpu_e2e.log and gpu_e2e.json (the verdicts, the
# codes tables, every run's summary). Step times are measured with the parts running side by side
# (JOBS=1: one after another, undisturbed step times, in more than 3 minutes).
#
#   bash launch/gpu_e2e.sh
#   DRY_RUN=1 bash launch/gpu_e2e.sh    # no GPU: --device cpu, the codes part in Numba's CUDA
#                                       # simulator, NP=2, STEPS=5 (a few minutes on 2 cores)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="$(realpath -m "${OUT:-runs/gpu_e2e}")"
mkdir -p "$OUT_DIR"
if [ "${DRY_RUN:-0}" = 1 ]; then
    TARGET=cpu NP="${NP:-2}" STEPS="${STEPS:-5}" JOBS="${JOBS:-1}" LIMIT=600 DRY=(--dry-run --steps 2)
    export NUMBA_ENABLE_CUDASIM=1
    [ -x .venv/bin/python ] && export PYTHON="${PYTHON:-$PWD/.venv/bin/python}"  # launch/gpu_env.sh's python
else
    TARGET=cuda NP="${NP:-4}" STEPS="${STEPS:-100}" JOBS="${JOBS:-6}" LIMIT=150 DRY=()
    unset NUMBA_ENABLE_CUDASIM
fi
# one thread per rank for torch; compiled CPU kernels shared between the processes
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/hvdquant-numba-cache}"
if [ -z "${HVDQ_FASHION_MNIST:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    export HVDQ_FASHION_MNIST="$PWD/.gpu/fashion-mnist"
fi

# The training runs: name -> the main job's flags (ddp-* under torchrun, hvd-* under Horovod).
RUNS=(ddp-dqsg-allreduce ddp-ndqsg-allgather hvd-dqsg-stock hvd-qsgd-allgather hvd-dqsg-scatter_reduce)
declare -A FLAGS=(
    [ddp-dqsg-allreduce]="--framework ddp --compression dqsg --reducer allreduce"
    [ddp-ndqsg-allgather]="--framework ddp --compression ndqsg --reducer allgather"
    [hvd-dqsg-stock]="--framework horovod --compression dqsg --reducer stock"
    [hvd-qsgd-allgather]="--framework horovod --compression qsgd --levels 4 --reducer allgather"
    [hvd-dqsg-scatter_reduce]="--framework horovod --compression dqsg --reducer scatter_reduce"
)

WORK="$(mktemp -d)"
STARTED=() REPORTED=()

# why LOG RC LIMIT: the reason a part failed, from its output: a "FAILED: " line of its checker, else
# the first exception a rank raised (not the launchers' own wrap-up), else its exit status.
why() {
    local log=$1 rc=$2 limit=$3 line
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "timed out after $limit s"; return; fi
    line=$(grep -a '^FAILED: ' "$log" | tail -n 1)
    [ -n "$line" ] && { echo "${line#FAILED: }"; return; }
    line=$(grep -aE '(^|[]>:] ?)[A-Za-z_][A-Za-z0-9_.]*(Error|Exception): ' "$log" \
           | grep -avE 'ChildFailedError|Horovod detected that one or more processes exited' | head -n 1)
    [ -n "$line" ] && { echo "$line" | sed -E 's/^(\[[^]]*\]:? ?(<std(out|err)>:)?)? *//'; return; }
    echo "exit $rc (see its output)"
}

# part NAME LIMIT CMD... [-- CHECK...]: runs CMD in the background (at most JOBS parts at a time), then
# CHECK if CMD succeeded; output in $WORK/NAME.log, verdict ("PASS details" or "FAIL why") and
# seconds in $WORK/NAME.verdict. A part never stops the others.
part() {
    local name=$1 limit=$2 cmd=() check=()
    shift 2
    while [ $# -gt 0 ] && [ "$1" != -- ]; do cmd+=("$1"); shift; done
    [ $# -gt 0 ] && { shift; check=("$@"); }
    while [ "$(jobs -pr | wc -l)" -ge "$JOBS" ]; do sleep 1; report; done
    STARTED+=("$name")
    (
        t0=$SECONDS
        echo "\$ ${cmd[*]}"
        timeout --kill-after=10 "$limit" "${cmd[@]}"
        rc=$?
        if [ "$rc" != 0 ]; then
            verdict="FAIL $(why "$WORK/$name.log" "$rc" "$limit")"
        elif [ ${#check[@]} -eq 0 ]; then
            verdict="PASS $(grep -av '^ *$' "$WORK/$name.log" | tail -n 1)"
        elif details=$("${check[@]}"); then
            verdict="PASS ${details##*$'\n'}"
        else
            verdict="FAIL ${details##*FAILED: }"
        fi
        printf '%s\n%s\n' "$verdict" $((SECONDS - t0)) >"$WORK/$name.verdict"
    ) >"$WORK/$name.log" 2>&1 &
}

# skip NAME WHY: a part that cannot run fails without running.
skip() {
    STARTED+=("$1")
    printf 'FAIL %s\n0\n' "$2" >"$WORK/$1.verdict"
}

# report: prints every finished part not yet printed: its output (without progress bars), then its
# PASS/FAIL line.
report() {
    local name verdict seconds
    for name in "${STARTED[@]}"; do
        [[ " ${REPORTED[*]} " == *" $name "* ]] && continue
        [ -f "$WORK/$name.verdict" ] || continue
        { read -r verdict; read -r seconds; } <"$WORK/$name.verdict"
        printf '\n== %s (%s s)\n' "$name" "$seconds"
        [ -f "$WORK/$name.log" ] && tr '\r' '\n' <"$WORK/$name.log" | grep -avE '[0-9]+/[0-9]+ \[|^(\[[0-9]+\]<stderr>:)? *$'
        echo "${verdict%% *} $name: ${verdict#* }"
        printf '%s\t%s\t%s\t%s\n' "$name" "${verdict%% *}" "$seconds" "${verdict#* }" >>"$WORK/verdicts.tsv"
        REPORTED+=("$name")
    done
}

main() {
    local t0=$SECONDS
    trap 'rm -rf "$WORK" "${SHIM:-}"' EXIT
    echo "== $(date -u +%FT%TZ) gpu_e2e: NP=$NP STEPS=$STEPS JOBS=$JOBS DRY_RUN=${DRY_RUN:-0}" \
         "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
    # shellcheck source=launch/gpu_env.sh
    if ! source launch/gpu_env.sh; then
        echo "gpu_e2e: FAIL: $GPU_ENV_FAIL (no part ran)"
        return 1
    fi

    local run_args=() name launcher hvd_missing="" failed=() list
    for name in "${RUNS[@]}"; do run_args+=(--run "$name=${FLAGS[$name]}"); done
    part codes $((LIMIT + 30)) "$PY" launch/gpu_e2e_codes.py --ranks "$NP" --out "$WORK/codes.json" "${run_args[@]}" "${DRY[@]}"

    "$PY" -c "import horovod.torch" 2>/dev/null \
        || hvd_missing="Horovod is not importable: the kit's Horovod wheel is missing (.gpu/, bash launch/gpu_carry.sh)"
    for name in "${RUNS[@]}"; do
        if [[ $name == ddp-* ]]; then
            launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NP")
        elif [ -z "$hvd_missing" ]; then
            launcher=("$PY" -m horovod.runner.launch -np "$NP" -H "localhost:$NP" --gloo "$PY")
        else
            skip "$name" "$hvd_missing"
            continue
        fi
        # shellcheck disable=SC2086 # FLAGS holds words
        part "$name" "$LIMIT" "${launcher[@]}" -m hvdquant.examples.train --device "$TARGET" --epochs 1 \
            --max-steps "$STEPS" --out "$WORK/runs/$name" ${FLAGS[$name]} \
            -- "$PY" launch/gpu_report.py run "$WORK/runs/$name" --target "$TARGET"
    done
    while [ -n "$(jobs -pr)" ]; do sleep 1; report; done
    wait
    report

    echo
    "$PY" launch/gpu_report.py e2e "$WORK" "$OUT_DIR/gpu_e2e.json" || echo "(gpu_e2e.json could not be written)"
    for name in "${STARTED[@]}"; do
        grep -q '^PASS' "$WORK/$name.verdict" || failed+=("$name")
    done
    if [ ${#failed[@]} -eq 0 ]; then
        echo "gpu_e2e: PASS ${#STARTED[@]}/${#STARTED[@]} in $((SECONDS - t0)) s"
    else
        printf -v list '%s, ' "${failed[@]}"
        echo "gpu_e2e: FAIL ${#failed[@]}/${#STARTED[@]} in $((SECONDS - t0)) s: ${list%, }"
        return 1
    fi
}

main 2>&1 | tee "$OUT_DIR/gpu_e2e.log"
exit "${PIPESTATUS[0]}"
