"""The main job: data-parallel training of a small CNN on Fashion-MNIST under horovodrun.

    horovodrun -np 2 python -m hvdquant.examples.train_fashion_mnist --compression dqsg --levels 1
    horovodrun -np 2 python -m hvdquant.examples.train_fashion_mnist --compression ndqsg --reducer allgather

Schemes: none, fp16 (Horovod's own); dqsg and ndqsg (stock path through hvd.DistributedOptimizer's
allreduce with --reducer stock — ndqsg then is the allreduce-friendly nested variant — or
--reducer allgather|scatter_reduce through hvdquant.DistributedOptimizer); qsgd, onebit, topk
(with error feedback) (hvdquant.DistributedOptimizer only: their payloads cannot be summed).

Each rank trains on its own shard of the 60k training images (stride = world size) and every
rank evaluates on the 10k test images. Rank 0 shows a tqdm bar, prints per-epoch test accuracy,
the bits per gradient coordinate actually handed to the allreduce and the bytes handed, and
writes a JSON summary. Data comes from Debian's dataset-fashion-mnist; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import hvdquant
from hvdquant.data import load_fashion_mnist
from hvdquant.examples.models import SmallCNN


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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compression", choices=["none", "fp16", "dqsg", "ndqsg", "qsgd", "onebit", "topk", "lgc"],
                   default="dqsg")
    p.add_argument("--lgc-form", choices=["ps", "ring"], default="ps", help="LGC: parameter-server or ring form")
    p.add_argument("--warmup-steps", type=int, default=100, help="LGC: top-k warm-up exchanges")
    p.add_argument("--train-steps", type=int, default=100, help="LGC: autoencoder training exchanges")
    p.add_argument("--ratio", type=float, default=0.01, help="top-k / LGC: fraction of coordinates selected")
    p.add_argument("--reducer", choices=["stock", "allgather", "scatter_reduce"], default=None,
                   help="stock: Horovod's allreduce (none, fp16, dqsg); else hvdquant.DistributedOptimizer "
                        "(default: stock for none/fp16/dqsg, allgather otherwise)")
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
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="model init, data order and dither seed")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for the JSON summary")
    args = p.parse_args(argv)
    if args.reducer is None:
        args.reducer = "stock" if args.compression in ("none", "fp16", "dqsg") else "allgather"
    if args.levels is None:
        args.levels = 3 if args.compression == "ndqsg" else 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rank, size = hvd.rank(), hvd.size()

    train_x, train_y, test_x, test_y = load_fashion_mnist()
    train_x, train_y = train_x[rank::size], train_y[rank::size]

    model = SmallCNN()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    # With op=Sum Horovod returns the sum of gradients, so the step size is divided by the world size
    # to train the same model; the compression must then return the sum (hvdquant does).
    lr = args.lr / size if args.op == "sum" else args.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    opt, comm_stats = make_optimizer(args, model, opt, hvd.Sum if args.op == "sum" else hvd.Average)

    steps_per_epoch = len(train_x) // args.batch_size
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    history = []
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", disable=rank != 0, leave=False)
        for step in bar:
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = evaluate(model, test_x, test_y)
        stats = comm_stats()
        history.append({"epoch": epoch, "test_accuracy": acc, "seconds": time.perf_counter() - start, **stats})
        if rank == 0:
            print(f"epoch {epoch}: test accuracy {acc:.4f}  bits/coordinate handed to the collectives "
                  f"{stats['bits_per_coordinate']:.3f}  bytes handed {stats['bytes_handed']:,}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)

    # Replicas must end bit-identical: compare every rank's parameters with rank 0's.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    identical = bool(torch.equal(hvd.broadcast(flat, root_rank=0, name="hvdquant.check"), flat))
    all_identical = bool(hvd.allreduce(torch.tensor([int(identical)]), op=hvd.Min, name="hvdquant.check.min"))
    per_rank = hvd.allgather_object(comm_stats(), name="hvdquant.stats")
    mean_bits = sum(8.0 * r["bytes_handed"] for r in per_rank) / max(1, sum(r["coordinates"] for r in per_rank))
    summary = {
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
        "history": history,
    }
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = "" if args.reducer == "stock" else f"-{args.reducer}"
        path = args.out / f"train-{args.compression}{suffix}.json"
        path.write_text(json.dumps(summary, indent=2))
        print(f"final test accuracy {summary['test_accuracy']:.4f}; bits/coordinate (mean over ranks) "
              f"{mean_bits:.3f}; replicas bit-identical: {all_identical}; summary written to {path}", flush=True)
    if not all_identical:
        raise SystemExit("replicas diverged: parameters differ between ranks")
    return summary


if __name__ == "__main__":
    main()
