#!/usr/bin/env bash
# hvdquant setup: system packages, a virtual environment in the checkout, torch (CPU, pinned),
# numba, mpi4py, pytest(-mpi), Horovod 0.28.1 built from source with PyTorch + MPI + Gloo, and
# hvdquant itself in editable mode. Idempotent; run as root on Debian 12 (or with sudo).
#
# Environment knobs:
#   HVDQ_VENV         virtual environment path         (default: <checkout>/.venv)
#   HVDQ_WHEEL_CACHE  where the built Horovod wheel is cached, outside the checkout
#                     (default: ~/.cache/hvdquant/wheels)
#   HVDQ_SKIP_APT=1   skip apt-get (when the system packages are known to be there)
#   HVDQ_GPU=1        GPU build (opt-in; not run by CI, which has no GPU): torch==$TORCH_VERSION with
#                     CUDA from HVDQ_TORCH_INDEX (default https://download.pytorch.org/whl/cu130) and
#                     Horovod with GPU operations over NCCL (HOROVOD_GPU_OPERATIONS=NCCL; needs nvcc
#                     from the CUDA toolkit on PATH; launch/build_horovod.sh). Cached apart from the
#                     CPU wheel. Without it Horovod is CPU-only and hvdquant stages CUDA payloads
#                     through host memory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVDQ_VENV:-$ROOT/.venv}"
CACHE="${HVDQ_WHEEL_CACHE:-$HOME/.cache/hvdquant/wheels}"
PY="${PYTHON:-python3}"
TORCH_VERSION=2.13.0
HOROVOD_VERSION=0.28.1
log() { printf '\n[setup] %s\n' "$*"; }
GPU="${HVDQ_GPU:-0}"
GPU_NOTE=""; GPU_KEY=""; CHECKS=(PyTorch MPI Gloo)
if [ "$GPU" = 1 ]; then
    GPU_NOTE=" + NCCL GPU operations"; GPU_KEY="-gpu"; CHECKS+=(NCCL)
    command -v nvcc >/dev/null || { echo "[setup] ERROR: HVDQ_GPU=1 needs nvcc (the CUDA toolkit) on PATH" >&2; exit 1; }
fi

# ---------------------------------------------------------------- system packages
APT_PKGS=(openmpi-bin libopenmpi-dev cmake g++ make iproute2 dataset-fashion-mnist)
if [ "${HVDQ_SKIP_APT:-0}" != 1 ]; then
    missing=()
    for p in "${APT_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        log "apt-get install ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        log "system packages present"
    fi
fi

# ---------------------------------------------------------------- virtual environment
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel

if [ "$GPU" = 1 ]; then
    log "installing torch==$TORCH_VERSION (CUDA) and Python dependencies"
    "${PIP[@]}" "torch==$TORCH_VERSION" --index-url "${HVDQ_TORCH_INDEX:-https://download.pytorch.org/whl/cu130}"
else
    log "installing torch==$TORCH_VERSION (CPU) and Python dependencies"
    "${PIP[@]}" "torch==$TORCH_VERSION"
fi
# Horovod's own runtime needs (it is installed --no-deps below) and the build's tools.
"${PIP[@]}" cloudpickle psutil pyyaml packaging cffi
"${PIP[@]}" numpy numba numba-cuda mpi4py pytest pytest-mpi tqdm scikit-learn matplotlib hypothesis ruff
# NVRTC for numba-cuda's PTX compiler: tests/unit/test_ptx.py compiles the CUDA kernels to PTX
# without a GPU, with the CUDA toolkit's NVVM; a toolkit without NVRTC still needs this wheel
"${PIP[@]}" "nvidia-cuda-nvrtc==13.0.*"

# ---------------------------------------------------------------- Horovod from source
PYTAG="$("$VPY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
KEY="horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-$PYTAG$GPU_KEY"
WHEEL_DIR="$CACHE/$KEY"
if "$VPY" -c "import horovod, horovod.torch; assert horovod.__version__ == '$HOROVOD_VERSION'" 2>/dev/null \
   && "$VENV/bin/horovodrun" --check-build 2>/dev/null | grep -q '\[X\] PyTorch' \
   && { [ "$GPU" != 1 ] || "$VENV/bin/horovodrun" --check-build | grep -q '\[X\] NCCL'; }; then
    log "Horovod $HOROVOD_VERSION already installed in $VENV"
else
    if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
        log "building Horovod $HOROVOD_VERSION from its PyPI sdist (C++17 fix; PyTorch + MPI + Gloo${GPU_NOTE}); takes ~15 min on 2 cores"
        HVDQ_GPU="$GPU" bash "$ROOT/launch/build_horovod.sh" "$VPY" "$HOROVOD_VERSION" "$WHEEL_DIR"
    else
        log "using cached Horovod wheel from $WHEEL_DIR"
    fi
    "${PIP[@]}" --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
fi

# ---------------------------------------------------------------- hvdquant itself
log "installing hvdquant (editable)"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"

log "horovodrun --check-build"
"$VENV/bin/horovodrun" --check-build | tee "$VENV/horovod-check-build.txt"
for fw in "${CHECKS[@]}"; do
    grep -q "\[X\] $fw" "$VENV/horovod-check-build.txt" || { echo "[setup] ERROR: Horovod built without $fw" >&2; exit 1; }
done
log "done. Activate with: source $VENV/bin/activate"
