"""A simulated GPU for device-placement tests on machines without one.

An :class:`OnGPU` tensor lives in host memory but says ``device == cuda:0`` and ``is_cuda``.
Inside :func:`simulated_gpu`, a torch function mode (:class:`SimulatedGPU`) keeps that tag through
every torch call: an operation on GPU tensors gives GPU tensors; ``.cpu()``, ``.to("cpu")`` and
factories without ``device=`` give host tensors; ``.cuda()``, ``.to(cuda)`` and ``device=cuda``
give GPU tensors (a transfer copies). It applies CUDA's rules: an operation mixing GPU tensors with
host tensors of one or more dimensions raises (host scalars, host indices into a GPU tensor and
copies between devices are allowed, as on CUDA), and a GPU tensor has no NumPy view. So a tensor
made on the host by mistake (a buffer allocated without ``device=``, a collective's result left in
host memory, a checkpoint's state loaded to the host) fails where it meets the gradient's tensors,
as on a real GPU. :mod:`hvdquant.kernels.ops` sees CUDA tensors, checks their devices and launches
the CUDA kernels, which run in Numba's CUDA simulator on the memory behind the tags; the two things
only a GPU provides at that boundary (device arrays, torch's current CUDA stream) are stood in for.

Also here: :func:`run_hook`, the DDP hook driven bucket by bucket without DDP (whose autograd
gradients cannot carry the tag), on the host or on the simulated GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

import hvdquant
from hvdquant.kernels import ops, ops_fields

GPU = torch.device("cuda", 0)


class OnGPU(torch.Tensor):
    """A tensor of the simulated GPU: host memory tagged ``cuda:0`` (see :class:`SimulatedGPU`)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:
        return GPU

    @property
    def is_cuda(self) -> bool:
        return True


def _untagged(x: Any) -> Any:
    return x.as_subclass(torch.Tensor) if isinstance(x, OnGPU) else x


def _tagged(x: Any) -> Any:
    return x.as_subclass(OnGPU) if isinstance(x, torch.Tensor) and not isinstance(x, OnGPU) else x


def _map(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    """``fn`` on every tensor of ``x``, through lists, dicts and tuples (named ones, torch's return
    types); anything else as it is (a torch.Size too: as a plain tuple it would mean other things,
    ``t.new((3,))`` is the tensor [3.])."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, list):
        return [_map(fn, v) for v in x]
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    if isinstance(x, tuple) and not isinstance(x, torch.Size):
        items = [_map(fn, v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def _tensors(x: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map(found.append, x)
    return found


def _on_gpu(device: str | torch.device) -> bool:
    """Whether a device argument names the simulated GPU (the only GPU there is)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index not in (None, GPU.index):
        raise RuntimeError(f"CUDA error: invalid device ordinal ({d})")
    return d.type == "cuda"


class SimulatedGPU(TorchFunctionMode):
    """Keeps :class:`OnGPU` tags through torch calls and enforces CUDA's device rules."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        args, kwargs = tuple(args), dict(kwargs or {})
        source = bool(args) and isinstance(args[0], OnGPU)
        if source and func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        if source and func is torch.Tensor.get_device:
            return GPU.index
        on_gpu, func, args, kwargs = self._destination(func, args, kwargs)
        moved = on_gpu is not None and on_gpu != source and func in (torch.Tensor.to, torch.Tensor.cpu)
        if on_gpu is None:  # an operation: it runs where its operands are, all on one device
            self._check(func, args, kwargs)
            on_gpu = any(isinstance(t, OnGPU) for t in _tensors((args, kwargs)))
        out = func(*_map(_untagged, args), **_map(_untagged, kwargs))
        if moved:  # a transfer between devices copies (the host memory behind a tag is not shared)
            out = out.clone()
        return _map(_tagged, out) if on_gpu else out

    @staticmethod
    def _destination(func: Callable, args: tuple, kwargs: dict) -> tuple[bool | None, Callable, tuple, dict]:
        """For a transfer or a factory: whether its result is on the GPU, and the call with the
        device rewritten to the host memory behind the tags; None for other operations."""
        if func is torch.Tensor.cpu:
            return False, func, args, kwargs
        if func is torch.Tensor.cuda:
            return True, torch.Tensor.cpu, args[:1], {}
        if func is torch.Tensor.copy_:  # a copy between devices; the destination stays where it is
            return isinstance(args[0], OnGPU), func, args, kwargs
        if kwargs.get("device") is not None:
            return _on_gpu(kwargs["device"]), func, args, {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to:
            for i, a in enumerate(args[1:], 1):
                if isinstance(a, torch.Tensor):  # .to(other): other's device and dtype
                    return isinstance(a, OnGPU), func, args, kwargs
                if isinstance(a, (str, torch.device)):
                    return _on_gpu(a), func, (*args[:i], "cpu", *args[i + 1:]), kwargs
        return None, func, args, kwargs

    @staticmethod
    def _check(func: Callable, args: tuple, kwargs: dict) -> None:
        """One device per operation. Host scalars (0-dim) mix with GPU tensors; host indices may
        index a GPU tensor; a slice assignment is a copy, from any device."""
        operands: Any = (args, kwargs)
        if func is torch.Tensor.__getitem__ and isinstance(args[0], OnGPU):
            operands = args[0]
        elif func is torch.Tensor.__setitem__:
            advanced = bool(_tensors(args[1]))
            operands = ((args[0], args[2]) if isinstance(args[0], OnGPU) else args) if advanced else ()
        tensors = _tensors(operands)
        if any(isinstance(t, OnGPU) for t in tensors) and any(not isinstance(t, OnGPU) and t.dim() for t in tensors):
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! (in {getattr(func, '__name__', func)})")


def _device_array(t: torch.Tensor) -> Any:
    """numba.cuda.as_cuda_array for the simulator: the host memory behind a GPU tensor."""
    if not isinstance(t, OnGPU):
        raise TypeError(f"a {t.device} tensor reached a CUDA kernel")
    with torch._C.DisableTorchFunction():
        return t.as_subclass(torch.Tensor).numpy()


def available() -> bool:
    """Whether the simulated GPU can run here: Numba's CUDA simulator is on (tests/conftest.py) and
    there is no real GPU (whose ``cuda:0`` the tags would shadow; launch/gpu_e2e.sh runs that)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM) and not torch.cuda.is_available()


