# Sourced (from the checkout's root) by launch/gpu_check.sh and launch/gpu_e2e.sh: hvdquant importable
# without installing it (kernels/ becomes hvdquant.kernels in a shim folder; PYTHONSAFEPATH keeps the
# checkout's own hvdquant/, which has no kernels/, off sys.path), numpy from .gpu/wheels first where
# launch/gpu_carry.sh put one. Sets PY and SHIM.
PY="$(command -v "${PYTHON:-python3}")"
SHIM="$(mktemp -d)"
cp -r hvdquant "$SHIM/hvdquant"
cp -r kernels "$SHIM/hvdquant/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SHIM/site" .gpu/wheels/*.whl 2>/dev/null; then
        export PYTHONPATH="$SHIM/site:$PYTHONPATH"
    else
        echo "gpu_env: the wheels in .gpu/wheels do not fit $PY; using its own numpy"
    fi
fi
