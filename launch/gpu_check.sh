#!/usr/bin/env bash
# One command for a CUDA machine (numba-cuda + torch; no Horovod, no network needed):
#   1. the kernel tests on the real GPU: every CUDA kernel against its CPU twin (bit-exact codes and
#      packed bytes, decoded floats within 1 ulp), plus the CPU reference tests;
#   2. a throughput table (GB/s of float32 gradient for encode+pack and unpack+decode per codec,
#      sizes 1e6 .. 1e9) beside a device-to-device copy measured in the same run.
# Budget: under 4 minutes on an H200. Results: runs/gpu_check/ (log, JSON, PNG).
#   bash launch/gpu_check.sh            # all sizes
#   SIZES="1e6 1e7" bash launch/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HVDQ_REAL_GPU=1
unset NUMBA_ENABLE_CUDASIM
source launch/gpu_env.sh

{
    echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
    "$PY" -c "import torch, numba; from numba import cuda; print('torch', torch.__version__, 'numba', numba.__version__, 'cuda ok', cuda.is_available(), cuda.get_current_device().name)"
    "$PY" launch/cuda_probe.py || exit 1
    echo "== kernel tests on the GPU"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_kernels_cuda.py tests/unit/test_kernels.py
    echo "== throughput"
    # shellcheck disable=SC2086
    timeout 150 "$PY" launch/bench_kernels.py --device cuda --sizes ${SIZES:-1e6 1e7 1e8 1e9} --repeats 5 \
        --no-torch-ref --out "$OUT_DIR"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