@contextmanager
def simulated_gpu() -> Iterator[None]:
    """Inside: :class:`OnGPU` tensors follow CUDA's rules, and the kernels of :mod:`hvdquant.kernels.ops`
    run on them in Numba's CUDA simulator."""
    from numba import cuda

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(cuda, "as_cuda_array", _device_array, create=True))
        stack.enter_context(mock.patch.object(cuda, "external_stream", lambda ptr: 0))
        stack.enter_context(mock.patch.object(torch.cuda, "current_stream",
                                              lambda device=None: SimpleNamespace(cuda_stream=0)))
        stack.callback(ops_fields._radix_inverses.cache_clear)  # its tables for cuda:0 are simulated ones
        stack.enter_context(SimulatedGPU())
        yield


# ------------------------------------------------------------------ the DDP hook without DDP
class Bucket:
    """What the hook reads of DDP's GradBucket: here one bucket of every parameter."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.params, self.flat = params, torch.cat([g.reshape(-1) for g in grads])

    def buffer(self) -> torch.Tensor:
        return self.flat

    def parameters(self) -> list[torch.Tensor]:
        return self.params

    def is_last(self) -> bool:
        return True


def host_copy(state: Any) -> Any:
    """A state dict as ``torch.load(..., map_location="cpu")`` gives it back."""
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(v) for v in state)
    return state.cpu() if isinstance(state, torch.Tensor) else state


def run_hook(make_state: Callable[[], hvdquant.ddp.State], grads_at: Callable[[int], list[torch.Tensor]],
             steps: int, restart: int | None = None, on_gpu: bool = False
             ) -> tuple[list[torch.Tensor], hvdquant.ddp.State]:
    """The hook's mean of ``grads_at(step)`` (host tensors, one per parameter, all in one bucket) at
    every step, as host copies, and the final state. ``on_gpu``: the gradients and parameters on
    the simulated GPU (call inside :func:`simulated_gpu`), every mean checked to come back there,
    and the state restarted from a checkpoint loaded to the host before step ``restart``."""
    state = make_state()
    device = GPU if on_gpu else torch.device("cpu")
    params = [torch.zeros(g.shape, device=device) for g in grads_at(0)]
    means = []
    for step in range(steps):
        if on_gpu and step == restart:
            saved = host_copy(state.state_dict())
            state = make_state()
            state.load_state_dict(saved)
        future = state.reduce(Bucket(params, [g.to(device) for g in grads_at(step)]))
        assert future.done(), f"step {step}: the step's last (only) bucket left its future pending"
        mean = future.wait()
        assert mean.device == device, f"step {step}: the mean came back on {mean.device}"
        means.append(mean.cpu())
    return means, state


def hook_on_host_and_gpu(make_state: Callable[[], hvdquant.ddp.State],
                         grads_at: Callable[[int], list[torch.Tensor]], steps: int = 4, restart: int = 2
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], hvdquant.ddp.State, Counter[str]]:
    """:func:`run_hook` on the host, then on the simulated GPU restarting from a checkpoint loaded to
    the host before step ``restart``: (host means, GPU means, the GPU run's final state, the kernel
    launches the GPU run made per target)."""
    host, _ = run_hook(make_state, grads_at, steps)
    before = ops.launches.copy()
    with simulated_gpu():
        gpu, state = run_hook(make_state, grads_at, steps, restart=restart, on_gpu=True)
    return host, gpu, state, ops.launches - before
