"""The one table of kernels: each kernel's name, the :mod:`.arith` builder that defines its block
function (of the same name), and how it loops that function.

- ``INDEX`` kernels ``k(nb, ...)`` call ``f(b, ...)`` for every index b < nb (an element, a bucket, a
  column, a packed group);
- ``RANGE`` kernels ``k(nb, n, ...)`` call ``f(i0, i1, u, ...)`` on consecutive ranges of [0, n) with
  a float32 scratch buffer u: ``cpu.CHUNK`` elements per CPU iteration, 4 per GPU thread;
- ``SPAN`` kernels ``k(nb, n, span, ...)`` (the fused DQSG passes) call ``f(i0, i1, s0, s1, ...)`` on
  ranges of ``span`` elements with two scratch buffers of dtypes ``scratch``; a parameter ``row`` of f
  receives the range's index. f is a sequence of ``phases`` (range functions, each with the unit it
  works in): the CPU calls f on a range; the GPU gives a range to a CUDA block, whose threads run
  each phase on neighbouring units with the scratch in shared memory (:mod:`.cuda`).

:mod:`.cpu` and :mod:`.cuda` compile every kernel of :data:`KERNELS` from their own loop templates
(:func:`define`); :mod:`.ops` launches them by these entries (``table.dqsg_encode``), so
that going to an entry's definition leads to the builder that holds its arithmetic.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import arith
from .arith import buckets, dqsg, fields, fused, nested, packing, qsgd, rans, rotation, streams

INDEX, RANGE, SPAN = "index", "range", "span"
SEGMENTED = "segmented"  # the loop templates' key suffix (``templates[kind, SEGMENTED]``) of segmented twins

#: how a segmented twin rebinds a block parameter to its tensor's part (columns of
#: :data:`.arith.segments.COLUMNS`): a view of a flat buffer, or a scalar of the segment's row
REBIND = {"elements": "{p}[segs[s, 2]:segs[s, 3]]", "buckets": "{p}[segs[s, 4]:segs[s, 5]]",
          "words": "{p}[segs[s, 6]:segs[s, 7]]", "packed": "{p}[segs[s, 6]:segs[s, 7]]",
          "step": "np.uint64(segs[s, 8])", "tensor_id": "np.uint64(segs[s, 9])", "arg0": "segs[s, 10]",
          "arg1": "segs[s, 11]"}
SCALAR_COLUMNS = ("step", "tensor_id", "arg0", "arg1")


@dataclass(frozen=True)
class Kernel:
    name: str  #: the kernel's name, and its block function's in ``builder``
    builder: Callable  #: the :mod:`.arith` builder that defines the block function
    kind: str = INDEX  #: INDEX, RANGE or SPAN
    scratch: tuple[str, ...] = ()  #: SPAN: NumPy dtype names of the two scratch buffers
    #: SPAN: the block function's phases in order, (range function of ``builder``, the expression of
    #: its unit in elements over the kernel's parameters): f(i0, i1, ...) runs them in turn on [i0, i1)
    phases: tuple[tuple[str, str], ...] = ()
    #: INDEX: the block function's cooperative twin ``f(b, t, nt, red, ...)`` in ``builder``, which the
    #: GPU runs with one CUDA block per index (thread t of nt; red: a float64 of shared memory per
    #: thread) where the template set has "threads" loops; the same bits as the block function
    threads: str = ""
    cost: int = 1  #: INDEX: CPU cost units per element of its largest tensor (:mod:`.threads`)
    #: (block parameter, :data:`REBIND` key) pairs: the kernel also has a segmented twin
    #: ``<name>_segments(nb, [span,] segs, ...)`` that runs it over several tensors in one launch
    segments: tuple[tuple[str, str], ...] = ()
    unit: str = "elements"  #: what a segment's column 1 counts for this kernel: "elements" or "buckets"


def loop_source(kernel: Kernel, params: tuple[str, ...], templates: dict, segmented: bool = False,
                phase_params: dict[str, tuple[str, ...]] | None = None) -> str:
    """Source of ``kernel``'s loop from ``templates[kernel.kind]``, for a block function with parameter
    names ``params``. The template's fields: ``{name}``, ``{params}`` (the kernel's parameters after
    nb, n, span: the block's own, less ``row``), ``{block}`` (the global name of the block function,
    ``_<name>``), ``{args}`` (the block's arguments after index, range and scratch: ``row`` becomes
    ``b``), ``{t0}``, ``{t1}`` (scratch dtypes), ``{hist}`` and ``{flush}`` (the snippets
    ``templates["hist"]`` and ``templates["flush"]`` for a kernel with a histogram ``counts``, else
    empty) and ``{phases}``: each phase of ``kernel.phases`` (whose
    parameter names ``phase_params`` gives) as ``templates["phase"]`` with ``{fn}`` (its global name),
    ``{unit}`` and ``{args}`` (its arguments after i0, i1: the block's scratch names become views
    ``s0[a - i0:]``, ``s1[a - i0:]`` at the phase's unit a; ``counts`` and ``row`` the template's
    ``hist`` and row 0). ``segmented``: the segmented twin from ``templates[kind, SEGMENTED]``, named
    ``<name>_segments``, its parameters rebound by ``kernel.segments`` (:data:`REBIND`; the scalar
    ones leave the signature)."""
    lead = {INDEX: 1, RANGE: 3, SPAN: 4}[kernel.kind]
    own = params[lead:]
    taken = {"nb", "n", "span", "b", "s0", "s1", "s", "segs", "i0", "i1", "r", "c", "a", "v", "hist", "red"} & set(own)
    if taken:
        raise ValueError(f"{kernel.name}: block parameters {sorted(taken)} clash with the loop's names")
    rebind = dict(kernel.segments) if segmented else {}
    unknown = set(rebind) - set(own)
    if unknown:
        raise ValueError(f"{kernel.name}: segments rebind {sorted(unknown)}, which are not block parameters")
    t0, t1 = kernel.scratch or ("", "")
    row = "r" if segmented else "b"  # a segmented template's histogram row: its block (CPU) or segment (GPU)

    def bind(p: str) -> str:
        return REBIND[rebind[p]].format(p=p) if p in rebind else p

    args = [row if p == "row" else bind(p) for p in own]
    phases = []
    for fn, unit in kernel.phases if "phase" in templates else ():
        names = (phase_params or {})[fn][2:]
        stray = set(names) - set(params)
        if stray:
            raise ValueError(f"{kernel.name}: phase {fn} takes {sorted(stray)}, which are not block parameters")
        views = {params[2]: "s0[a - i0:]", params[3]: "s1[a - i0:]", "counts": "hist", "row": "0"}
        phases.append(templates["phase"].format(fn=f"_{fn}", unit=unit,
                                                args=", ".join(views.get(p) or bind(p) for p in names)))
    counted = "counts" in own  # a histogram: the template's "hist" and "flush" snippets
    kind = "threads" if kernel.threads and "threads" in templates else kernel.kind
    return templates[(kind, SEGMENTED) if segmented else kind].format(
        name=kernel.name + ("_segments" if segmented else ""), block=f"_{kernel.name}", threads=f"_{kernel.threads}",
        params=", ".join(p for p in own if p != "row" and rebind.get(p) not in SCALAR_COLUMNS),
        args=", ".join(args), t0=t0, t1=t1, phases="".join(phases),
        hist=templates.get("hist", "") if counted else "", flush=templates.get("flush", "") if counted else "")


def define(kernel: Kernel, blocks: object, templates: dict, namespace: dict[str, object],
           filename: str, segmented: bool = False) -> types.FunctionType:
    """``kernel``'s loop from ``templates``, around its block function in ``blocks`` (what
    :func:`.arith.build` returned), as a function of the module whose globals are ``namespace``
    (compiled as code of ``filename``, that module's file). The block function becomes the global
    ``_<name>`` there: a kernel reaches a device function through its module's globals, which
    Numba's disk cache can key (a closure's cells enter the cache key with a per-process id of the
    dispatcher, so a closure kernel would be compiled again in every process)."""
    def names(f: object) -> tuple[str, ...]:
        code = f.py_func.__code__  # type: ignore[attr-defined]
        return code.co_varnames[:code.co_argcount]

    block = getattr(blocks, kernel.name)
    namespace["_" + kernel.name] = block
    namespace["_segment_of"] = blocks.segment_of
    for fn in [fn for fn, _ in kernel.phases] + ([kernel.threads] if kernel.threads else []):
        namespace["_" + fn] = getattr(blocks, fn)
    if kernel.threads and names(getattr(blocks, kernel.threads))[4:] != names(block)[1:]:
        raise ValueError(f"{kernel.name}: {kernel.threads} must take (b, t, nt, red) and then the block's parameters")
    source = loop_source(kernel, names(block), templates, segmented,
                         {fn: names(getattr(blocks, fn)) for fn, _ in kernel.phases})
    scope: dict[str, object] = {}
    exec(compile(source, filename, "exec"), namespace, scope)
    return scope[kernel.name + ("_segments" if segmented else "")]  # type: ignore[return-value]


def source_stamp() -> str:
    """Hash of the arithmetic's sources and of this table: the CPU kernels carry it in their names, so
    Numba's disk cache (keyed by the file that defines a kernel, :mod:`.cpu`) never serves a kernel
    compiled from other arithmetic."""
    files = sorted(Path(arith.__file__).parent.glob("*.py")) + [Path(__file__)]
    return hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


# ----------------------------------------------------------------------------- range kernels
KEY_SEGMENTS = (("step", "step"), ("tid", "tensor_id"))  # each tensor's own dither key
dither_fill = Kernel("dither_fill", streams.build, RANGE)
dither_bins = Kernel("dither_bins", streams.build, RANGE, segments=(("out", "elements"), *KEY_SEGMENTS))
dqsg_encode = Kernel("dqsg_encode", dqsg.build, RANGE,
                     segments=(("g", "elements"), ("delta", "buckets"), ("codes", "elements"), *KEY_SEGMENTS))
dqsg_decode = Kernel("dqsg_decode", dqsg.build, RANGE,
                     segments=(("ksum", "elements"), ("delta", "buckets"), ("out", "elements"), *KEY_SEGMENTS))
dqsg_aggregate = Kernel("dqsg_aggregate", dqsg.build, RANGE)
# the stock path's nested sums over several tensors: each tensor's nesting ratio in arg0
nested_encode = Kernel("nested_encode", nested.build, RANGE,
                       segments=(("g", "elements"), ("delta", "buckets"), ("symbols", "elements"), ("rho", "arg0"),
                                 *KEY_SEGMENTS))
nested_decode = Kernel("nested_decode", nested.build, RANGE,
                       segments=(("symbols", "elements"), ("delta", "buckets"), ("side", "elements"),
                                 ("out", "elements"), ("kout", "elements"), ("rho", "arg0"), *KEY_SEGMENTS))
qsgd_encode = Kernel("qsgd_encode", qsgd.build, RANGE,
                     segments=(("g", "elements"), ("norm", "buckets"), ("codes", "elements"), *KEY_SEGMENTS))
PACK_GROUP = "(per_byte if radix > 0 else 8)"  # symbols per packing unit: a byte of digits, or 8 symbols of nbits
PACKED_SEGMENTS = (("delta", "buckets"), ("packed", "packed"), *KEY_SEGMENTS)
dqsg_encode_packed = Kernel("dqsg_encode_packed", fused.build, SPAN, ("float32", "uint8"),
                            phases=(("quantize_symbols", "4"), ("pack_symbols", PACK_GROUP)),
                            segments=(("g", "elements"), *PACKED_SEGMENTS))
dqsg_decode_packed = Kernel("dqsg_decode_packed", fused.build, SPAN, ("float32", "uint8"),
                            phases=(("unpack_symbols", PACK_GROUP), ("reconstruct_own", "4")),
                            segments=(("out", "elements"), *PACKED_SEGMENTS))
FIELD_SEGMENTS = (("delta", "buckets"), ("words", "words"), *KEY_SEGMENTS)
dqsg_encode_fields = Kernel("dqsg_encode_fields", fused.build, SPAN, ("float32", "uint8"),
                            phases=(("quantize_symbols", "4"), ("symbol_words", "per_word")),
                            segments=(("g", "elements"), *FIELD_SEGMENTS))
dqsg_decode_fields = Kernel("dqsg_decode_fields", fused.build, SPAN, ("float32", "int32"),
                            phases=(("word_sums", "per_word"), ("reconstruct_sums", "4")),
                            segments=(("out", "elements"), *FIELD_SEGMENTS))

# ----------------------------------------------------------------------------- index kernels
bucket_absmax = Kernel("bucket_absmax", buckets.build, segments=(("g", "elements"), ("out", "buckets")),
                       unit="buckets", threads="bucket_absmax_threads")
bucket_checksum = Kernel("bucket_checksum", buckets.build, segments=(("k", "elements"), ("out", "buckets")),
                         unit="buckets", threads="bucket_checksum_threads")
bucket_l2 = Kernel("bucket_l2", buckets.build, segments=(("g", "elements"), ("out", "buckets")), unit="buckets",
                   threads="bucket_l2_threads")
bucket_step = Kernel("bucket_step", buckets.build)
hadamard_rotate = Kernel("hadamard_rotate", rotation.build, cost=16,  # log2(d) passes: costed as threads.RANGE_COST
                         segments=(("src", "elements"), ("x", "elements"), *KEY_SEGMENTS),
                         unit="buckets", threads="hadamard_rotate_threads")
scale_decode = Kernel("scale_decode", qsgd.build,
                      segments=(("codes", "elements"), ("scale", "buckets"), ("out", "elements")))
# 1-bit SGD over several tensors: each tensor's columns in the bucket columns of the segment table,
# its partial sums in the word columns, its column count and lanes in arg0 and arg1
COLUMN_MEANS = (("pos_mean", "buckets"), ("neg_mean", "buckets"))
onebit_lane_sums = Kernel("onebit_lane_sums", qsgd.build,
                          segments=(("g", "elements"), ("partial", "words"), ("cols", "arg0"), ("lanes", "arg1")))
onebit_column_means = Kernel("onebit_column_means", qsgd.build,
                             segments=(("partial", "words"), *COLUMN_MEANS, ("cols", "arg0"), ("lanes", "arg1")))
onebit_encode = Kernel("onebit_encode", qsgd.build)
onebit_decode = Kernel("onebit_decode", qsgd.build,
                       segments=(("bits", "elements"), *COLUMN_MEANS, ("out", "elements"), ("cols", "arg0")))
bitpack = Kernel("bitpack", packing.build, segments=(("symbols", "elements"), ("out", "packed")))
bitunpack = Kernel("bitunpack", packing.build, segments=(("packed", "packed"), ("out", "elements")))
radixpack = Kernel("radixpack", packing.build, segments=(("symbols", "elements"), ("out", "packed")))
radixunpack = Kernel("radixunpack", packing.build, segments=(("packed", "packed"), ("out", "elements")))
modadd_bits = Kernel("modadd_bits", packing.build)
modadd_radix = Kernel("modadd_radix", packing.build)
# summable fields of several tensors, each with its own radix (arg0) and fields per word (arg1); the
# splitter's table of fl(1/R^j) of each tensor in the bucket columns
FIELD_RADIX = (("radix", "arg0"), ("per_word", "arg1"))
pack_sum_fields = Kernel("pack_sum_fields", fields.build,
                         segments=(("codes", "elements"), ("words", "words"), *FIELD_RADIX))
# rANS over several tensors: each tensor's chunks in the bucket columns, its encoder's scratch
# regions in the word columns, its length in arg0 (the decoder reads the group's stream as a whole)
rans_encode = Kernel("rans_encode", rans.build, cost=16,  # a serial state per chunk: costed like a range kernel
                     segments=(("sym", "elements"), ("ctx", "elements"), ("scratch", "words"), ("lengths", "buckets")))
rans_gather = Kernel("rans_gather", rans.build)
rans_decode = Kernel("rans_decode", rans.build, cost=16,
                     segments=(("offsets", "buckets"), ("lengths", "buckets"), ("total", "arg0"), ("ctx", "elements"),
                               ("out", "elements"), ("status", "buckets")))
unpack_sum_fields = Kernel("unpack_sum_fields", fields.build,
                           segments=(("words", "words"), ("inverses", "buckets"), ("ksum", "elements"), *FIELD_RADIX))

#: every kernel, in the order above
KERNELS: tuple[Kernel, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Kernel))
