"""Shared test setup.

CUDA kernels are tested on machines without a GPU through Numba's CUDA simulator; this must be
switched on before numba.cuda is first imported. launch/gpu_check.sh sets HVDQ_REAL_GPU=1 to test
them on a real GPU instead.
"""

import os

if os.environ.get("HVDQ_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
