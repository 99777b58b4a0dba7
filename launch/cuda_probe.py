"""Exit 0 iff Numba can compile and run a CUDA kernel here (launch/gpu_check.sh, launch/gpu_e2e.sh).

A tiny kernel first: a numba-cuda that cannot compile (numba-cuda 0.30 with numpy >= 2.5, which
removed ``np.row_stack``) would otherwise fail every later step with the same traceback.
"""

import sys

import numpy as np
from numba import cuda


@cuda.jit
def _probe(a):
    a[0] = 1.0


def main() -> int:
    try:
        a = cuda.to_device(np.zeros(1, np.float32))
        _probe[1, 1](a)
        assert a.copy_to_host()[0] == 1.0
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable CUDA compiler here
        print(f"Numba cannot compile a CUDA kernel here (numpy {np.__version__}): {exc!r}\n"
              "numba-cuda 0.30 needs numpy < 2.5: bash launch/gpu_carry.sh puts a numpy 2.3 wheel in .gpu/wheels, "
              "which launch/gpu_e2e.sh and launch/gpu_check.sh install first (docs/BENCHMARKS.md, Kernels on a GPU)")
        return 1
    print(f"Numba compiles CUDA kernels here: {cuda.get_current_device().name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
