"""``hvdquant.DistributedOptimizer``: Horovod's optimizer with payload transports.

Same call shape as ``hvd.DistributedOptimizer``, plus ``codec=`` and ``reducer=``::

    opt = hvdquant.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                        codec=hvdquant.NDQSG(levels=(3, 1), bucket_size=512),
                                        reducer="allgather")

Built without patching Horovod: the class is assembled with one ``type()`` call from Horovod's
``_DistributedOptimizer.__dict__`` (subclassing it would recurse, as it calls
``super(self.__class__, self)``) with two overrides. ``_allreduce_grad_async`` (run by Horovod's
gradient hook) queues the gradient in the exchange, returning a callable handle; ``synchronize``
runs those handles in **sorted parameter-name order**: the first one encodes and sends every queued
gradient, fused into groups of at most ``fusion_threshold`` gradient bytes (one collective round per
group and phase, and for most codecs a constant number of kernel launches per group, whatever the
number of tensors), and second rounds start in the same order on every rank whatever order the
hooks fired in.

CUDA gradients are encoded and decoded on their device; the fused group buffers travel through
host memory under a CPU-only Horovod and stay on the GPU under Horovod's NCCL build.

Rules:
- a gradient with fewer than ``min_numel`` elements or fewer than 2 dimensions (biases, norms)
  is not compressed (PowerSGD's rule): its float32 values travel in the same fused groups and are
  summed in rank order, so that training stays bit-reproducible (Horovod's float allreduce order
  can vary with its fusion);
- the dither seed is agreed at the first step (rank 0's ``seed``, default its
  ``torch.initial_seed()``), together with a check that every rank has the same codec, reducer,
  op and parameter names/shapes; a mismatch fails on every rank with the difference named;
- dithers are keyed by (seed, step, parameter name, rank): the step counts exchanges per name;
- refused with an error: ``groups``/``num_groups``, Adasum, ``gradient_predivide_factor`` ≠ 1,
  non-global process sets, sparse gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from hvdquant.codecs.base import Codec
from hvdquant.codecs.lgc import LGC
from hvdquant.transports.collectives import HorovodCollectives
from hvdquant.transports.exchange import make_exchange
from hvdquant.transports.payload import FUSION_THRESHOLD
from hvdquant.transports.session import Session


def _allreduce_grad_async(self, p):
    if p.grad is None:
        p.grad = p.data.new(p.size()).zero_()
    name = self._parameter_names.get(p)
    tensor = p.grad
    if tensor.is_sparse:
        raise NotImplementedError(f"hvdquant.DistributedOptimizer: '{name}' has a sparse gradient; "
                                  "sparse gradients are not supported (use dense embeddings)")
    session, min_numel = self._hvdquant, self._hvdquant_min_numel
    session.agree(lambda: {"min_numel": min_numel, "parameters": sorted(
        (n, tuple(q.shape)) for q, n in self._parameter_names.items() if q.requires_grad)})
    buffer = session.buffer([(name, tensor)], min_numel)
    finish = session.exchange.start(buffer)
    return (lambda: buffer.unflatten(finish())[name]), None


def _synchronize(self):
    import horovod.torch as hvd

    missing = self._requires_update - set(self._handles.keys())
    for p in missing:
        self._handles[p] = self._allreduce_grad_async(p)
    for p in sorted(self._handles, key=lambda q: self._parameter_names.get(q)):
        handle, _ = self._handles[p]
        if handle is None:
            handle, _ = self._allreduce_grad_async(p)
        output = handle() if callable(handle) else hvd.synchronize(handle)
        self._allreduce_delay[p] = self.backward_passes_per_step
        p.grad.set_(output)
    self._handles.clear()
    self._synchronized = True


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None, *,
                         codec: Codec | LGC | None = None, reducer: str = "allgather",
                         backward_passes_per_step: int = 1, op: Any = None,
                         gradient_predivide_factor: float = 1.0, groups: Any = None, num_groups: int = 0,
                         sparse_as_dense: bool = False, process_set: Any = None,
                         seed: int | None = None, min_numel: int = 1024,
                         fusion_threshold: int = FUSION_THRESHOLD) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` like ``hvd.DistributedOptimizer``, exchanging gradients with ``codec`` over
    ``reducer`` ("allgather", "scatter_reduce", or "allreduce" for DQSG and NDQSG). ``op`` is
    ``hvd.Average`` (default) or ``hvd.Sum``.
    Statistics: ``opt.hvdquant_stats()``; error-feedback residuals travel in ``opt.state_dict()``."""
    import horovod.torch as hvd
    from horovod.torch.optimizer import _DistributedOptimizer

    op = hvd.Average if op is None else op
    if groups is not None or num_groups:
        raise NotImplementedError("hvdquant.DistributedOptimizer does not support groups/num_groups: "
                                  "Horovod's grouped path bypasses the hook hvdquant uses")
    if op not in (hvd.Average, hvd.Sum):
        raise NotImplementedError("hvdquant.DistributedOptimizer supports op=hvd.Average or hvd.Sum (not Adasum)")
    if gradient_predivide_factor != 1.0:
        raise NotImplementedError("gradient_predivide_factor is not supported by hvdquant.DistributedOptimizer")
    if process_set is not None and process_set is not hvd.global_process_set:
        raise NotImplementedError("hvdquant.DistributedOptimizer supports the global process set only")
    if sparse_as_dense:
        raise NotImplementedError("sparse_as_dense is not supported: pass dense gradients")
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"min_numel must be a non-negative int, got {min_numel!r}")
    exchange = make_exchange(codec, reducer, op == hvd.Average, HorovodCollectives(), fusion_threshold)
    session = Session(exchange, seed, "hvdquant.optimizer")

    attrs = dict(_DistributedOptimizer.__dict__)
    attrs["_allreduce_grad_async"] = _allreduce_grad_async
    attrs["synchronize"] = _synchronize
    attrs["hvdquant_stats"] = lambda self: self._hvdquant.exchange.statistics()
    attrs["state_dict"] = _state_dict
    attrs["load_state_dict"] = _load_state_dict
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), attrs)
    opt = cls.__new__(cls)
    # before __init__: hooks may fire as soon as they are registered
    opt._hvdquant, opt._hvdquant_min_numel = session, min_numel
    cls.__init__(opt, optimizer.param_groups, named_parameters, hvd.Compression.none, backward_passes_per_step,
                 op, 1.0, None, False, hvd.global_process_set)
    return opt


def _state_dict(self):
    sd = super(self.__class__, self).state_dict()
    sd["hvdquant"] = self._hvdquant.state_dict()
    return sd


def _load_state_dict(self, state_dict):
    state_dict = dict(state_dict)
    extra = state_dict.pop("hvdquant", None)
    if extra is not None:
        self._hvdquant.load_state_dict(extra)
    self._handles = {}
    self._synchronized = False
    self._should_synchronize = True
    for p in self._allreduce_delay:
        self._allreduce_delay[p] = self.backward_passes_per_step
    super(self.__class__, self).load_state_dict(state_dict)
