#!/usr/bin/env bash
# On the device, after `bash launch/gpu_carry.sh` here (carry [".gpu"]): `bash launch/bench_gpu_step.sh`
#
# GPU step benchmark (launch/bench_gpu_step.py): ResNet-50 and GPT-2-small shapes on synthetic data,
# DDP under torchrun at P = 1 and P = 4 ranks sharing one GPU over Gloo, every method of the script
# (fp32, fp16 and PowerSGD hooks, hvdquant DQSG s=1, DQSG s=3 + rotation, ECDQ) in the same run:
# time per step, hvdquant's own GPU time per step and its share, launches per step. Under 4 minutes
# on one H200 at the defaults. The kit's Python (launch/gpu_env.sh): nothing is built or downloaded.
#   bash launch/bench_gpu_step.sh
#   MODELS=resnet50 RANKS=4 STEPS=20 bash launch/bench_gpu_step.sh
#   DRY_RUN=1 bash launch/bench_gpu_step.sh      # no GPU: small shapes on the CPU, P = 2 (a check)
# Variables: MODELS (resnet50 gpt2), RANKS (1 4), STEPS (8 timed), WARMUP (2), LIMIT (s per torchrun,
# 150), OUT ($OUT, else runs/bench_gpu_step). Ends with the table (launch/bench_gpu_step.py report)
# and "bench_gpu_step: PASS n/n runs" or "bench_gpu_step: FAIL ...".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="$(realpath -m "${OUT:-runs/bench_gpu_step}")"
mkdir -p "$OUT_DIR"
DRY=()
if [ "${DRY_RUN:-0}" = 1 ]; then
    RANKS="${RANKS:-2}" STEPS="${STEPS:-2}" WARMUP="${WARMUP:-1}" DRY=(--dry-run)
    [ -x .venv/bin/python ] && export PYTHON="${PYTHON:-$PWD/.venv/bin/python}"
fi
: "${MODELS:=resnet50 gpt2}" "${RANKS:=1 4}" "${STEPS:=8}" "${WARMUP:=2}" "${LIMIT:=150}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/hvdquant-numba-cache}"
# shellcheck source=launch/gpu_env.sh
source launch/gpu_env.sh || exit 1
start=$SECONDS
runs=0
failed=()
for model in $MODELS; do
    for np in $RANKS; do
        runs=$((runs + 1))
        if ! timeout --kill-after=10 "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$np" \
                launch/bench_gpu_step.py --model "$model" --steps "$STEPS" --warmup "$WARMUP" --out "$OUT_DIR" \
                "${DRY[@]}" > "$OUT_DIR/$model-P$np.log" 2>&1; then
            failed+=("$model P=$np ($(grep -aE '[A-Za-z]+(Error|Exception): ' "$OUT_DIR/$model-P$np.log" | head -n 1 | cut -c 1-160))")
        fi
        tail -n 3 "$OUT_DIR/$model-P$np.log"
    done
done
"$PY" launch/bench_gpu_step.py report --runs "$OUT_DIR" || failed+=("report")
if [ ${#failed[@]} -eq 0 ]; then
    echo "bench_gpu_step: PASS $runs/$runs runs in $((SECONDS - start)) s"
else
    echo "bench_gpu_step: FAIL ${#failed[@]} of $runs in $((SECONDS - start)) s: ${failed[*]}"
    exit 1
fi
