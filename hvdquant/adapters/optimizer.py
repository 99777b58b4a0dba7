"""``hvdquant.DistributedOptimizer``: Horovod's optimizer with payload transports.

Same call shape as ``hvd.DistributedOptimizer``, plus ``codec=`` and ``reducer=``::

    opt = hvdquant.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                        codec=hvdquant.NDQSG(levels=(3, 1), bucket_size=512),
                                        reducer="allgather")

Built without patching Horovod: the class is assembled with one ``type()`` call from Horovod's
``_DistributedOptimizer.__dict__`` (subclassing it would recurse, as it calls
``super(self.__class__, self)``) with two overrides. ``_allreduce_grad_async`` (run by Horovod's
gradient hook) encodes the gradient and starts the collectives, returning a callable handle;
``synchronize`` runs those handles in **sorted parameter-name order**, so second rounds start in
the same order on every rank whatever order the hooks fired in.

Rules:
- a gradient with fewer than ``min_numel`` elements or fewer than 2 dimensions (biases, norms)
  is not compressed (PowerSGD's rule): it is allgathered in its own dtype and summed in rank order,
  so that training stays bit-reproducible (Horovod's float allreduce order can vary with fusion);
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

from hvdquant.adapters.agreement import agree, check_seed
from hvdquant.codecs.base import Codec
from hvdquant.codecs.lgc import LGC
from hvdquant.transports.horovod_payload import PayloadExchange


def _allreduce_grad_async(self, p):
    import horovod.torch as hvd

    if p.grad is None:
        p.grad = p.data.new(p.size()).zero_()
    name = self._parameter_names.get(p)
    tensor = p.grad
    if tensor.is_sparse:
        raise NotImplementedError(f"hvdquant.DistributedOptimizer: '{name}' has a sparse gradient; "
                                  "sparse gradients are not supported (use dense embeddings)")
    state = self._hvdquant
    seed = state.agree(self)
    if tensor.numel() < state.min_numel or tensor.dim() < 2:
        state.exchange.stats.record(name, tensor.numel(), tensor)  # uncompressed bytes count too
        return _exact_small(tensor, name, self.op == hvd.Average), None
    step = state.steps.get(name, 0)
    state.steps[name] = step + 1
    return state.exchange.start(name, tensor, seed, step % (1 << 32)), None


def _exact_small(tensor: torch.Tensor, name: str, average: bool):
    """Uncompressed exchange of a small or 1-D gradient: allgather, then a sum in rank order.

    Horovod's float allreduce may sum in a different order from run to run (tensor fusion changes
    the buffers its ring cuts), which would make training non-reproducible; these tensors are small,
    so P× their bytes buys bit-exact determinism."""
    import horovod.torch as hvd

    handle = hvd.allgather_async(tensor.detach().unsqueeze(0), name=f"hvdquant.small.{name}")

    def finish() -> torch.Tensor:
        gathered = hvd.synchronize(handle)
        total = gathered[0].clone()
        for p in range(1, gathered.shape[0]):
            total += gathered[p]
        return total / gathered.shape[0] if average else total

    return finish


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


class _State:
    """Per-optimizer hvdquant state: codec, exchange, seed agreement, step counters, statistics."""

    def __init__(self, codec: Codec, reducer: str, average: bool, seed: int | None, min_numel: int) -> None:
        self.codec = codec
        self.exchange = PayloadExchange(codec, reducer, average)
        self.seed = seed
        self.min_numel = min_numel
        self.steps: dict[str, int] = {}
        self.agreed_seed: int | None = None
        self.restored_seed: int | None = None  # from a checkpoint: resumes the same dither streams

    def agree(self, opt) -> int:
        if self.agreed_seed is None:
            names = sorted((n, tuple(p.shape)) for p, n in opt._parameter_names.items() if p.requires_grad)
            cfg = {"codec": self.codec.config(), "reducer": self.exchange.reducer, "average": self.exchange.average,
                   "min_numel": self.min_numel, "seed": self.seed, "parameters": names,
                   "steps": sorted(self.steps.items()), "restored_seed": self.restored_seed,
                   "torch_threads": torch.get_num_threads() if isinstance(self.codec, LGC) else None}
            proposal = self.restored_seed if self.restored_seed is not None else self.seed
            self.agreed_seed = agree(cfg, proposal, "hvdquant.optimizer.config")
        return self.agreed_seed


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None, codec: Codec | None = None,
                         reducer: str = "allgather", backward_passes_per_step: int = 1, op: Any = None,
                         gradient_predivide_factor: float = 1.0, groups: Any = None, num_groups: int = 0,
                         sparse_as_dense: bool = False, process_set: Any = None, seed: int | None = None,
                         min_numel: int = 1024) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` like ``hvd.DistributedOptimizer``, exchanging gradients with ``codec`` over
    ``reducer`` ("allgather" or "scatter_reduce"). ``op`` is ``hvd.Average`` (default) or ``hvd.Sum``.
    Statistics: ``opt.hvdquant_stats()``; error-feedback residuals travel in ``opt.state_dict()``."""
    import horovod.torch as hvd
    from horovod.torch.optimizer import _DistributedOptimizer

    op = hvd.Average if op is None else op
    if not isinstance(codec, (Codec, LGC)):
        raise TypeError(f"codec must be an hvdquant codec (hvdquant.DQSG(...), ...), got {type(codec).__name__}")
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
    check_seed(seed)
    state = _State(codec, reducer, op == hvd.Average, seed, min_numel)

    attrs = dict(_DistributedOptimizer.__dict__)
    attrs["_allreduce_grad_async"] = _allreduce_grad_async
    attrs["synchronize"] = _synchronize
    attrs["hvdquant_stats"] = lambda self: _stats(self._hvdquant)
    attrs["state_dict"] = _state_dict
    attrs["load_state_dict"] = _load_state_dict
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), attrs)
    opt = cls.__new__(cls)
    opt._hvdquant = state  # before __init__: hooks may fire as soon as they are registered
    cls.__init__(opt, optimizer.param_groups, named_parameters, hvd.Compression.none, backward_passes_per_step,
                 op, 1.0, None, False, hvd.global_process_set)
    return opt


