"""The examples' framework calls: the codec and distributed optimizer a run's flags ask for, and the
job objects that start Horovod (``HorovodJob``, under horovodrun) or PyTorch DDP (``DDPJob``, under
torchrun or mpirun), wrap a model and optimizer, and check replicas. Task-independent: every main
job (:mod:`hvdquant.examples.tasks`) trains through them."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import hvdquant
from hvdquant.stats import CommStats


def make_codec(args: argparse.Namespace) -> hvdquant.codecs.Codec:
    """The codec of a payload-path run, from the flags (``--error-feedback`` wraps DQSG, NDQSG,
    QSGD and ECDQ in :class:`hvdquant.ErrorFeedback`; top-k and 1-bit SGD always carry their residuals)."""
    if args.compression == "topk":
        return hvdquant.TopK.with_feedback(args.ratio)
    if args.compression == "lgc":
        return hvdquant.LGC(ratio=args.ratio, warmup_steps=args.warmup_steps, train_steps=args.train_steps,
                            form=args.lgc_form)
    if args.compression == "onebit":
        return hvdquant.OneBitSGD()
    codec = {"dqsg": lambda: hvdquant.DQSG(args.levels, args.bucket_size, args.dither, args.rotation,
                                           args.coding or "fixed"),
             "ndqsg": lambda: hvdquant.NDQSG((args.levels, args.coarse_levels), args.bucket_size, args.dqsg_fraction),
             "qsgd": lambda: hvdquant.QSGD(args.levels, args.bucket_size, args.norm, args.coding or "elias"),
             "ecdq": lambda: hvdquant.ECDQ(args.step, args.bucket_size, args.dither, args.rotation,
                                           args.step_scope),
             }[args.compression]()
    return hvdquant.ErrorFeedback(codec) if args.error_feedback else codec


def make_optimizer(args: argparse.Namespace, model: nn.Module, opt: torch.optim.Optimizer, op):
    """(distributed optimizer, function returning its communication statistics)."""
    import horovod.torch as hvd

    if args.reducer == "stock":
        if args.compression == "dqsg" and args.coding not in (None, "fixed"):
            raise SystemExit(f"--coding {args.coding}: entropy-coded payloads cannot be summed by Horovod's allreduce: "
                             "use --reducer allgather or scatter_reduce")
        if args.compression in ("qsgd", "ecdq", "onebit", "topk", "lgc"):
            raise SystemExit(f"--compression {args.compression} payloads cannot be summed by Horovod's allreduce: "
                             "use --reducer allgather or scatter_reduce (hvdquant.DistributedOptimizer)")
        groups = args.group_bytes or None
        comp = {"none": lambda: hvdquant.Compression.metered(hvd.Compression.none),
                "fp16": lambda: hvdquant.Compression.metered(hvd.Compression.fp16),
                "dqsg": lambda: hvdquant.Compression.dqsg(levels=args.levels, bucket_size=args.bucket_size,
                                                          seed=args.seed, dither=args.dither,
                                                          rotation=args.rotation, group_threshold=groups),
                "ndqsg": lambda: hvdquant.Compression.ndqsg(levels=(args.levels, args.coarse_levels),
                                                            bucket_size=args.bucket_size, seed=args.seed,
                                                            group_threshold=groups),
                }[args.compression]()
        dist = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp, op=op)
        return dist, lambda: {"bits_per_coordinate": comp.stats.bits_per_coordinate,
                              "bytes_handed": comp.stats.bytes_handed, "coordinates": comp.stats.coordinates}
    if args.compression in ("none", "fp16"):
        raise SystemExit(f"--compression {args.compression} is Horovod's own: use --reducer stock")
    dist = hvdquant.DistributedOptimizer(opt, named_parameters=model.named_parameters(), codec=make_codec(args),
                                         reducer=args.reducer, op=op, seed=args.seed, min_numel=args.min_numel)
    return dist, dist.hvdquant_stats


def counted(stats: CommStats, bytes_per_coordinate: int, hook: Callable) -> Callable:
    """A DDP hook that records each bucket's coordinates and the bytes it hands to the allreduce
    (unannotated: DDP checks hook annotations, and this module's are strings)."""
    def run(state, bucket):
        stats.record(bucket.buffer().numel(), bytes_per_coordinate * bucket.buffer().numel())
        return hook(state, bucket)

    return run


def counting_all_reduce(stats: CommStats, hook: Callable) -> Callable:
    """``hook`` with the bytes of every ``torch.distributed.all_reduce`` it starts recorded (PowerSGD
    calls it for its P and Q factors and uncompressed tensors, in the hook and in its callbacks)."""
    real = torch.distributed.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        stats.record(0, tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    # process-wide (PowerSGD's callbacks run outside the hook); the job's other all_reduce calls come
    # after its statistics are gathered
    torch.distributed.all_reduce = all_reduce

    def run(state, bucket):
        stats.record(bucket.buffer().numel(), 0)
        return hook(state, bucket)

    return run


class HorovodJob:
    """The main job's framework calls under horovodrun."""

    def __init__(self, args: argparse.Namespace) -> None:
        import horovod.torch as hvd

        if args.reducer == "allreduce" or args.compression == "powersgd":
            raise SystemExit("--reducer allreduce and --compression powersgd are DDP's: add --framework ddp")
        self.hvd = hvd
        hvd.init()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.device = pick_device(args.device, hvd.local_rank())
        # the setup's Horovod is CPU-only: a GPU model's hvdquant payloads are staged through host
        # memory, but Horovod's own fp32/fp16 allreduce of CUDA gradients needs its GPU build
        self.staged = self.device.type == "cuda" and not hvd.nccl_built()
        if self.staged and args.compression in ("none", "fp16"):
            raise SystemExit(f"--compression {args.compression} on a GPU needs Horovod built with GPU operations "
                             "(HVDQ_GPU=1 bash launch/setup.sh); this Horovod is CPU-only, so only hvdquant "
                             "compression (payloads staged through host memory) runs CUDA gradients")

    def wrap(self, args: argparse.Namespace, model: nn.Module, opt: torch.optim.Optimizer):
        """(model to train, distributed optimizer, function returning communication statistics)."""
        hvd = self.hvd
        if self.staged:  # rank 0's initial parameters, through host memory
            state = {k: v.cpu() for k, v in model.state_dict().items()}
            hvd.broadcast_parameters(state, root_rank=0)
            model.load_state_dict(state)
        else:
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return (model, *make_optimizer(args, model, opt, hvd.Sum if args.op == "sum" else hvd.Average))

    def identical(self, flat: torch.Tensor) -> bool:
        """Whether every rank's ``flat`` equals rank 0's (on every rank)."""
        hvd = self.hvd
        flat = flat.cpu()
        same = bool(torch.equal(hvd.broadcast(flat, root_rank=0, name="hvdquant.check"), flat))
        return bool(hvd.allreduce(torch.tensor([int(same)]), op=hvd.Min, name="hvdquant.check.min"))

    def allgather_object(self, obj: Any) -> list[Any]:
        return self.hvd.allgather_object(obj, name="hvdquant.stats")


class DDPJob:
    """The main job's framework calls under torchrun or mpirun: PyTorch DDP, Gloo on the CPU (NCCL
    where CUDA is available)."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.reducer == "stock" or args.op == "sum":
            raise SystemExit("--reducer stock and --op sum are Horovod's: DDP averages (drop --framework ddp)")
        self.rank, self.size = hvdquant.ddp.init_from_env()
        self.device = pick_device(args.device, torch.cuda.current_device() if torch.cuda.is_available() else 0)
        if torch.distributed.get_backend() == "nccl" and self.device.type != "cuda":
            raise SystemExit("--device cpu under NCCL: NCCL needs CUDA tensors (run with Gloo: no GPU per rank)")
        self.comm_device = torch.device("cpu") if torch.distributed.get_backend() == "gloo" else self.device

    def hook(self, args: argparse.Namespace) -> tuple[Any, Callable, Callable[[], dict]]:
        """(hook state, hook, function returning communication statistics) for --compression."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        if args.compression in ("none", "fp16", "powersgd"):
            stats = CommStats()
            report = lambda: {"bits_per_coordinate": stats.bits_per_coordinate,  # noqa: E731
                              "bytes_handed": stats.bytes_handed, "coordinates": stats.coordinates}
            if args.compression == "powersgd":
                state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank,
                                                    start_powerSGD_iter=max(2, args.ddp_warmup_steps),
                                                    random_seed=args.seed)
                return state, counting_all_reduce(stats, powerSGD_hook.powerSGD_hook), report
            hooks = {"none": (4, default_hooks.allreduce_hook), "fp16": (2, default_hooks.fp16_compress_hook)}
            width, base = hooks[args.compression]
            return None, counted(stats, width, base), report
        state = hvdquant.ddp.State(make_codec(args), args.reducer, seed=args.seed, warmup_steps=args.ddp_warmup_steps,
                                   min_numel=args.min_numel)
        return state, hvdquant.ddp.hook, state.statistics

    def wrap(self, args: argparse.Namespace, model: nn.Module, opt: torch.optim.Optimizer):
        """(model to train, optimizer, function returning communication statistics). DDP broadcasts
        rank 0's parameters when it wraps the model."""
        from torch.nn.parallel import DistributedDataParallel

        options = {}
        if args.compression == "powersgd" and torch.distributed.get_backend() == "gloo":
            # torch's PowerSGD hook on Gloo with several buckets: its callbacks start collectives in
            # different bucket orders on different ranks (seen at P = 4: "Received data size doesn't
            # match expected size"); one bucket for all (an explicit cap also sets the first bucket's)
            options["bucket_cap_mb"] = math.ceil(4 * sum(p.numel() for p in model.parameters()) / 2**20) + 1
        ddp = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                      **options)
        state, hook, report = self.hook(args)
        ddp.register_comm_hook(state, hook)
        return ddp, opt, report

    def identical(self, flat: torch.Tensor) -> bool:
        """Whether every rank's ``flat`` equals rank 0's (on every rank)."""
        flat = flat.to(self.comm_device)
        ref = flat.clone()
        torch.distributed.broadcast(ref, src=0)
        same = torch.tensor([int(torch.equal(ref, flat))], device=flat.device)
        torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
        return bool(same.item())

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out


def pick_device(choice: str, local: int) -> torch.device:
    """``--device``: "cuda" (GPU ``local mod device count``), "cpu", or "auto" (CUDA where available)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    device = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device
