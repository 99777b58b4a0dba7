#!/usr/bin/env bash
# On the device: `bash launch/gpu_carry.sh` here, then one run call (carry [".gpu"], timeout_s 540): `bash launch/gpu_check.sh; bash launch/gpu_e2e.sh` (both write to the tool's $OUT)
#
# The kernels on a CUDA machine, under 3 minutes on one H200 (the offline kit .gpu/ checked and
# installed by launch/gpu_env.sh; nothing is built or downloaded here). Parts, each ending in one
# line "PASS <part>: <details>" or "FAIL <part>: <why>", the second running whatever the first gave:
#   kernel-tests  the kernel tests on the GPU: every CUDA kernel against its CPU twin (codes and packed
#                 bytes bit for bit, decoded floats), the CPU reference tests, and the PTX checks of
#                 the code-deciding kernels where tests/unit/test_ptx.py exists;
#   throughput    launch/bench_kernels.py: GB/s of float32 gradient for encode+pack and unpack+decode
#                 per codec at SIZES (default "1e6 1e8") beside a device-to-device copy.
# Ends with one line "gpu_check: PASS 2/2 in S s" or "gpu_check: FAIL k/2 in S s: <parts>"; exits 1
# on any FAIL. Results in $OUT (default runs/gpu_check): gpu_check.log, gpu_check.json (verdicts,
# test counts and failures, throughput rows) and gpu_check.png (the throughput plot).
#
#   bash launch/gpu_check.sh
#   DRY_RUN=1 bash launch/gpu_check.sh   # no GPU: the tests in Numba's CUDA simulator, the table on
#                                        # the CPU at SIZES="1e4 1e5"
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="$(realpath -m "${OUT:-runs/gpu_check}")"
mkdir -p "$OUT_DIR"
if [ "${DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu SIZES="${SIZES:-1e4 1e5}" LIMIT=600 SIDE_BY_SIDE=0
    # the simulator runs one Python thread per CUDA thread, and the test command's unit stage runs
    # every one of these tests there already: this dry run checks the kit's plumbing, with every
    # kernel case at one size (130) and no block-size sweep
    SELECT=(-k "not any_block_size and (not cpu_twin or 130)")
    export NUMBA_ENABLE_CUDASIM=1
    [ -x .venv/bin/python ] && export PYTHON="${PYTHON:-$PWD/.venv/bin/python}"  # launch/gpu_env.sh's python
    unset HVDQ_REAL_GPU
else
    DEVICE=cuda SIZES="${SIZES:-1e6 1e8}" LIMIT=120 SIDE_BY_SIDE=1 SELECT=()
    export HVDQ_REAL_GPU=1  # tests/conftest.py: the real GPU, not the simulator
    unset NUMBA_ENABLE_CUDASIM
fi
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/hvdquant-numba-cache}"
TESTS=(tests/unit/test_kernels_cuda.py tests/unit/test_kernels.py)
[ -f tests/unit/test_ptx.py ] && TESTS+=(tests/unit/test_ptx.py)
read -r -a SIZE_LIST <<<"$SIZES"
WORK="$(mktemp -d)"
PASSED=0 FAILED=()

# part NAME CMD... -- CHECK...: runs CMD, then CHECK, whose last line gives the details; prints
# "PASS NAME: details" or "FAIL NAME: why" and records the verdict. CMD exits 124 when it timed out.
part() {
    local name=$1 cmd=() t0=$SECONDS rc details verdict
    shift
    while [ "$1" != -- ]; do cmd+=("$1"); shift; done
    shift
    printf '\n== %s: %s\n' "$name" "${cmd[*]}"
    "${cmd[@]}"
    rc=$?
    details=$("$@")
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        verdict="FAIL timed out after $((SECONDS - t0)) s${details:+ (${details##*FAILED: })}"
    elif [[ $details == *FAILED:* ]]; then
        verdict="FAIL ${details##*FAILED: }"
    elif [ "$rc" != 0 ]; then
        verdict="FAIL exit $rc (see its output)"
    else
        verdict="PASS ${details##*$'\n'}"
    fi
    echo "${verdict%% *} $name: ${verdict#* }"
    printf '%s\t%s\t%s\t%s\n' "$name" "${verdict%% *}" $((SECONDS - t0)) "${verdict#* }" >>"$WORK/verdicts.tsv"
    if [ "${verdict%% *}" = PASS ]; then PASSED=$((PASSED + 1)); else FAILED+=("$name"); fi
}

# kernel_tests: one pytest per test file (reports in $WORK/pytest/<file>/), each at most LIMIT seconds,
# side by side on the device (one after another in a dry run, where they share a CPU and compiled
# kernels); prints their output in order; exits 124 if one timed out, else non-zero if one failed.
kernel_tests() {
    local i rc=0 code
    for i in "${!TESTS[@]}"; do
        if [ "$SIDE_BY_SIDE" = 1 ]; then test_file "$i" & else test_file "$i"; fi
    done
    wait
    for i in "${!TESTS[@]}"; do
        printf -- '-- %s\n' "${TESTS[$i]}"
        cat "$WORK/tests-$i.log"
        code=$(cat "$WORK/tests-$i.rc")
        { [ "$code" = 124 ] || [ "$code" = 137 ]; } && rc=124
        [ "$code" != 0 ] && [ "$rc" != 124 ] && rc=$code
    done
    return "$rc"
}

test_file() {
    HVDQ_TEST_REPORT="$WORK/pytest/$(basename "${TESTS[$1]}" .py)" timeout --kill-after=10 "$LIMIT" \
        "$PY" -m pytest -q --color=no -p no:cacheprovider "${SELECT[@]}" "${TESTS[$1]}" >"$WORK/tests-$1.log" 2>&1
    echo $? >"$WORK/tests-$1.rc"
}

main() {
    local t0=$SECONDS list
    trap 'rm -rf "$WORK" "${SHIM:-}"' EXIT
    echo "== $(date -u +%FT%TZ) gpu_check: DRY_RUN=${DRY_RUN:-0} SIZES=$SIZES" \
         "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
    # shellcheck source=launch/gpu_env.sh
    if ! source launch/gpu_env.sh; then
        echo "gpu_check: FAIL: $GPU_ENV_FAIL (no part ran)"
        return 1
    fi

    part kernel-tests kernel_tests -- "$PY" launch/gpu_report.py pytest "$WORK/pytest" "${TESTS[@]}"
    part throughput timeout --kill-after=10 "$LIMIT" \
        "$PY" launch/bench_kernels.py --device "$DEVICE" --sizes "${SIZE_LIST[@]}" --repeats 5 --no-torch-ref \
        --out "$WORK/bench" \
        -- "$PY" launch/gpu_report.py bench "$WORK/bench" --sizes "${SIZE_LIST[@]}"

    echo
    "$PY" launch/gpu_report.py check "$WORK" "$OUT_DIR/gpu_check.json" || echo "(gpu_check.json could not be written)"
    cp "$WORK"/bench/bench_kernels_*.png "$OUT_DIR/gpu_check.png" 2>/dev/null
    if [ ${#FAILED[@]} -eq 0 ]; then
        echo "gpu_check: PASS $PASSED/$PASSED in $((SECONDS - t0)) s"
    else
        printf -v list '%s, ' "${FAILED[@]}"
        echo "gpu_check: FAIL ${#FAILED[@]}/$((PASSED + ${#FAILED[@]})) in $((SECONDS - t0)) s: ${list%, }"
        return 1
    fi
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
