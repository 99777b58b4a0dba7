"""The main jobs: data-parallel training under horovodrun or DDP, with gradient compression.

    horovodrun -np 2 python -m hvdquant.examples.train --compression dqsg --levels 1
    horovodrun -np 2 python -m hvdquant.examples.train --compression ndqsg --reducer allgather
    torchrun --nproc_per_node 2 -m hvdquant.examples.train --framework ddp --compression dqsg
    horovodrun -np 2 python -m hvdquant.examples.train --job lm --compression dqsg --levels 3

Jobs (``--job``, :mod:`hvdquant.examples.tasks`): ``cnn`` (the quick default: a small CNN on
Fashion-MNIST, test accuracy per epoch) and ``lm`` (a byte-level GPT on the Python standard
library's source files, validation loss and bits per byte every ``--eval-every`` steps).

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

Rank 0 shows a tqdm bar, prints each evaluation, the bits per gradient coordinate actually handed
to the collectives and the bytes handed, and writes a JSON summary (``runs/train-<run name>.json``).
Replicas are checked bit-identical at the end. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hvdquant.examples.frameworks import DDPJob, HorovodJob
from hvdquant.examples.tasks import TASKS, Task
from hvdquant.kernels import ops
from hvdquant.transports.groups import GROUP_THRESHOLD


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=sorted(TASKS), default="cnn",
                   help="cnn: small CNN on Fashion-MNIST (quick); lm: byte-level GPT on the standard library's source")
    p.add_argument("--framework", choices=["horovod", "ddp"], default="horovod",
                   help="horovod (under horovodrun) or ddp (PyTorch DDP under torchrun or mpirun)")
    p.add_argument("--compression",
                   choices=["none", "fp16", "powersgd", "dqsg", "ndqsg", "qsgd", "ecdq", "onebit", "topk", "lgc"],
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
    p.add_argument("--rotation", choices=["none", "hadamard"], default=None,
                   help="DQSG, ECDQ: rotate each bucket by the shared randomized Hadamard transform before "
                        "quantizing (heavy-tailed gradients: much less error at the same bits); default none for "
                        "DQSG, hadamard for ECDQ")
    p.add_argument("--step", type=float, default=1.0,
                   help="ECDQ: quantization step in units of each bucket's (or, with --step-scope tensor, the "
                        "tensor's) RMS; larger: fewer bits, more error (normalised error step^2/12; on Gaussian "
                        "data about 2.6 -> 1 bit, 1.1 -> 2 bits, 0.5 -> 3 bits per coordinate, fewer on real "
                        "gradients)")
    p.add_argument("--step-scope", choices=["bucket", "tensor"], default="bucket",
                   help="ECDQ: one step per bucket (the same relative error everywhere) or one per tensor (the same "
                        "absolute error everywhere: least error per bit, quiet buckets cost almost nothing, but "
                        "Adam turns the noise on quiet coordinates into steps)")
    p.add_argument("--group-bytes", type=int, default=GROUP_THRESHOLD,
                   help="Horovod stock dqsg/ndqsg: gradient bytes per group whose fields are sent while backward "
                        "runs (0: every tensor after backward, in one round)")
    p.add_argument("--coarse-levels", type=int, default=1, help="NDQSG s2 (nesting ratio = s1/s2)")
    p.add_argument("--dqsg-fraction", type=float, default=0.5, help="NDQSG: fraction of ranks sending DQSG(s1)")
    p.add_argument("--error-feedback", action="store_true",
                   help="dqsg, ndqsg, qsgd: keep each rank's compression error and add it to the next gradient "
                        "(payload paths: --reducer allgather|scatter_reduce)")
    p.add_argument("--norm", choices=["l2", "max"], default="l2", help="QSGD bucket norm")
    p.add_argument("--coding", choices=["elias", "fixed", "rans"], default=None,
                   help="QSGD: elias (default) or fixed; DQSG payload paths: fixed (default) or rans (entropy coded)")
    p.add_argument("--bucket-size", type=int, default=512, help="bucket size d")
    p.add_argument("--min-numel", type=int, default=1024,
                   help="payload path: tensors smaller than this (and 1-D ones) go uncompressed")
    p.add_argument("--op", choices=["average", "sum"], default="average", help="Horovod reduction op")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model, its gradients and hvdquant's kernels run (auto: CUDA where available; "
                        "ranks share GPUs round-robin)")
    p.add_argument("--epochs", type=int, default=2, help="cnn: epochs")
    p.add_argument("--max-steps", type=int, default=0, help="cnn: stop each epoch after this many steps (0: all)")
    p.add_argument("--steps", type=int, default=3000, help="lm: training steps")
    p.add_argument("--eval-every", type=int, default=250, help="lm: steps between validation evaluations")
    p.add_argument("--eval-windows", type=int, default=128, help="lm: validation windows of --context bytes")
    p.add_argument("--layers", type=int, default=4, help="lm: transformer blocks")
    p.add_argument("--width", type=int, default=128, help="lm: model width")
    p.add_argument("--heads", type=int, default=4, help="lm: attention heads")
    p.add_argument("--context", type=int, default=128, help="lm: context length in bytes")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch size (cnn 64, lm 16)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (cnn 0.02, SGD; lm 0.002, AdamW peak)")
    p.add_argument("--momentum", type=float, default=0.9, help="cnn: SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="lm: AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and dither seed")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for the JSON summary")
    p.add_argument("--run-name", default=None,
                   help="the summary's file name stem (default from job, framework, compression and reducer)")
    args = p.parse_args(argv)
    if args.reducer is None and args.framework == "ddp":
        args.reducer = "allreduce" if args.compression in ("none", "fp16", "powersgd", "dqsg", "ndqsg") else "allgather"
    if args.reducer is None:
        args.reducer = "stock" if args.compression in ("none", "fp16", "dqsg") else "allgather"
    if args.error_feedback and (args.compression not in ("dqsg", "ndqsg", "qsgd", "ecdq")
                                or args.reducer not in ("allgather", "scatter_reduce")):
        p.error("--error-feedback takes --compression dqsg|ndqsg|qsgd|ecdq with --reducer allgather|scatter_reduce "
                "(residuals are per rank: a summed payload cannot carry them; topk and onebit have their own)")
    if args.batch_size is None:
        args.batch_size = {"cnn": 64, "lm": 16}[args.job]
    if args.lr is None:
        args.lr = {"cnn": 0.02, "lm": 0.002}[args.job]
    if args.rotation is None:
        args.rotation = "hadamard" if args.compression == "ecdq" else "none"
    if args.levels is None:
        args.levels = 3 if args.compression == "ndqsg" else 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    job = DDPJob(args) if args.framework == "ddp" else HorovodJob(args)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rank, size = job.rank, job.size
    task = TASKS[args.job](args, rank, size)
    model = task.model().to(job.device)
    opt = task.optimizer(model, args, size)
    base_lrs = [group["lr"] for group in opt.param_groups]
    trained, opt, comm_stats = job.wrap(args, model, opt)

    history, step_seconds = [], []
    start = time.perf_counter()
    for round_index in range(1, task.rounds + 1):
        bar = tqdm(task.batches(round_index), total=task.steps_per_round, disable=rank != 0, leave=False,
                   desc=f"{args.job} {task.round_name} {progress(task, round_index)}")
        for x, y in bar:
            tick = time.perf_counter()
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr * task.lr_factor(len(step_seconds))
            opt.zero_grad()
            loss = task.loss(trained(x.to(job.device)), y.to(job.device))
            loss.backward()
            opt.step()
            if job.device.type == "cuda":
                torch.cuda.synchronize(job.device)  # a step's time includes its kernels
            step_seconds.append(time.perf_counter() - tick)
            if len(step_seconds) % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = task.evaluate(model)
        stats = comm_stats()
        history.append({task.round_name: round_index * (1 if task.round_name == "epoch" else task.steps_per_round),
                        **metrics, "seconds": time.perf_counter() - start, **stats})
        if rank == 0:
            print(f"{task.round_name} {history[-1][task.round_name]}: {task.describe(metrics)}  bits/coordinate "
                  f"handed to the collectives {stats['bits_per_coordinate']:.3f}  bytes handed "
                  f"{stats['bytes_handed']:,}  ({time.perf_counter() - start:.1f} s)", flush=True)

    per_rank = job.allgather_object(comm_stats())
    # Replicas must end bit-identical: compare every rank's parameters with rank 0's.
    all_identical = job.identical(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    mean_bits = sum(8.0 * r["bytes_handed"] for r in per_rank) / max(1, sum(r["coordinates"] for r in per_rank))
    summary = {
        "job": args.job,
        "framework": args.framework,
        "compression": args.compression,
        "reducer": args.reducer,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ranks": size,
        **metrics,
        "bits_per_coordinate": mean_bits,
        "bytes_handed_per_rank": [r["bytes_handed"] for r in per_rank],
        "communication_per_rank": per_rank,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": task.data(),
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
        print(f"final {task.describe(metrics)}; bits/coordinate (mean over ranks) {mean_bits:.3f}; "
              f"replicas bit-identical: {all_identical}; summary written to {path}", flush=True)
    if not all_identical:
        raise SystemExit("replicas diverged: parameters differ between ranks")
    return summary


def progress(task: Task, round_index: int) -> str:
    """The tqdm bar's position: "2/3" epochs, or "200-300/1200" steps."""
    if task.round_name == "epoch":
        return f"{round_index}/{task.rounds}"
    end = round_index * task.steps_per_round
    return f"{end - task.steps_per_round}-{end}/{task.rounds * task.steps_per_round}"


def run_name(args: argparse.Namespace) -> str:
    """The summary's file name stem: ``--run-name``, else ``dqsg``, ``ndqsg-allgather``, ``ddp-dqsg``,
    ``lm-ddp-qsgd-scatter_reduce``…"""
    if args.run_name:
        return args.run_name
    default = "allreduce" if args.framework == "ddp" else "stock"
    suffix = "" if args.reducer == default else f"-{args.reducer}"
    job = "" if args.job == "cnn" else f"{args.job}-"
    return f"{job}{'ddp-' if args.framework == 'ddp' else ''}{args.compression}{suffix}"


if __name__ == "__main__":
    main()
