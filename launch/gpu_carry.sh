#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for a CUDA machine that cannot reach the network, such as the device
# machine lent to developer sessions (Python 3.12, torch with CUDA, numba-cuda, no Horovod):
#   .gpu/fashion-mnist/      the main job's data (Debian's dataset-fashion-mnist files)
#   .gpu/horovod-*.tar.gz    Horovod's source, built there by launch/gpu_e2e.sh (Gloo, CPU operations)
#   .gpu/wheels/             numpy 2.3 for Python 3.12 (numba-cuda 0.30 cannot compile with numpy >= 2.5)
# launch/gpu_check.sh and launch/gpu_e2e.sh use whatever of it is there. About 50 MB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .gpu/fashion-mnist .gpu/wheels
cp "${HVDQ_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"/*-ubyte.gz .gpu/fashion-mnist/
ls .gpu/horovod-0.28.1.tar.gz >/dev/null 2>&1 \
    || "$PY" -m pip download -q --no-deps --no-binary :all: horovod==0.28.1 -d .gpu
ls .gpu/wheels/numpy-*.whl >/dev/null 2>&1 \
    || "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels numpy==2.3.5
du -sh .gpu
