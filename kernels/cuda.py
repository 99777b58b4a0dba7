"""CUDA kernels: the functions of :mod:`.arith` compiled with ``numba.cuda.jit(device=True)``.

Same arguments as the CPU twins in :mod:`.cpu`, same arithmetic, same bits. Range kernels give
each thread 4 elements (one Philox block) with a 4-float local scratch buffer, span kernels a span
with local scratch of the table's ``gpu_scratch`` entries; index kernels give each thread one index.
Every kernel of :data:`.table.KERNELS` is one of the loops in :data:`LOOPS` around its block
function. :mod:`.ops` launches them (:func:`launch`) on torch's current CUDA stream.

Imported lazily: only when a CUDA tensor (or ``ops.force_target("cuda")``) asks for it. With
``NUMBA_ENABLE_CUDASIM=1`` these kernels run in Numba's CUDA simulator on the CPU.
"""

from __future__ import annotations

import types

import numpy as np  # noqa: F401 (the loops' global)
from numba import cuda, float32, int32, uint8  # noqa: F401 (the loops' globals)

from . import arith, table
from .table import INDEX, RANGE, SEGMENTED, SPAN, Kernel

THREADS_PER_BLOCK = 256

#: the body of each kind of kernel, one thread per block index b (:func:`.table.define`)
LOOPS = {
    INDEX: """
def {name}(nb, {params}):
    b = cuda.grid(1)
    if b < nb:
        {block}(b, {args})
""",
    RANGE: """
def {name}(nb, n, {params}):
    b = cuda.grid(1)
    if b < nb:
        s0 = cuda.local.array(4, float32)
        {block}(4 * b, min(n, 4 * b + 4), s0, {args})
""",
    SPAN: """
def {name}(nb, n, span, {params}):
    b = cuda.grid(1)
    if b < nb:
        s0 = cuda.local.array({size}, {t0})
        s1 = cuda.local.array({size}, {t1})
        {block}(span * b, min(n, span * b + span), s0, s1, {args})
""",
    # segmented twins (kernels/arith/segments.py): thread b runs block b − segs[s, 0] of segment s; a
    # histogram row r per segment (atomic adds)
    (INDEX, SEGMENTED): """
def {name}(nb, segs, {params}):
    b = cuda.grid(1)
    if b < nb:
        s = _segment_of(segs, b)
        {block}(b - segs[s, 0], {args})
""",
    (RANGE, SEGMENTED): """
def {name}(nb, segs, {params}):
    b = cuda.grid(1)
    if b < nb:
        s = _segment_of(segs, b)
        i0 = 4 * (b - segs[s, 0])
        s0 = cuda.local.array(4, float32)
        {block}(i0, min(segs[s, 1], i0 + 4), s0, {args})
""",
    (SPAN, SEGMENTED): """
def {name}(nb, span, segs, {params}):
    b = cuda.grid(1)
    if b < nb:
        s = _segment_of(segs, b)
        r = s
        i0 = span * (b - segs[s, 0])
        s0 = cuda.local.array({size}, {t0})
        s1 = cuda.local.array({size}, {t1})
        {block}(i0, min(segs[s, 1], i0 + span), s0, s1, {args})
""",
}


@cuda.jit(device=True)
def _tally_atomic(counts, row, symbol, amount):
    cuda.atomic.add(counts, (row, symbol), amount)


_f = arith.build(cuda.jit(device=True), tally=_tally_atomic)


kernels = types.SimpleNamespace(
    **{k.name: cuda.jit(table.define(k, _f, LOOPS, globals(), __file__)) for k in table.KERNELS},
    **{k.name + "_segments": cuda.jit(table.define(k, _f, LOOPS, globals(), __file__, True))
       for k in table.KERNELS if k.segments})


def launch(kernel: Kernel, nblocks: int, stream: object, *args: object, segmented: bool = False) -> None:
    """Run ``kernel`` (its segmented twin with ``segmented``) on ``nblocks`` block indices (one a
    thread) on ``stream``."""
    grid = (nblocks + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    name = kernel.name + ("_segments" if segmented else "")
    getattr(kernels, name)[grid, THREADS_PER_BLOCK, stream](nblocks, *args)
