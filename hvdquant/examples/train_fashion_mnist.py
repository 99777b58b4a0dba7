"""The main job: data-parallel training of a small CNN on Fashion-MNIST under horovodrun or DDP.

    horovodrun -np 2 python -m hvdquant.examples.train_fashion_mnist --compression dqsg --levels 1
    horovodrun -np 2 python -m hvdquant.examples.train_fashion_mnist --compression ndqsg --reducer allgather
    torchrun --nproc_per_node 2 -m hvdquant.examples.train_fashion_mnist --framework ddp --compression dqsg

Schemes under Horovod (``--framework horovod``, the default): none, fp16 (Horovod's own); dqsg and
ndqsg (stock path through hvd.DistributedOptimizer's allreduce with --reducer stock — ndqsg then is
the allreduce-friendly nested variant — or --reducer allgather|scatter_reduce through
hvdquant.DistributedOptimizer); qsgd, onebit, topk (with error feedback) (hvdquant.DistributedOptimizer
only: their payloads cannot be summed).

Under PyTorch DDP (``--framework ddp``; torchrun or mpirun, no Horovod): none (DDP's fp32 allreduce),
fp16 and powersgd (torch's fp16_compress_hook and PowerSGD hook, rank --powersgd-rank), and the
hvdquant hook (:mod:`hvdquant.ddp`) for every codec: dqsg and ndqsg with --reducer allreduce (summable
fields; the default for them) or allgather|scatter_reduce, the others on allgather|scatter_reduce.

GPUs (``--device cuda``, or ``auto`` where CUDA is available): ranks share the GPUs round-robin and
hvdquant's CUDA kernels encode and decode on the gradient's device. Under DDP the backend is NCCL
where every local rank has a GPU of its own, else Gloo (payloads staged through host memory). Under
the setup's CPU-only Horovod, hvdquant's payloads are staged through host memory (Horovod's own
none/fp16 then refuse: they need Horovod's GPU build). The summary records the device, the median
step time and the kernel launches per target (``"cuda"`` counts prove the GPU did the arithmetic).

Each rank trains on its own shard of the 60k training images (stride = world size) and every
rank evaluates on the 10k test images. Rank 0 shows a tqdm bar, prints per-epoch test accuracy,
the bits per gradient coordinate actually handed to the collectives and the bytes handed, and
writes a JSON summary. Data comes from Debian's dataset-fashion-mnist; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import hvdquant
from hvdquant.data import load_fashion_mnist
from hvdquant.examples.models import SmallCNN
from hvdquant.kernels import ops
from hvdquant.stats import CommStats


def make_codec(args: argparse.Namespace) -> hvdquant.codecs.Codec:
    """The codec of a payload-path run, from the flags."""
    if args.compression == "dqsg":
        return hvdquant.DQSG(args.levels, args.bucket_size, args.dither)
    if args.compression == "ndqsg":
        return hvdquant.NDQSG((args.levels, args.coarse_levels), args.bucket_size, args.dqsg_fraction)
    if args.compression == "qsgd":
        return hvdquant.QSGD(args.levels, args.bucket_size, args.norm, args.coding)
    if args.compression == "topk":
        return hvdquant.TopK.with_feedback(args.ratio)
    if args.compression == "lgc":
        return hvdquant.LGC(ratio=args.ratio, warmup_steps=args.warmup_steps, train_steps=args.train_steps,
                            form=args.lgc_form)
    return hvdquant.OneBitSGD()


def make_optimizer(args: argparse.Namespace, model: nn.Module, opt: torch.optim.Optimizer, op):
    """(distributed optimizer, function returning its communication statistics)."""
    import horovod.torch as hvd

    if args.reducer == "stock":
        if args.compression in ("qsgd", "onebit", "topk", "lgc"):
            raise SystemExit(f"--compression {args.compression} payloads cannot be summed by Horovod's allreduce: "
                             "use --reducer allgather or scatter_reduce (hvdquant.DistributedOptimizer)")
        comp = {"none": lambda: hvdquant.Compression.metered(hvd.Compression.none),
                "fp16": lambda: hvdquant.Compression.metered(hvd.Compression.fp16),
                "dqsg": lambda: hvdquant.Compression.dqsg(levels=args.levels, bucket_size=args.bucket_size,
                                                          seed=args.seed, dither=args.dither),
                "ndqsg": lambda: hvdquant.Compression.ndqsg(levels=(args.levels, args.coarse_levels),
                                                            bucket_size=args.bucket_size, seed=args.seed),
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

        ddp = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = sum(int((model(x[i:i + batch].to(device)).argmax(1).cpu() == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=["horovod", "ddp"], default="horovod",
                   help="horovod (under horovodrun) or ddp (PyTorch DDP under torchrun or mpirun)")
    p.add_argument("--compression",
                   choices=["none", "fp16", "powersgd", "dqsg", "ndqsg", "qsgd", "onebit", "topk", "lgc"],
                   default="dqsg", help="powersgd: DDP only (torch's PowerSGD hook)")
    p.add_argument("--powersgd-rank", type=int, default=4, help="PowerSGD: matrix approximation rank")
    p.add_argument("--ddp-warmup-steps", type=int, default=0,
                   help="DDP: full-precision iterations before compressing (hvdquant hook; PowerSGD's start "
                        "iteration, at least 2)")
    p.add_argument("--lgc-form", choices=["ps", "ring"], default="ps", help="LGC: parameter-server or ring form")
    p.add_argument("--warmup-steps", type=int, default=100, help="LGC: top-k warm-up exchanges")
    p.add_argument("--train-steps", type=int, default=100, help="LGC: autoencoder training exchanges")
    p.add_argument("--ratio", type=float, default=0.01, help="top-k / LGC: fraction of coordinates selected")
    p.add_argument("--reducer", choices=["stock", "allreduce", "allgather", "scatter_reduce"], default=None,
                   help="Horovod: stock (Horovod's allreduce: none, fp16, dqsg, ndqsg) or allgather|scatter_reduce "
                        "(hvdquant.DistributedOptimizer; default: stock for none/fp16/dqsg, allgather otherwise). "
                        "DDP: allreduce (summable dqsg/ndqsg fields; the default for them and for "
                        "none/fp16/powersgd) or allgather|scatter_reduce (hvdquant.ddp hook, the default allgather "
                        "for the other codecs)")
    p.add_argument("--levels", type=int, default=None,
                   help="levels s (DQSG, QSGD) or s1 (NDQSG); default 1, and 3 for NDQSG")
    p.add_argument("--dither", choices=["independent", "stratified"], default="stratified",
                   help="DQSG's dither: stratified (default: one stream decodes a sum) or the paper's independent one")
    p.add_argument("--coarse-levels", type=int, default=1, help="NDQSG s2 (nesting ratio = s1/s2)")
    p.add_argument("--dqsg-fraction", type=float, default=0.5, help="NDQSG: fraction of ranks sending DQSG(s1)")
    p.add_argument("--norm", choices=["l2", "max"], default="l2", help="QSGD bucket norm")
    p.add_argument("--coding", choices=["elias", "fixed"], default="elias", help="QSGD coding")
    p.add_argument("--bucket-size", type=int, default=512, help="bucket size d")
    p.add_argument("--min-numel", type=int, default=1024,
                   help="payload path: tensors smaller than this (and 1-D ones) go uncompressed")
    p.add_argument("--op", choices=["average", "sum"], default="average", help="Horovod reduction op")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model, its gradients and hvdquant's kernels run (auto: CUDA where available; "
                        "ranks share GPUs round-robin)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="model init, data order and dither seed")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for the JSON summary")
    args = p.parse_args(argv)
    if args.reducer is None and args.framework == "ddp":
        args.reducer = "allreduce" if args.compression in ("none", "fp16", "powersgd", "dqsg", "ndqsg") else "allgather"
    if args.reducer is None:
        args.reducer = "stock" if args.compression in ("none", "fp16", "dqsg") else "allgather"
    if args.levels is None:
        args.levels = 3 if args.compression == "ndqsg" else 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    job = DDPJob(args) if args.framework == "ddp" else HorovodJob(args)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rank, size = job.rank, job.size

    train_x, train_y, test_x, test_y = load_fashion_mnist()
    train_x, train_y = train_x[rank::size], train_y[rank::size]

    model = SmallCNN().to(job.device)
    # With op=Sum Horovod returns the sum of gradients, so the step size is divided by the world size
    # to train the same model; the compression must then return the sum (hvdquant does).
    lr = args.lr / size if args.op == "sum" else args.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    trained, opt, comm_stats = job.wrap(args, model, opt)

    steps_per_epoch = len(train_x) // args.batch_size
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    history, step_seconds = [], []
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", disable=rank != 0, leave=False)
        for step in bar:
            tick = time.perf_counter()
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(trained(train_x[idx].to(job.device)), train_y[idx].to(job.device))
            loss.backward()
            opt.step()
            if job.device.type == "cuda":
                torch.cuda.synchronize(job.device)  # a step's time includes its kernels
            step_seconds.append(time.perf_counter() - tick)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = evaluate(model, test_x, test_y)
        stats = comm_stats()
        history.append({"epoch": epoch, "test_accuracy": acc, "seconds": time.perf_counter() - start, **stats})
        if rank == 0:
            print(f"epoch {epoch}: test accuracy {acc:.4f}  bits/coordinate handed to the collectives "
                  f"{stats['bits_per_coordinate']:.3f}  bytes handed {stats['bytes_handed']:,}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)

    per_rank = job.allgather_object(comm_stats())
    # Replicas must end bit-identical: compare every rank's parameters with rank 0's.
    all_identical = job.identical(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    mean_bits = sum(8.0 * r["bytes_handed"] for r in per_rank) / max(1, sum(r["coordinates"] for r in per_rank))
    summary = {
        "framework": args.framework,
        "compression": args.compression,
        "reducer": args.reducer,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ranks": size,
        "test_accuracy": history[-1]["test_accuracy"],
        "bits_per_coordinate": mean_bits,
        "bytes_handed_per_rank": [r["bytes_handed"] for r in per_rank],
        "communication_per_rank": per_rank,
        "parameters": sum(p.numel() for p in model.parameters()),
        "replicas_bit_identical": all_identical,
        "seconds": time.perf_counter() - start,
        "device": str(job.device),
        "steps": len(step_seconds),
        # median of the training steps (forward, backward, exchange, update), the first 10 left out
        # (JIT compilation, Horovod negotiation); None when the run had no more steps than that
        "step_seconds_median": statistics.median(step_seconds[10:]) if len(step_seconds) > 10 else None,
        "kernel_launches": dict(ops.launches),
        "history": history,
    }
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"train-{run_name(args)}.json"
        path.write_text(json.dumps(summary, indent=2))
        print(f"final test accuracy {summary['test_accuracy']:.4f}; bits/coordinate (mean over ranks) "
              f"{mean_bits:.3f}; replicas bit-identical: {all_identical}; summary written to {path}", flush=True)
    if not all_identical:
        raise SystemExit("replicas diverged: parameters differ between ranks")
    return summary


def run_name(args: argparse.Namespace) -> str:
    """The summary's file name stem: ``dqsg``, ``ndqsg-allgather``, ``ddp-dqsg``, ``ddp-qsgd-scatter_reduce``…"""
    default = "allreduce" if args.framework == "ddp" else "stock"
    suffix = "" if args.reducer == default else f"-{args.reducer}"
    return f"{'ddp-' if args.framework == 'ddp' else ''}{args.compression}{suffix}"


if __name__ == "__main__":
    main()
