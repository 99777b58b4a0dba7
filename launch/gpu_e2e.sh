#!/usr/bin/env bash
# GPU end to end, one command for a CUDA machine (budget: under 5 minutes on one H200 with 16 cores,
# Horovod's build included). NP ranks share the GPU(s) round-robin:
#   1. DDP (torchrun; Gloo on one GPU since NCCL refuses two ranks per device, NCCL with one GPU per
#      rank): the main job with the hvdquant hook, DQSG on the summable allreduce and NDQSG on
#      allgather, STEPS steps each;
#   2. Horovod (the CPU-only build of launch/build_horovod.sh, Gloo, payloads staged through host
#      memory): the stock path (hvd.DistributedOptimizer + hvdquant.Compression.dqsg) and the
#      payload path (hvdquant.DistributedOptimizer, QSGD over allgather);
#      every run checks that its replicas end bit-identical (it fails otherwise) and records its
#      median step time and how many kernel launches ran on "cuda";
#   3. launch/gpu_e2e_codes.py: every codec's codes on the GPU equal the CPU twins' on real
#      gradients, and the codec's GPU time per step beside each run's step time (its share).
# Results: $OUT (default runs/gpu_e2e/): the runs' JSON, gpu_e2e.json, gpu_e2e.log.
#
#   bash launch/gpu_e2e.sh
#   STEPS=100 NP=2 bash launch/gpu_e2e.sh
#   DRY_RUN=1 bash launch/gpu_e2e.sh      # no GPU: --device cpu, kernels in Numba's CUDA simulator
#
# Needs python3 with torch (CUDA), numba-cuda, scikit-learn, tqdm; Fashion-MNIST under
# HVDQ_FASHION_MNIST (default /usr/share/datasets/fashion-mnist; else .gpu/fashion-mnist in the
# checkout). Horovod: used if importable, else built from HVDQ_HOROVOD_SDIST (default
# .gpu/horovod-0.28.1.tar.gz, else downloaded); SKIP_HOROVOD=1 leaves part 2 out (reported).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
OUT_DIR="$(realpath -m "${OUT:-runs/gpu_e2e}")"
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/train-*.json
NP="${NP:-4}" STEPS="${STEPS:-300}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/hvdquant-numba-cache}"
if [ "${DRY_RUN:-0}" = 1 ]; then DEVICE=cpu; export NUMBA_ENABLE_CUDASIM=1; else DEVICE=cuda; unset NUMBA_ENABLE_CUDASIM; fi
if [ -z "${HVDQ_FASHION_MNIST:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    export HVDQ_FASHION_MNIST="$ROOT/.gpu/fashion-mnist"
fi

source launch/gpu_env.sh
failed=()
t_start=$SECONDS
step() { printf '\n== [%ss] %s\n' $((SECONDS - t_start)) "$*"; }
run() {  # run NAME TIMEOUT CMD...: a training run; failure is recorded, the script goes on
    local name=$1 limit=$2; shift 2
    step "$name: $*"
    timeout --kill-after=10 "$limit" "$@" || failed+=("$name (exit $?)")
}
JOB=(-m hvdquant.examples.train_fashion_mnist --device "$DEVICE" --epochs 1 --max-steps "$STEPS" --out "$OUT_DIR")

{
    step "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
    "$PY" -c "import torch, numba; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'gpus', torch.cuda.device_count(), 'numba', numba.__version__)"
    if [ "$DEVICE" = cuda ] && ! "$PY" launch/cuda_probe.py; then
        echo "gpu_e2e: FAILED: no CUDA compiler for Numba"; exit 1
    fi

    # ------------------------------------------------------------ 1. DDP hook
    run ddp-dqsg-allreduce 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NP" \
        "${JOB[@]}" --framework ddp --compression dqsg --reducer allreduce
    run ddp-ndqsg-allgather 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NP" \
        "${JOB[@]}" --framework ddp --compression ndqsg --reducer allgather

    # ------------------------------------------------------------ 2. Horovod (CPU-only build, staged payloads)
    if [ "${SKIP_HOROVOD:-0}" = 1 ]; then
        failed+=("horovod (SKIP_HOROVOD=1: not run)")
    else
        if ! "$PY" -c "import horovod.torch" 2>/dev/null; then
            SDIST="${HVDQ_HOROVOD_SDIST:-$ROOT/.gpu/horovod-0.28.1.tar.gz}"
            [ -f "$SDIST" ] || SDIST=0.28.1
            step "building Horovod (Gloo, CPU operations) from $SDIST"
            HVD_SITE="$(mktemp -d)"
            if HVDQ_HOROVOD_MPI=0 timeout 240 bash launch/build_horovod.sh "$PY" "$SDIST" "$HVD_SITE/wheel" \
               && "$PY" -m pip install -q --no-deps --no-index --target "$HVD_SITE/site" "$HVD_SITE"/wheel/horovod-*.whl; then
                export PYTHONPATH="$PYTHONPATH:$HVD_SITE/site" PATH="$HVD_SITE/site/bin:$PATH"
            else
                failed+=("horovod build")
            fi
        fi
        if "$PY" -c "import horovod.torch" 2>/dev/null; then
            HVDRUN=("$PY" -m horovod.runner.launch -np "$NP" -H "localhost:$NP" --gloo)
            run horovod-dqsg-stock 150 "${HVDRUN[@]}" "$PY" "${JOB[@]}" --compression dqsg --reducer stock
            run horovod-qsgd-allgather 150 "${HVDRUN[@]}" "$PY" "${JOB[@]}" --compression qsgd --reducer allgather
        fi
    fi

    # ------------------------------------------------------------ 3. codes GPU = CPU, codec share
    step "codes and codec share"
    dry=(); [ "${DRY_RUN:-0}" = 1 ] && dry=(--dry-run)
    timeout 120 "$PY" launch/gpu_e2e_codes.py --ranks "$NP" --runs "$OUT_DIR" --out "$OUT_DIR" "${dry[@]}" \
        || failed+=("codes (exit $?)")

    step "done in $((SECONDS - t_start)) s"
    if [ "${#failed[@]}" -gt 0 ]; then
        echo "gpu_e2e: FAILED: ${failed[*]}"
    else
        echo "gpu_e2e: passed (DDP and Horovod runs bit-identical, GPU codes = CPU codes)"
    fi
} 2>&1 | tee "$OUT_DIR/gpu_e2e.log"
rm -rf "$SHIM"
grep -q "^gpu_e2e: passed" "$OUT_DIR/gpu_e2e.log"
