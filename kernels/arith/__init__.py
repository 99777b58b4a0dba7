"""Device-agnostic arithmetic, written once and compiled for each device.

Every function here is plain Python over NumPy scalar types and arrays, one module per scheme.
:func:`build` compiles them with a given Numba decorator (``numba.njit`` for the CPU twins in :mod:`.cpu`,
``numba.cuda.jit(device=True)`` for the CUDA kernels in :mod:`.cuda`). Each *block function*
``f(b, ...)`` computes one independent block ``b`` of an output (4 elements for the Philox-driven
codecs, one bucket for reductions, one byte group for packers). The CPU loops ``b`` with
``prange``; the GPU gives each thread one ``b``. Same code, same bits.

Rules that keep CPU and GPU bit-identical:
- integers are ``uint64``/``int64`` with explicit masks (Numba promotes mixed signed/unsigned
  64-bit operands to float64, so constants are typed);
- floats go only through correctly rounded IEEE operations (+, −, ×, ÷, sqrt, conversions) and
  exact ones (floor, truncation, comparisons); no transcendental functions;
- no float32 product ever feeds an addition, so there is nothing for a GPU compiler to contract into
  a fused multiply-add (the CUDA compiler does so by default, the CPU's does not): dithers are built
  from integers (an odd integer times a power of 2), and sums of products accumulate in float64,
  where a product of two float32 values is exact, so a contracted ``fma(a, b, acc)`` rounds exactly
  as ``acc + a*b`` does (the same holds for float64 products of integers below 2^53);
- every reduction runs in a fixed sequential order inside its block.

``tests/unit/test_ptx.py`` compiles every CUDA kernel to PTX and checks the instructions this
argument relies on: no float32 ``fma``, every division and square root ``.rn``, no approximate
instruction.

Modules, in build order (each builder takes what it calls from the earlier ones):

- :mod:`.constants` — typed constants, GPU scratch sizes, the shared-stream words;
- :mod:`.segments`  — segment tables: one launch over several tensors laid end to end;
- :mod:`.scalars`   — Philox-4x32-10, the dither's uniform, exact rounding, GF(2^m) products;
- :mod:`.strata`    — the stratified dither: shared offsets and permutations of the strata;
- :mod:`.streams`   — the independent dither streams, and :func:`dither_range` over either kind;
- :mod:`.buckets`   — per-bucket reductions: max |g|, Δ = max/s, ‖g‖₂, the nested checksum;
- :mod:`.rotation`  — the shared randomized Hadamard rotation of each bucket and its inverse;
- :mod:`.packing`   — b-bit and base-ρ packing, modular addition of packed symbols;
- :mod:`.rans`      — entropy coding of symbols with a static table (chunked byte-wise rANS);
- :mod:`.fields`    — summable fields: base-R digits in exact float64 words and back;
- :mod:`.dqsg`      — DQSG encode/decode and the own-scale aggregate;
- :mod:`.fused`     — DQSG's fused passes: gradient to packed payload or summable fields and back;
- :mod:`.nested`    — NDQSG coset encode and side-information decode;
- :mod:`.qsgd`      — QSGD levels and scale decode, 1-bit SGD.

*Range functions* ``f(i0, i1, scratch..., ...)`` (the Philox-driven codecs) work on element ranges
[i0, i1) with i0 % 4 == 0 and scratch buffers of at least i1 − i0 entries: the CPU gives each
``prange`` iteration a chunk of ``cpu.CHUNK`` elements (the Philox loop and the per-bucket loops then
vectorize), the GPU gives each thread 4 (and each CUDA block a range of at most ``GPU_TILE`` elements for the
fused passes, whose phases its threads share). *Index functions*
``f(b, ...)`` map one index (an element, a bucket, a column, a packed group) to its output. The
kernels that loop them are listed once in :mod:`..table`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import SimpleNamespace

from . import buckets, dqsg, fields, fused, nested, packing, qsgd, rans, rotation, scalars, segments, strata, streams
from .constants import GF_POLY, GPU_HIST, GPU_TILE, SHARED_PERM, SHARED_SHIFT, SHARED_V

__all__ = ["GF_POLY", "GPU_HIST", "GPU_TILE", "SHARED_PERM", "SHARED_SHIFT", "SHARED_V", "BUILDERS", "build"]

#: the builders of the modules above, in the order that gives each one what it calls
BUILDERS = (segments.build, scalars.build, strata.build, streams.build, buckets.build, rotation.build, packing.build,
            rans.build, fields.build, dqsg.build, fused.build, nested.build, qsgd.build)


def build(jit: Callable, leaf: Callable | None = None, tally: Callable | None = None,
          sync: Callable | None = None) -> SimpleNamespace:
    """Compile every scalar and block function; return them in one namespace.

    Small functions (scalars, per-element helpers, index block functions) are compiled with ``leaf``
    (the CPU passes ``njit(inline="always")``: inlined into their callers, so LLVM vectorizes the
    loops around them, the Philox loop included), the range functions with
    ``jit`` (called once per chunk; inlining them too would only multiply compile time). Each builder
    ``build(jit, leaf, *, f, g, ...)`` names the compiled functions it calls as keyword parameters
    (given here from what the builders before it returned), and its functions reference them through
    that closure, which is how Numba lets one device function call another on both the CPU and the
    CUDA target.
    ``tally(counts, row, symbol, amount)`` adds to a histogram cell: the CPU's plain increment by
    default, an atomic add on the GPU (where many threads share a row). ``sync()`` is the barrier of
    the GPU's cooperative block functions (``*_threads``: one GPU block per index, its threads sharing
    the work): ``cuda.syncthreads`` there, unused on the CPU.
    """
    leaf = leaf or jit
    built = SimpleNamespace(tally=tally, sync=sync)
    for part in BUILDERS:
        needs = [name for name in inspect.signature(part).parameters if name not in ("jit", "leaf")]
        vars(built).update(vars(part(jit, leaf, **{name: getattr(built, name) for name in needs})))
    return built
