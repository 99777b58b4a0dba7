"""The core under :mod:`.ops`: where a kernel runs, how it is launched, and the argument checks.

:func:`launch` takes a kernel of :mod:`.table` and its arguments (torch tensors and Python or NumPy
scalars), picks the target from the tensors' device (or :func:`force_target`), converts the
arguments (zero-copy NumPy views on the CPU, ``__cuda_array_interface__`` views on a GPU) and runs
the CPU twin (:func:`.cpu.launch`) or the CUDA kernel (:func:`.cuda.launch`, on torch's current
CUDA stream). :data:`launches` counts the launches per target. The checks raise errors that name
the argument.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from . import cpu, threads
from .arith.constants import GPU_TILE
from .key import MAX_ELEMENTS, DitherKey
from .segments import Segments, Shares
from .sizes import num_buckets
from .table import INDEX, RANGE, SPAN, Kernel

_forced: str | None = None
#: kernel launches per target ("cpu", "cuda") in this process: where the arithmetic really ran
launches: Counter[str] = Counter()


@contextmanager
def force_target(target: str | None) -> Iterator[None]:
    """Run kernels on ``target`` ("cpu" or "cuda") regardless of where the tensors live."""
    global _forced
    if target not in (None, "cpu", "cuda"):
        raise ValueError(f"target must be 'cpu', 'cuda' or None, got {target!r}")
    old, _forced = _forced, target
    try:
        yield
    finally:
        _forced = old


def target(kernel: Kernel, *args: object) -> str:
    """Where ``kernel`` runs on these arguments: "cuda" if its tensors are on a GPU, else "cpu";
    :func:`force_target` overrides. Its tensors must all be on one device (any mixture raises)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{kernel.name}: all tensors must be on the same device, got {sorted(map(str, devices))}")
    return _forced or ("cuda" if any(t.is_cuda for t in tensors) else "cpu")


def _convert(kernel: Kernel, a: object) -> object:
    """One kernel argument as Numba takes it: an array view of a tensor, a typed NumPy scalar."""
    if isinstance(a, torch.Tensor):
        if a.is_cuda:
            from numba import cuda as nb_cuda

            return nb_cuda.as_cuda_array(a)
        return a.numpy()
    if isinstance(a, np.generic):  # typed NumPy scalars pass as they are (np.float64 is a float)
        return a
    if isinstance(a, bool):
        raise TypeError(f"{kernel.name}: unexpected bool argument")
    if isinstance(a, int):
        return np.int64(a)
    if isinstance(a, float):
        return np.float32(a)
    return a


def launch(kernel: Kernel, count: int, *args: object, span: int | None = None) -> None:
    """Run ``kernel`` over ``count`` indices, or over ``count`` elements for a range kernel (the CPU
    takes chunks of ``cpu.CHUNK`` elements, each GPU thread takes 4), or for a span kernel over
    ranges of ``span`` elements on either device (``span`` is passed to the kernel after ``count``)."""
    tensors, on_gpu, where = _placement(kernel, args, span)
    if count == 0:
        return
    launches[where] += 1
    nblocks = count
    if kernel.kind == SPAN:
        nblocks = (count + span - 1) // span
        args = (count, span, *args)
    elif kernel.kind == RANGE:
        per = cpu.CHUNK if where == "cpu" else 4
        nblocks = (count + per - 1) // per
        args = (count, *args)
    # Cost units for kernels/threads.py, which picks the serial twin or the parallel kernel.
    largest = max((t.numel() for t in tensors), default=0)
    work = count * threads.RANGE_COST if kernel.kind != INDEX else max(count, largest) * kernel.cost
    _run(kernel, where, on_gpu, nblocks, work, args, False)


