"""Compile every CUDA kernel (kernels/cuda.py, one per entry of kernels/table.py) to PTX and list
the floating-point instructions it uses, for tests/unit/test_ptx.py. No GPU is needed: Numba
compiles through NVVM (the CUDA toolkit) for compute capability 9.0 (Hopper), with the options a
kernel launch uses (no fast math).

Run as a script, in a process where Numba's CUDA simulator is off::

    python tests/unit/ptx_audit.py    # JSON: {kernel: {"float_ops": {op: count}, "inexact_fmas": [...]}}

The kernels' argument types are taken from real calls: the calls of tests/unit/kernel_cases.py run
on the CPU twins (which take the same arguments as the CUDA kernels), and each launch's arguments
give the signature the CUDA kernel is compiled for.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter

# kernel_cases.py sits beside this script; with PYTHONSAFEPATH set (launch/gpu_env.sh) Python does not
# put the script's folder on sys.path itself
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: PTX floating-point instructions (opcode with its modifiers, e.g. "fma.rn.f32", "div.rn.f64")
FLOAT_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z]+[a-z0-9]*(?:\.[a-z0-9]+)*\.f(?:16|32|64)(?:\.[a-z0-9]+)*)\s+(.*);",
                      re.MULTILINE)


#: a PTX local-memory frame (``.local .align 4 .b8 __local_depot0[16];``): per-thread arrays the
#: compiler could not keep in registers
LOCAL_DEPOT = re.compile(r"^\s*\.local\s+\.align\s+\d+\s+\.b8\s+\w+\[(\d+)\];", re.MULTILINE)


def local_bytes(ptx: str) -> int:
    """Bytes of local memory ``ptx`` declares per thread."""
    return sum(int(size) for size in LOCAL_DEPOT.findall(ptx))


def _power_of_two(operand: str) -> bool:
    """A PTX float immediate (0fXXXXXXXX or 0dXXXXXXXXXXXXXXXX) that is ± a power of two."""
    if operand.startswith("0f"):
        return int(operand[2:], 16) & 0x7FFFFF == 0
    if operand.startswith("0d"):
        return int(operand[2:], 16) & 0xFFFFFFFFFFFFF == 0
    return False


def inexact_fmas(ptx: str) -> list[str]:
    """The fused multiply-adds of ``ptx`` whose product may be inexact, i.e. whose rounding differs
    from a separate multiply and add. A product is exact when one factor is a power of two (a
    scaling), or, in float64, when both factors are float32 values widened (``cvt.f64.f32`` is every
    definition of both registers): 24 + 24 significant bits fit in 53."""
    definitions: dict[str, set[str]] = {}
    for op, operands in FLOAT_OP.findall(ptx):
        definitions.setdefault(operands.split(",")[0].strip(), set()).add(op)
    bad = []
    for op, operands in FLOAT_OP.findall(ptx):
        if not op.startswith(("fma", "mad")):
            continue
        a, b = (x.strip() for x in operands.split(",")[1:3])
        widened = op.endswith("f64") and all(definitions.get(r) == {"cvt.f64.f32"} for r in (a, b))
        if not (_power_of_two(a) or _power_of_two(b) or widened):
            bad.append(f"{op} {operands}")
    return bad


def signatures() -> dict[str, set[tuple]]:
    """Numba signatures of every kernel launched by the shared cases, per kernel name."""
    import numba
    from kernel_cases import CASES, SIZES

    from hvdquant.kernels import cpu

    seen: dict[str, set[tuple]] = {}
    run = cpu.launch

    def record(kernel: object, work: int, *args: object, segmented: bool = False) -> None:
        name = kernel.name + ("_segments" if segmented else "")
        seen.setdefault(name, set()).add(tuple(numba.typeof(a) for a in args))
        run(kernel, work, *args, segmented=segmented)

    cpu.launch = record
    try:
        for case in CASES.values():
            for n in SIZES[1:]:
                case(n)
    finally:
        cpu.launch = run
    return seen


class _Hopper:
    """Stands in for the current device where there is none: Numba compiles the device functions a
    kernel calls for the current device's compute capability; on a machine without a GPU that is
    asked of the driver, so it is answered with the one compile_ptx targets here."""

    compute_capability = (9, 0)


def audit() -> dict[str, dict]:
    """Per kernel: its float instructions with counts ("float_ops"), its "inexact_fmas" and the most
    local memory a thread of it declares ("local_bytes")."""
    assert os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "1", "run without the CUDA simulator"
    from numba import cuda
    from numba.cuda import dispatcher as numba_dispatcher

    from hvdquant.kernels import cuda as cuda_kernels
    from hvdquant.kernels import table

    if not cuda.is_available():
        numba_dispatcher.get_current_device = _Hopper
    found: dict[str, dict] = {}
    for name, sigs in sorted(signatures().items()):
        kernel = getattr(cuda_kernels.kernels, name)
        counts: Counter[str] = Counter()
        inexact: list[str] = []
        local = 0
        for sig in sigs:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0), fastmath=False)
            counts.update(op for op, _ in FLOAT_OP.findall(ptx))
            inexact += inexact_fmas(ptx)
            local = max(local, local_bytes(ptx))
        found[name] = {"float_ops": dict(counts), "inexact_fmas": inexact, "local_bytes": local}
    launched = set(found)
    every = {k.name for k in table.KERNELS} | {k.name + "_segments" for k in table.KERNELS if k.segments}
    missing = sorted(every - launched)
    if missing:
        raise SystemExit(f"ptx_audit: no case in tests/unit/kernel_cases.py launches {missing}")
    return found


if __name__ == "__main__":
    json.dump(audit(), sys.stdout, indent=1, sort_keys=True)
