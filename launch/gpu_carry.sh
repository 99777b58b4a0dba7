#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored), the offline kit for a CUDA machine that cannot reach the network, such
# as the device machine lent to developer sessions (Python 3.12, torch 2.11.0+cu130, numba-cuda; no
# Horovod, no cffi). Everything is built here; there launch/gpu_env.sh only installs wheels:
#   .gpu/fashion-mnist/  the main job's data (Debian's dataset-fashion-mnist files)
#   .gpu/wheels/         Horovod 0.28.1 built here by launch/build_horovod.sh for the kit's Python and
#                        torch (Gloo, CPU operations; at run time it needs cloudpickle, psutil, pyyaml
#                        and packaging, which that machine has), and numpy 2.3.5 (numba-cuda cannot
#                        compile with numpy >= 2.5)
#   .gpu/kit.env         what the kit was built for: launch/gpu_env.sh compares it with the machine
#                        first and stops with one line on a mismatch
# The first run (about 10 minutes on 2 cores, with the network) makes a build environment (torch with
# its CUDA wheels from PyPI, a few GB), builds Horovod and runs it on 2 ranks over Gloo; the
# environment and the wheels are cached, later runs only copy.
# Knobs, for a machine that drifted:
#   HVDQ_KIT_PYTHON  a CPython of the machine's major.minor (default: pyenv's newest 3.12, else
#                    python3.12)
#   HVDQ_KIT_TORCH   the machine's torch release (default 2.11.0)
#   HVDQ_KIT_CACHE   the cache (default ~/.cache/hvdquant/gpu-kit)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
HOROVOD_VERSION=0.28.1
TORCH="${HVDQ_KIT_TORCH:-2.11.0}"
PYENV_312="$(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python3 2>/dev/null | sort -V | tail -n 1 || true)"
KIT_PY="${HVDQ_KIT_PYTHON:-${PYENV_312:-python3.12}}"
PYVER="$("$KIT_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
    || { echo "[gpu_carry] $KIT_PY does not run: set HVDQ_KIT_PYTHON" >&2; exit 1; }
CACHE="${HVDQ_KIT_CACHE:-$HOME/.cache/hvdquant/gpu-kit}/cp${PYVER/./}-torch$TORCH"
VPY="$CACHE/venv/bin/python"
log() { printf '[gpu_carry] %s\n' "$*"; }

if ! ls "$CACHE"/horovod/horovod-*.whl >/dev/null 2>&1; then
    if [ ! -x "$VPY" ]; then
        log "build environment $CACHE/venv: Python $PYVER, torch==$TORCH"
        "$KIT_PY" -m venv "$CACHE/venv"
        "$VPY" -m pip install -q --upgrade pip setuptools wheel
        # Horovod's setup.py asks for its runtime needs (cffi among them) when it builds
        "$VPY" -m pip install -q "torch==$TORCH" cloudpickle psutil pyyaml packaging cffi
    fi
    log "building Horovod $HOROVOD_VERSION (Gloo, CPU operations) for Python $PYVER, torch $TORCH"
    HVDQ_HOROVOD_MPI=0 HVDQ_GPU=0 bash launch/build_horovod.sh "$VPY" "$HOROVOD_VERSION" "$CACHE/build"
    log "checking it: an allreduce on 2 ranks over Gloo"
    rm -rf "$CACHE/check"
    "$VPY" -m pip install -q --no-index --no-deps --target "$CACHE/check" "$CACHE"/build/horovod-*.whl
    SUM='import horovod.torch as hvd, torch; hvd.init(); one = torch.ones(3, dtype=torch.float64);'
    SUM+=' s = hvd.allreduce(one * (hvd.rank() + 1), op=hvd.Sum); assert s.tolist() == [3.0] * 3, s'
    PYTHONPATH="$CACHE/check" "$VPY" -m horovod.runner.launch -np 2 -H localhost:2 --gloo "$VPY" -c "$SUM"
    rm -rf "$CACHE/check" "$CACHE/horovod"
    mv "$CACHE/build" "$CACHE/horovod"
fi
ls "$CACHE"/numpy/numpy-*.whl >/dev/null 2>&1 \
    || "$KIT_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d "$CACHE/numpy" numpy==2.3.5

rm -rf .gpu/wheels .gpu/horovod-*.tar.gz
mkdir -p .gpu/fashion-mnist .gpu/wheels
cp "${HVDQ_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"/*-ubyte.gz .gpu/fashion-mnist/
cp "$CACHE"/horovod/horovod-*.whl "$CACHE"/numpy/numpy-*.whl .gpu/wheels/
# the torch Horovod was compiled against, as its wheel records it (horovod/metadata.json)
BUILT="$("$KIT_PY" -c 'import json, sys, zipfile
print(json.loads(zipfile.ZipFile(sys.argv[1]).read("horovod/metadata.json"))["pytorch"])' .gpu/wheels/horovod-*.whl)"
cat >.gpu/kit.env <<EOF
KIT_PYTHON=$PYVER
KIT_TORCH=${BUILT%%+*}
KIT_TORCH_BUILT=$BUILT
KIT_HOROVOD=$HOROVOD_VERSION
KIT_DATE=$(date -u +%F)
EOF
cat .gpu/kit.env
du -sh .gpu
