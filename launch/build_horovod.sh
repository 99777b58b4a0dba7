#!/usr/bin/env bash
# Build a Horovod 0.28.1 wheel from its source distribution, patched for current toolchains:
#   - C++17 (torch >= 2.1 requires it; 0.28.1 hard-codes C++14, fixed upstream after the release);
#   - GCC >= 13: horovod/common/common.h uses std::logic_error without including <stdexcept>
#     (older libstdc++ headers included it indirectly; harmless there);
#   - CMake >= 4: gloo's cmake_minimum_required predates 3.5, which CMake 4 refuses unless
#     CMAKE_POLICY_VERSION_MINIMUM is set (CMake < 4 ignores the variable);
#   - CPU operations only (the default): a CUDA torch does not switch on Horovod's CUDA code
#     (CUDA kernels compiled with nvcc, the build machine's libcudart linked in);
#   - no debug info in the libraries (RelWithDebInfo's -g makes the torch one 61 MB).
# PYTHONSAFEPATH is dropped: Horovod's setup.py imports its own package from the source folder.
# Used by launch/setup.sh and launch/gpu_carry.sh.
#
#   bash launch/build_horovod.sh PYTHON SDIST_OR_VERSION WHEEL_DIR
#
# SDIST_OR_VERSION: a horovod-*.tar.gz on disk (machines without network), or a version for pip to
# download. PYTHON needs torch, cffi (a build requirement of Horovod's setup.py) and CMake on PATH.
# Knobs:
#   HVDQ_HOROVOD_MPI=0   Gloo only (no MPI library on the machine); default 1: MPI + Gloo
#   HVDQ_GPU=1           GPU operations over NCCL (HOROVOD_GPU_OPERATIONS=NCCL): needs nvcc (CUDA
#                        toolkit) and NCCL (HOROVOD_NCCL_HOME, else the nvidia-nccl wheel that CUDA
#                        torch installs); default: CPU operations only
set -euo pipefail
unset PYTHONSAFEPATH
PY=$1 SPEC=$2 OUT=$3
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
if [ -f "$SPEC" ]; then
    cp "$SPEC" "$BUILD/"
else
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$SPEC" -d "$BUILD"
fi
tar -xzf "$BUILD"/horovod-*.tar.gz -C "$BUILD"
SRC="$(find "$BUILD" -maxdepth 1 -type d -name 'horovod-*' | head -n 1)"
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/horovod/torch/CMakeLists.txt"
grep -q '^#include <stdexcept>' "$SRC/horovod/common/common.h" \
    || sed -i 's/^#include <string>$/#include <stdexcept>\n#include <string>/' "$SRC/horovod/common/common.h"
grep -q '^#include <stdexcept>' "$SRC/horovod/common/common.h"
export CMAKE_POLICY_VERSION_MINIMUM=3.5 LDFLAGS="${LDFLAGS:+$LDFLAGS }-Wl,--strip-debug"

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
if [ "${HVDQ_HOROVOD_MPI:-1}" = 1 ]; then
    export HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=MPI
else
    export HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO
fi
if [ "${HVDQ_GPU:-0}" = 1 ]; then
    NVCC="$(command -v nvcc || true)"
    [ -n "$NVCC" ] || { echo "[build_horovod] HVDQ_GPU=1 needs nvcc (the CUDA toolkit) on PATH" >&2; exit 1; }
    # the toolkit nvcc belongs to, asked of nvcc itself (nvcc on PATH may be a wrapper script or
    # link); an nvcc that does not say is taken to live in <toolkit>/bin
    CUDA_TOP="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
    [ -d "$CUDA_TOP" ] || CUDA_TOP="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
    export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="${HOROVOD_CUDA_HOME:-$(cd "$CUDA_TOP" && pwd -P)}"
    export CUDA_HOME="$HOROVOD_CUDA_HOME"  # torch's cpp_extension (Horovod's torch library paths) reads it
    if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_LIB:-}" ]; then
        # CUDA torch wheels ship NCCL as the nvidia-nccl-cu* wheel: headers and libnccl.so.2 only,
        # so give the linker the unversioned name it looks for
        NCCL="$("$PY" -c 'import nvidia.nccl as m, os; print(list(m.__path__)[0])')"
        mkdir -p "$BUILD/nccl-lib"
        ln -s "$NCCL/lib/libnccl.so.2" "$BUILD/nccl-lib/libnccl.so"
        export HOROVOD_NCCL_INCLUDE="$NCCL/include" HOROVOD_NCCL_LIB="$BUILD/nccl-lib" HOROVOD_NCCL_LINK=SHARED
    fi
else
    # Horovod's FindPytorch.cmake calls a torch CUDA-capable when torch.version.cuda and
    # cpp_extension's CUDA_HOME are set, and then adds CUDA support to the torch extension
    sed -i 's/print(True if ((torch.version.cuda is not None) and (CUDA_HOME is not None)) else False)/print(False)/' \
        "$SRC/cmake/Modules/FindPytorch.cmake"
    grep -q 'import CUDA_HOME; print(False)' "$SRC/cmake/Modules/FindPytorch.cmake"
fi
mkdir -p "$OUT.tmp"
MAKEFLAGS="-j$(nproc)" HOROVOD_BUILD_ARCH_FLAGS="" \
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT.tmp" "$SRC"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