def _stats(state: _State) -> dict:
    ex = state.exchange
    extra = {}
    if ex.lgc is not None:
        lg = ex.lgc
        extra = {"lgc_stage_bits_per_coordinate": {k: 8.0 * lg.stage_bytes[k] / lg.stage_coordinates[k]
                                                   for k in lg.stage_bytes if lg.stage_coordinates[k]},
                 "lgc_autoencoder_parameters": lg.ae_parameters, "lgc_autoencoder_updates": lg.ae_updates,
                 "lgc_frozen": lg.frozen, "lgc_codec_seconds": lg.codec_seconds,
                 "lgc_last_train_loss": lg.train_loss[-1] if lg.train_loss else None}
    return {**extra,
        "bits_per_coordinate": ex.stats.bits_per_coordinate,
        "payload_bits_per_coordinate": ex.payload.bits_per_coordinate,
        "entropy_bits_per_coordinate": ex.entropy_bits_per_coordinate,
        "bytes_handed": ex.stats.bytes_handed,
        "coordinates": ex.stats.coordinates,  # every coordinate exchanged (compressed or not)
        "compressed_coordinates": ex.payload.coordinates,  # those the codec encoded (the rest: float32)
        "failed_buckets": ex.totals.failed_buckets,
        "failed_coordinates": ex.totals.failed_coordinates,
        "recovery_rounds": ex.totals.recovery_rounds,
        "recovery_bytes": ex.totals.recovery_bytes,
    }


def _state_dict(self):
    sd = super(self.__class__, self).state_dict()
    codec = self._hvdquant.codec
    sd["hvdquant"] = {"steps": dict(self._hvdquant.steps), "seed": self._hvdquant.agreed_seed,
                      "residuals": codec.state_dict() if hasattr(codec, "state_dict") else {}}
    lgc = self._hvdquant.exchange.lgc
    if lgc is not None:
        sd["hvdquant"]["lgc"] = lgc.state_dict()
    return sd


def _load_state_dict(self, state_dict):
    state_dict = dict(state_dict)
    extra = state_dict.pop("hvdquant", None)
    if extra is not None:
        lgc = self._hvdquant.exchange.lgc
        if (lgc is None) != ("lgc" not in extra):  # refused before anything is restored
            raise ValueError("checkpoint and optimizer disagree on LGC: the checkpoint "
                             f"{'has no' if lgc is not None else 'has'} LGC state, the optimizer's codec "
                             f"{'is' if lgc is not None else 'is not'} hvdquant.LGC")
        self._hvdquant.steps = dict(extra["steps"])
        self._hvdquant.restored_seed = extra["seed"]
        self._hvdquant.agreed_seed = None  # agree again: every rank must have restored the same state
        if hasattr(self._hvdquant.codec, "load_state_dict"):
            self._hvdquant.codec.load_state_dict(extra["residuals"])
        if lgc is not None:
            lgc.load_state_dict(extra["lgc"])
    self._handles = {}
    self._synchronized = False
    self._should_synchronize = True
    for p in self._allreduce_delay:
        self._allreduce_delay[p] = self.backward_passes_per_step
    super(self.__class__, self).load_state_dict(state_dict)
