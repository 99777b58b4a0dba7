# Sourced (from the checkout's root) by launch/gpu_check.sh and launch/gpu_e2e.sh; sets PY and SHIM,
# prints the Python, torch and Numba versions and (unless DRY_RUN=1) checks that Numba can run a CUDA
# kernel. Returns 1 after a "FAIL kit: ..." or "FAIL cuda: ..." line (GPU_ENV_FAIL names the part)
# when the kit does not fit this machine or CUDA does not work: callers must stop then.
#
# The kit (.gpu/, made by launch/gpu_carry.sh on the development machine) holds wheels built for one
# Python major.minor and one torch release, recorded in .gpu/kit.env. The rule:
#   - DRY_RUN=1 (the CPU machine, in the checkout's .venv with Horovod from launch/setup.sh): the kit
#     is neither checked nor installed; the Python environment in use provides everything.
#   - otherwise, with .gpu/kit.env: this machine's Python major.minor and torch release (the part
#     before any +local tag) must equal the kit's, checked before anything else; then the kit's
#     wheels (Horovod, numpy, ...) are installed offline into $SHIM/site, which goes first on
#     PYTHONPATH, and its bin/ (horovodrun) first on PATH.
#   - otherwise (no kit here): this machine's own packages are used, as they are.
# hvdquant is importable without installing it: kernels/ becomes hvdquant.kernels in the shim
# folder, and PYTHONSAFEPATH keeps the checkout's own hvdquant/ (which has no kernels/) off
# sys.path (not in a dry run: the .venv's editable install imports the checkout). Nothing is built here; launch/build_horovod.sh drops PYTHONSAFEPATH itself, so it
# cannot leak into a build.
GPU_ENV_FAIL=""
_gpu_env_refuse() {  # _gpu_env_refuse PART: the FAIL line of a check that could not start
    GPU_ENV_FAIL=$1
    case $1 in
        kit) echo "FAIL kit: launch/gpu_env.sh refused this machine (see the line above)" ;;
        cuda) echo "FAIL cuda: Numba cannot run a CUDA kernel here (see above)" ;;
    esac
}
PY="$(command -v "${PYTHON:-python3}")"
KIT=""
if [ "${DRY_RUN:-0}" != 1 ] && [ -f .gpu/kit.env ]; then
    # shellcheck source=/dev/null
    source .gpu/kit.env
    found="$("$PY" -c 'import sys
from importlib.metadata import PackageNotFoundError, version
try:
    torch = version("torch").split("+")[0]
except PackageNotFoundError:
    torch = "none"
print("Python %d.%d / torch %s" % (sys.version_info[0], sys.version_info[1], torch))')" \
        || found="no working ${PYTHON:-python3}"
    built="Python $KIT_PYTHON / torch $KIT_TORCH"
    if [ "$found" != "$built" ]; then
        echo "gpu kit: built for $built, found $found: rerun launch/gpu_carry.sh for this machine" >&2
        _gpu_env_refuse kit
        return 1
    fi
    KIT=1
fi
SHIM="$(mktemp -d)"
if [ "${DRY_RUN:-0}" != 1 ]; then  # a dry run imports the checkout through the .venv's editable install
    cp -r hvdquant "$SHIM/hvdquant"      # (and so hits Numba's cache of the compiled CPU kernels)
    cp -r kernels "$SHIM/hvdquant/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
fi
if [ -n "$KIT" ]; then
    if ! "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile \
            --target "$SHIM/site" .gpu/wheels/*.whl; then
        echo "gpu kit: its wheels in .gpu/wheels did not install into $PY" >&2
        rm -rf "$SHIM"
        _gpu_env_refuse kit
        return 1
    fi
    export PYTHONPATH="$SHIM/site:$PYTHONPATH" PATH="$SHIM/site/bin:$PATH"
    echo "gpu kit: $built, Horovod $KIT_HOROVOD, built $KIT_DATE: $(cd .gpu/wheels && echo *.whl)"
fi
"$PY" -c "import sys, torch, numba
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'numba', numba.__version__)"
if [ "${DRY_RUN:-0}" != 1 ] && ! "$PY" launch/cuda_probe.py; then
    _gpu_env_refuse cuda
    return 1
fi
