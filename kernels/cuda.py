"""CUDA kernels: the functions of :mod:`.arith` compiled with ``numba.cuda.jit(device=True)``.

Same arguments as the CPU twins in :mod:`.cpu`, same arithmetic, same bits. Index kernels give each
thread one index; range kernels give each thread 4 elements (one Philox block) with a 4-float
scratch in shared memory, so a warp reads 128 neighbouring elements. Span kernels (the fused passes)
give each CUDA block one range of at most :data:`.arith.constants.GPU_TILE` elements, its two
scratch buffers and its symbol histogram in shared memory: the block's threads run each phase of
the kernel (:data:`.table.Kernel.phases`) on neighbouring units (thread t on unit t, t + T, …),
with a barrier between phases, and the histogram reaches global memory in one atomic add per value
and block. Every kernel of :data:`.table.KERNELS` is one of the loops in :data:`LOOPS` around its
block function. :mod:`.ops` launches them (:func:`launch`) on torch's current CUDA stream.

Imported lazily: only when a CUDA tensor (or ``ops.force_target("cuda")``) asks for it. With
``NUMBA_ENABLE_CUDASIM=1`` these kernels run in Numba's CUDA simulator on the CPU.
"""

from __future__ import annotations

import types

import numpy as np  # noqa: F401 (the loops' global)
from numba import config, cuda, float32, float64, int32, int64, uint8  # noqa: F401 (the loops' globals)

from . import arith, table
from .arith.constants import GPU_HIST, GPU_TILE  # noqa: F401 (the loops' globals)
from .table import INDEX, RANGE, SEGMENTED, SPAN, Kernel

MAX_THREADS = 256  # the most threads a block may have: what the shared arrays are sized for
RANGE_SCRATCH = 4 * MAX_THREADS  # a range kernel's block: 4 floats of scratch per thread
#: threads per block of every launch (a power of 2, at most MAX_THREADS). Numba's CUDA simulator
#: runs each thread as a Python thread, so there blocks get 32: no result depends on it (each thread
#: takes units t, t + nt, …), which the twin tests check with both counts.
THREADS_PER_BLOCK = 32 if config.ENABLE_CUDASIM else MAX_THREADS

#: the body of each kind of kernel (:func:`.table.define`); index and range kernels: one thread per
#: block index b; span kernels: one CUDA block per range c
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
    s0 = cuda.shared.array(RANGE_SCRATCH, float32)
    if b < nb:
        {block}(4 * b, min(n, 4 * b + 4), s0[4 * cuda.threadIdx.x:], {args})
""",
    SPAN: """
def {name}(nb, n, span, {params}):
    c = cuda.blockIdx.x
    i0 = span * c
    i1 = min(n, i0 + span)
    r = c
    s0 = cuda.shared.array(GPU_TILE, {t0})
    s1 = cuda.shared.array(GPU_TILE, {t1}){hist}{phases}{flush}
""",
    # a cooperative index kernel (Kernel.threads): one CUDA block per index b, its threads sharing
    # the block function's work (``*_threads(b, t, nt, red, ...)``, red: a float64 per thread)
    "threads": """
def {name}(nb, {params}):
    b = cuda.blockIdx.x
    red = cuda.shared.array(MAX_THREADS, float64)
    {threads}(b, cuda.threadIdx.x, cuda.blockDim.x, red, {args})
""",
    ("threads", SEGMENTED): """
def {name}(nb, segs, {params}):
    c = cuda.blockIdx.x
    s = _segment_of(segs, c)
    red = cuda.shared.array(MAX_THREADS, float64)
    {threads}(c - segs[s, 0], cuda.threadIdx.x, cuda.blockDim.x, red, {args})
""",
    # one phase of a span kernel: thread t on units t, t + T, … of the range, then a barrier
    "phase": """
    a = i0 + cuda.threadIdx.x * ({unit})
    while a < i1:
        {fn}(a, min(i1, a + ({unit})), {args})
        a += cuda.blockDim.x * ({unit})
    cuda.syncthreads()""",
    # a span kernel's histogram: zeroed in shared memory, counted by the phases (shared atomics),
    # added to row r of the global counts once per value
    "hist": """
    hist = cuda.shared.array((1, GPU_HIST), int64)
    v = cuda.threadIdx.x
    while v < GPU_HIST:
        hist[0, v] = 0
        v += cuda.blockDim.x
    cuda.syncthreads()""",
    "flush": """
    v = cuda.threadIdx.x
    while v < counts.shape[1]:
        if hist[0, v] != 0:
            cuda.atomic.add(counts, (r % counts.shape[0], v), hist[0, v])
        v += cuda.blockDim.x""",
    # segmented twins (kernels/arith/segments.py): thread b runs block b − segs[s, 0] of segment s (span
    # kernels: CUDA block c runs range c − segs[s, 0] of segment s); a histogram row per segment
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
    s0 = cuda.shared.array(RANGE_SCRATCH, float32)
    if b < nb:
        s = _segment_of(segs, b)
        i0 = 4 * (b - segs[s, 0])
        {block}(i0, min(segs[s, 1], i0 + 4), s0[4 * cuda.threadIdx.x:], {args})
""",
    (SPAN, SEGMENTED): """
def {name}(nb, span, segs, {params}):
    c = cuda.blockIdx.x
    s = _segment_of(segs, c)
    r = s
    i0 = span * (c - segs[s, 0])
    i1 = min(segs[s, 1], i0 + span)
    s0 = cuda.shared.array(GPU_TILE, {t0})
    s1 = cuda.shared.array(GPU_TILE, {t1}){hist}{phases}{flush}
""",
}


@cuda.jit(device=True)
def _tally_atomic(counts, row, symbol, amount):
    cuda.atomic.add(counts, (row, symbol), amount)


@cuda.jit(device=True)
def _barrier():
    cuda.syncthreads()


_f = arith.build(cuda.jit(device=True), tally=_tally_atomic, sync=_barrier)


kernels = types.SimpleNamespace(
    **{k.name: cuda.jit(table.define(k, _f, LOOPS, globals(), __file__)) for k in table.KERNELS},
    **{k.name + "_segments": cuda.jit(table.define(k, _f, LOOPS, globals(), __file__, True))
       for k in table.KERNELS if k.segments})


def launch(kernel: Kernel, nblocks: int, stream: object, *args: object, segmented: bool = False) -> None:
    """Run ``kernel`` (its segmented twin with ``segmented``) on ``nblocks`` block indices (one a
    thread; a span kernel's: one a CUDA block) on ``stream``."""
    per_block = kernel.kind == SPAN or bool(kernel.threads)  # one CUDA block per range or index
    grid = nblocks if per_block else (nblocks + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    name = kernel.name + ("_segments" if segmented else "")
    getattr(kernels, name)[grid, THREADS_PER_BLOCK, stream](nblocks, *args)