def launch_segments(kernel: Kernel, segments: Segments, *args: object, span: int | None = None,
                    per_word: int = 1, shares: Shares | None = None) -> None:
    """Run ``kernel``'s segmented twin once over every tensor of ``segments``, laid end to end in
    the flat buffers among ``args`` (the same calls, indices and keys as one :func:`launch` per
    tensor; ``per_word``: the fields per word of a ``words`` buffer; ``shares``: each tensor's
    sizes and parameters where the defaults do not fit). ``args`` are the twin's: the kernel's less
    the parameters the segment table holds (each tensor's step and tensor id, its own arguments)."""
    tensors, on_gpu, where = _placement(kernel, args, span)
    per = {INDEX: 1, RANGE: cpu.CHUNK if where == "cpu" else 4, SPAN: span}[kernel.kind]
    rows = segments.table(kernel.unit, per, per_word, shares)
    nblocks = int(rows[-1, 0] + -(-rows[-1, 1] // per)) if len(rows) else 0
    if nblocks == 0:
        return
    launches[where] += 1
    device = tensors[0].device if tensors else torch.device("cpu")
    segs = torch.from_numpy(rows).to(device)
    lead = (span, segs) if kernel.kind == SPAN else (segs,)
    work = segments.elements * (threads.RANGE_COST if kernel.kind != INDEX else kernel.cost)
    _run(kernel, where, on_gpu, nblocks, work, (*lead, *args), True)


def _placement(kernel: Kernel, args: tuple, span: int | None) -> tuple[list[torch.Tensor], bool, str]:
    """(the tensors among a launch's arguments, whether any is on a GPU, the target that runs it);
    TypeError for a span kernel called without ``span``."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if kernel.kind == SPAN and span is None:
        raise TypeError(f"{kernel.name}: a span kernel needs span=")
    return tensors, any(t.is_cuda for t in tensors), target(kernel, *tensors)


def _run(kernel: Kernel, where: str, on_gpu: bool, nblocks: int, work: int, args: tuple, segmented: bool) -> None:
    """Convert the arguments and run the kernel (or its segmented twin) on ``where``."""
    conv = [_convert(kernel, a) for a in args]
    if where == "cpu":
        if on_gpu:
            raise ValueError(f"{kernel.name}: CUDA tensors cannot run on the CPU target")
        cpu.launch(kernel, work, np.int64(nblocks), *conv, segmented=segmented)
        return
    from numba import cuda as nb_cuda

    from . import cuda as ck

    stream = nb_cuda.external_stream(torch.cuda.current_stream().cuda_stream) if on_gpu else 0
    ck.launch(kernel, np.int64(nblocks), stream, *conv, segmented=segmented)


# ----------------------------------------------------------------------------- checks
def vec(name: str, t: object, dtype: torch.dtype, n: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n}")
    if t.numel() > MAX_ELEMENTS:
        raise ValueError(f"{name} has {t.numel()} elements, more than the dither counter's {MAX_ELEMENTS}")
    return t


def output(out: torch.Tensor | None, name: str, n: int, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=dtype, device=like.device)
    return vec(name, out, dtype, n)


def check_senders(key: DitherKey, senders: int) -> None:
    if key.ranks and key.sender + senders > key.ranks:
        raise ValueError(f"senders {key.sender} .. {key.sender + senders - 1} are not all among the "
                         f"{key.ranks} ranks of the stratified dither")


def scales(name: str, t: torch.Tensor, n: int, bucket: int) -> torch.Tensor:
    return vec(name, t, torch.float32, num_buckets(n, bucket))


# ----------------------------------------------------------------------------- fused passes
MAX_SCALED_SPAN = 1 << 16  # the CPU computes scales inside the fused pass when whole buckets fit a range this long


def range_span(where: str, group: int, bucket: int | None = None) -> tuple[int, bool]:
    """Range length of a fused pass on target ``where`` and whether a range holds whole buckets of
    ``bucket`` (then the encoder computes their scales itself; CPU only). Ranges start at multiples
    of 4 (a Philox block) and of ``group`` (the symbols of a packing unit, or the fields of a
    summable word)."""
    unit = math.lcm(4, group)
    if where == "cuda":  # a range per CUDA block, its scratch in shared memory (kernels/cuda.py)
        return unit * (GPU_TILE // unit), False
    if bucket is not None and math.lcm(bucket, unit) <= MAX_SCALED_SPAN:
        whole = math.lcm(bucket, unit)
        return whole * max(1, cpu.CHUNK // whole), True
    return unit * max(1, cpu.CHUNK // unit), False


def histogram(n: int, span: int, alphabet: int, like: torch.Tensor) -> torch.Tensor:
    """Zeroed symbol counts for a fused encoder: one row per range on the CPU (a range owns its row),
    at most 1024 rows on the GPU (threads share rows through atomic adds); summed by the caller."""
    rows = max(1, min((n + span - 1) // span, 1024 if like.is_cuda else 1 << 62))
    return torch.zeros((rows, alphabet), dtype=torch.int64, device=like.device)
