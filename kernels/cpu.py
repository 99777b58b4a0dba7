"""CPU twins: the functions of :mod:`.arith` compiled with ``numba.njit`` and looped with ``prange``.

Range kernels (the Philox-driven codecs) take ``(nb, n, ...)`` and give each of the ``nb``
iterations a chunk of ``CHUNK`` elements of ``[0, n)`` with its own dither scratch buffer: inside a
chunk the Philox loop and the per-bucket loops vectorize. Index kernels take ``(nb, ...)`` and map
each index below ``nb`` (element, bucket, column, packed group). Every kernel of :data:`.table.KERNELS`
is one of the loops in :data:`LOOPS` around its block function.

Each kernel is compiled twice: ``parallel=True`` (``parallel.<name>``) and as a serial twin
(``serial.<name>``: the same loop without ``parallel=True``, where ``prange`` is ``range``). Every
iteration writes its own outputs, so both give the same bits. :func:`launch` picks one per call
(:mod:`.threads`). Callers use :mod:`.ops`.
"""

from __future__ import annotations

import types

import numpy as np  # noqa: F401 (the loops' global)
from numba import njit, prange  # noqa: F401 (prange: the loops' global)
from numba.core.registry import CPUDispatcher

from . import arith, table, threads
from .jit import cached
from .table import INDEX, RANGE, SEGMENTED, SPAN, Kernel

CHUNK = 4096  # elements per prange iteration of a range kernel (a multiple of 4)

#: the loop of each kind of kernel (:func:`.table.define` fills in the names)
LOOPS = {
    INDEX: """
def {name}(nb, {params}):
    for b in prange(nb):
        {block}(b, {args})
""",
    RANGE: """
def {name}(nb, n, {params}):
    for b in prange(nb):
        s0 = np.empty(CHUNK, np.float32)
        {block}(b * CHUNK, min(n, (b + 1) * CHUNK), s0, {args})
""",
    SPAN: """
def {name}(nb, n, span, {params}):
    for b in prange(nb):
        s0 = np.empty(span, np.{t0})
        s1 = np.empty(span, np.{t1})
        {block}(b * span, min(n, (b + 1) * span), s0, s1, {args})
""",
    # segmented twins (kernels/arith/segments.py): block b of the launch is block b − segs[s, 0] of
    # segment s, called on that segment's views; a histogram row r per block (each owns its row)
    (INDEX, SEGMENTED): """
def {name}(nb, segs, {params}):
    for b in prange(nb):
        s = _segment_of(segs, b)
        {block}(b - segs[s, 0], {args})
""",
    (RANGE, SEGMENTED): """
def {name}(nb, segs, {params}):
    for b in prange(nb):
        s = _segment_of(segs, b)
        i0 = (b - segs[s, 0]) * CHUNK
        s0 = np.empty(CHUNK, np.float32)
        {block}(i0, min(segs[s, 1], i0 + CHUNK), s0, {args})
""",
    (SPAN, SEGMENTED): """
def {name}(nb, span, segs, {params}):
    for b in prange(nb):
        s = _segment_of(segs, b)
        r = b
        i0 = (b - segs[s, 0]) * span
        s0 = np.empty(span, np.{t0})
        s1 = np.empty(span, np.{t1})
        {block}(i0, min(segs[s, 1], i0 + span), s0, s1, {args})
""",
}

_f = arith.build(njit, njit(inline="always"))
philox4x32 = _f.philox4x32

# Numba's on-disk cache keys a kernel by the file that defines it (this one: the loops are compiled
# with this file's name), not by the arithmetic it calls. Every kernel is compiled under a name
# carrying the hash of the arithmetic's sources and of the table (table.source_stamp), so edited
# arithmetic never meets a stale cached kernel; an edited loop changes this file, which Numba checks.
ARITH_STAMP = table.source_stamp()
_par = cached("_" + ARITH_STAMP, parallel=True)


def _serial_twin(kernel: CPUDispatcher) -> CPUDispatcher:
    """``kernel``'s loop compiled without ``parallel=True`` (``prange`` runs as ``range`` on the calling
    thread). Its own name keeps its on-disk cache entry apart from the parallel kernel's."""
    return cached("_serial")(kernel.py_func)


KERNELS = tuple(k.name for k in table.KERNELS) + tuple(k.name + "_segments" for k in table.KERNELS if k.segments)
parallel = types.SimpleNamespace(**{k.name: _par(table.define(k, _f, LOOPS, globals(), __file__))
                                     for k in table.KERNELS},
                                  **{k.name + "_segments": _par(table.define(k, _f, LOOPS, globals(), __file__, True))
                                     for k in table.KERNELS if k.segments})
serial = types.SimpleNamespace(**{name: _serial_twin(getattr(parallel, name)) for name in KERNELS})


def launch(kernel: Kernel, work: int, *args: object, segmented: bool = False) -> None:
    """Run ``kernel(*args)`` (its segmented twin with ``segmented``) on the threads
    :func:`.threads.plan` gives a call of ``work`` cost units: the serial twin on one, the parallel
    kernel on more."""
    name = kernel.name + ("_segments" if segmented else "")
    n = threads.plan(work)
    if n > 1:
        with threads.using(n) as used:
            if used > 1:
                getattr(parallel, name)(*args)
                return
    getattr(serial, name)(*args)
