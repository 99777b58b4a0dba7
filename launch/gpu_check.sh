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
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HVDQ_REAL_GPU=1
unset NUMBA_ENABLE_CUDASIM

# hvdquant without installing it: kernels/ is importable as hvdquant.kernels through a shim folder.
SHIM="$(mktemp -d)"
cp -r hvdquant "$SHIM/hvdquant"
cp -r kernels "$SHIM/hvdquant/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
    "$PY" -c "import torch, numba; from numba import cuda; print('torch', torch.__version__, 'numba', numba.__version__, 'cuda ok', cuda.is_available(), cuda.get_current_device().name)"
    # A tiny kernel first: a numba-cuda that cannot compile (e.g. numba-cuda 0.30 with numpy >= 2.5,
    # which removed np.row_stack) would otherwise fail every test with the same traceback.
    "$PY" -c "
import numpy as np
from numba import cuda
@cuda.jit
def probe(a):
    a[0] = 1.0
a = cuda.to_device(np.zeros(1, np.float32)); probe[1, 1](a); assert a.copy_to_host()[0] == 1.0
" || { echo "gpu_check: Numba cannot compile a CUDA kernel here (numpy $("$PY" -c 'import numpy; print(numpy.__version__)')); numba-cuda 0.30 needs numpy < 2.5: put a numpy 2.3 wheel first on PYTHONPATH (docs/BENCHMARKS.md, Kernels on a GPU)"; exit 1; }
    echo "== kernel tests on the GPU"
    # -P: the working directory is not put on sys.path, so hvdquant comes from the shim (with kernels/).
    timeout 150 "$PY" -P -m pytest -q -p no:cacheprovider tests/unit/test_kernels_cuda.py tests/unit/test_kernels.py
    echo "== throughput"
    # shellcheck disable=SC2086
    timeout 150 "$PY" launch/bench_kernels.py --device cuda --sizes ${SIZES:-1e6 1e7 1e8 1e9} --repeats 5 \
        --no-torch-ref --out "$OUT_DIR"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
