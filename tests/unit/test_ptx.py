"""The CUDA kernels compile to PTX whose floating-point results cannot depend on the compiler's
choices, so the GPU computes the CPU twins' bits (kernels/arith/__init__.py states the argument).

tests/unit/ptx_audit.py compiles every kernel of kernels/cuda.py for a Hopper GPU (no GPU needed:
NVVM from the CUDA toolkit; NVRTC from the nvidia-cuda-nvrtc wheel that launch/setup.sh installs)
and these tests check the instructions the argument relies on:

- no fused multiply-add whose product may be inexact (the CUDA compiler contracts ``a*b + c`` by
  default; a product by a power of two, or of two widened float32 values in float64, is exact, so
  contracting it changes nothing);
- every division and square root correctly rounded (``.rn``), nothing approximate, no flushing of
  subnormals, no transcendental instruction;
- every conversion to or from a float either correctly rounded (``.rn``), an exact rounding to an
  integral value (``.rzi``, ``.rmi``, ...), or an exact widening.

The twin tests (tests/unit/test_kernels_cuda.py) then compare the bits themselves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
APPROXIMATE = re.compile(r"\.(approx|full|ftz)\b|^(ex2|lg2|sin|cos|tanh|rsqrt)\.")
ROUNDED = re.compile(r"^(div|sqrt|rcp)\.")
CONVERSION_OK = re.compile(r"^cvt\.(rn|rni|rzi|rmi|rpi)\.|^cvt\.f64\.f32$")


def _nvvm_available() -> bool:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    probe = "from numba.cuda.cudadrv import nvvm; nvvm.NVVM()"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def audit() -> dict[str, dict]:
    if not _nvvm_available():
        pytest.skip("no CUDA toolkit (NVVM) on this machine to compile PTX with")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, str(HERE / "ptx_audit.py")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_kernel_audited(audit):
    assert "dqsg_encode" in audit and "dqsg_aggregate" in audit and len(audit) >= 25


def test_no_contraction_that_changes_a_result(audit):
    bad = {k: v["inexact_fmas"][:3] for k, v in audit.items() if v["inexact_fmas"]}
    assert not bad, f"fused multiply-adds of inexact products (GPU bits would differ from the CPU's): {bad}"


def test_divisions_and_roots_correctly_rounded_nothing_approximate(audit):
    bad = {k: sorted(op for op in v["float_ops"] if APPROXIMATE.search(op)
                     or (ROUNDED.match(op) and ".rn." not in op)) for k, v in audit.items()}
    assert not {k: v for k, v in bad.items() if v}


def test_conversions_rounded_to_nearest_or_exact(audit):
    bad = {k: sorted(op for op in v["float_ops"] if op.startswith("cvt.") and not CONVERSION_OK.match(op))
           for k, v in audit.items()}
    assert not {k: v for k, v in bad.items() if v}


def test_no_kernel_keeps_scratch_in_local_memory(audit):
    """Scratch lives in shared memory (range kernels: 4 floats a thread; fused passes: the block's
    range), reductions in registers and shared memory: no kernel spills a per-thread array to local
    memory, which neighbouring threads would read a stride apart."""
    assert {k: v["local_bytes"] for k, v in audit.items() if v["local_bytes"]} == {}


def test_local_memory_is_found():
    """The audit's local-memory count can fail: a depot declared in a kernel's frame is counted."""
    sys.path.insert(0, str(HERE))
    from ptx_audit import local_bytes

    ptx = ".visible .entry k(\n)\n{\n\t.local .align 4 .b8 \t__local_depot0[800];\n\t.reg .b32 %r<4>;\n"
    assert local_bytes(ptx) == 800
    assert local_bytes(".visible .shared .align 4 .b8 _cudapy_smem_1[4096];") == 0


def test_classifier_flags_a_contracted_multiply_add():
    """The audit's own check can fail: ``a*b + c`` on float32 contracts to an inexact fma; a product
    by 2^-24 (a scaling) or of two widened float32 values in float64 does not count."""
    sys.path.insert(0, str(HERE))
    from ptx_audit import inexact_fmas

    ptx = ("\tcvt.f64.f32 \t%fd1, %f1;\n\tcvt.f64.f32 \t%fd2, %f2;\n"
           "\tfma.rn.f32 \t%f3, %f1, %f2, %f4;\n"
           "\tfma.rn.f32 \t%f5, %f1, 0f33800000, %f4;\n"
           "\tfma.rn.f64 \t%fd3, %fd1, %fd2, %fd4;\n"
           "\tfma.rn.f64 \t%fd5, %fd3, %fd2, %fd4;\n")
    assert inexact_fmas(ptx) == ["fma.rn.f32 %f3, %f1, %f2, %f4", "fma.rn.f64 %fd5, %fd3, %fd2, %fd4"]
