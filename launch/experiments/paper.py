"""One horovodrun job of the paper reproduction: every method in turn, one model, one seed.

    horovodrun -np 4 python launch/experiments/paper.py --model fc --seed 0 --iterations 1500

The authors' configuration (Alistarh et al., QSGD; docs/ALGORITHMS.md §7) on Fashion-MNIST: total batch 200 split
evenly across the P ranks, plain SGD with lr 0.01 decayed ×0.9 every 300 iterations, models FC
784-300-100-10 and the main job's LeNet-like CNN. Each method starts from the same initial weights
(``torch.manual_seed(seed)``) and sees the same minibatches, so methods differ only in how gradients
are exchanged. Test accuracy is measured every ``--eval-every`` iterations on the 10k test images
(each rank scores a slice, the integer counts are summed exactly).

Per method, rank 0 writes to the JSON: the accuracy curve, the final accuracy, the bits per
coordinate measured from the bytes handed to Horovod's collectives (every coordinate of every
gradient, uncompressed biases included), the empirical entropy of the compressed symbols (where the
codec has symbols), the nested decode-failure rate (failed buckets / nested buckets decoded), the
wall time, and whether replicas ended bit-identical (the run stops if they did not).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import hvdquant
from hvdquant.data import load_fashion_mnist
from hvdquant.examples.models import SmallCNN, fc
from hvdquant.kernels import ops

WHOLE = 1 << 30  # bucket size of the "without buckets" variants: one bucket per tensor
BUCKET = 512     # bucket size d of the bucketed variants
MIN_NUMEL = 1024  # payload path: smaller and 1-D tensors travel uncompressed (hvdquant's default)


MODELS: dict[str, Callable[[], nn.Module]] = {"fc": fc, "cnn": SmallCNN}


@dataclass(frozen=True)
class Method:
    """A row of the paper's comparison: a Horovod compression (stock allreduce) or an hvdquant codec
    (payload path, allgather)."""

    label: str
    stock: Callable[[], object] | None = None
    codec: Callable[[int], hvdquant.codecs.Codec] | None = None  # of the run's iteration count


METHODS: dict[str, Method] = {m.label: m for m in [
    Method("fp32", stock=lambda: hvdquant.Compression.metered(hvd.Compression.none)),
    Method("fp16", stock=lambda: hvdquant.Compression.metered(hvd.Compression.fp16)),
    Method("1bit-ef", codec=lambda iters: hvdquant.OneBitSGD()),
    Method("qsgd-s1", codec=lambda iters: hvdquant.QSGD(1, WHOLE, "l2", "elias")),
    Method("qsgd-s3-d512", codec=lambda iters: hvdquant.QSGD(3, BUCKET, "l2", "elias")),
    Method("qsgd-s3", codec=lambda iters: hvdquant.QSGD(3, WHOLE, "l2", "elias")),
    # the paper's DQSG: independent dither per rank (hvdquant's default is the stratified one)
    Method("dqsg-s3", stock=lambda: hvdquant.Compression.dqsg(levels=3, bucket_size=BUCKET, dither="independent")),
    Method("dqsg-s3-ag", codec=lambda iters: hvdquant.DQSG(3, BUCKET, "independent")),
    Method("ndqsg-3.31-d512", codec=lambda iters: hvdquant.NDQSG((3, 1), BUCKET, 0.5, adaptive=False)),
    Method("ndqsg-3.31", codec=lambda iters: hvdquant.NDQSG((3, 1), WHOLE, 0.5, adaptive=False)),
    Method("ndqsg-sum-3.31",
           stock=lambda: hvdquant.Compression.ndqsg(levels=(3, 1), bucket_size=BUCKET, adaptive=False)),
    # learned gradient compression: top-k with error feedback, and LGC starting from it (warm-up and autoencoder
    # training 1/15 of the run each: 100 exchanges in 1500 iterations; then the frozen encoder)
    Method("topk-ef-5%", codec=lambda iters: hvdquant.TopK.with_feedback(0.05)),
    Method("lgc-ps", codec=lambda iters: lgc(iters, "ps")),
    Method("lgc-ring", codec=lambda iters: lgc(iters, "ring")),
]}


def lgc(iterations: int, form: str) -> hvdquant.LGC:
    stage = max(1, iterations // 15)
    return hvdquant.LGC(ratio=0.05, innovation_ratio=0.3, warmup_steps=stage, train_steps=stage, form=form)


def nested_buckets_per_step(method: Method, codec, model: nn.Module, ranks: int) -> int:
    """Nested buckets decoded per step, the denominator of the decode-failure rate."""
    if method.label.startswith("ndqsg-sum"):  # every rank's coset sums, one decode per bucket
        d = codec.codec.bucket_size
        return sum(ops.num_buckets(p.numel(), d) for p in model.parameters())
    if isinstance(codec, hvdquant.NDQSG):
        nested = ranks - codec.dqsg_senders(ranks)
        return nested * sum(ops.num_buckets(p.numel(), codec.bucket_size) for p in model.parameters()
                            if p.numel() >= MIN_NUMEL and p.dim() >= 2)
    return 0


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of the (bit-identical) replicas: each rank scores its slice, counts summed."""
    rank, size = hvd.rank(), hvd.size()
    xs, ys = x[rank::size], y[rank::size]
    model.eval()
    correct = sum(int((model(xs[i:i + 2000]).argmax(1) == ys[i:i + 2000]).sum()) for i in range(0, len(xs), 2000))
    model.train()
    total = hvd.allreduce(torch.tensor([correct], dtype=torch.int64), op=hvd.Sum, name="paper.correct")
    return int(total) / len(x)


def run_method(method: Method, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict:
    train_x, train_y, test_x, test_y = data
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(args.seed)
    model = MODELS[args.model]()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr)
    if method.stock is not None:
        comp = method.stock()
        opt = hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters(), compression=comp)
        codec = comp
    else:
        codec = method.codec(args.iterations)
        opt = hvdquant.DistributedOptimizer(sgd, named_parameters=model.named_parameters(), codec=codec,
                                            reducer="allgather", seed=args.seed, min_numel=MIN_NUMEL)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=300, gamma=0.9)
    per_rank = args.batch // size
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # the same batches for every method
    order, pos = torch.randperm(len(train_x), generator=gen), 0
    curve = []
    start = time.perf_counter()
    bar = tqdm(range(1, args.iterations + 1), desc=f"{args.model} P={size} seed={args.seed} {method.label}",
               disable=rank != 0, leave=False, mininterval=2.0)
    for it in bar:
        if pos + per_rank > len(order):
            order, pos = torch.randperm(len(train_x), generator=gen), 0
        idx = order[pos:pos + per_rank]
        pos += per_rank
        opt.zero_grad()
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        loss.backward()
        opt.step()
        sched.step()
        if it % args.eval_every == 0 or it == args.iterations:
            curve.append([it, accuracy(model, test_x, test_y)])
    seconds = time.perf_counter() - start

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = bool(torch.equal(hvd.broadcast(flat, root_rank=0, name="paper.check"), flat))
    if not bool(hvd.allreduce(torch.tensor([int(same)]), op=hvd.Min, name="paper.check.min")):
        raise SystemExit(f"{method.label}: replicas diverged")
    stats = comm_stats(codec, opt, method)
    failed = stats.pop("failed_buckets")
    nested = nested_buckets_per_step(method, codec, model, size) * args.iterations
    mine = {**stats, "failed_buckets": failed, "nested_buckets": nested}
    gathered = hvd.allgather_object(mine, name="paper.stats")
    coords = sum(r["coordinates"] for r in gathered)
    entropy = [r["entropy_bits"] for r in gathered]
    result = {
        "method": method.label,
        "final_accuracy": curve[-1][1],
        "curve": curve,
        "bits_per_coordinate": 8.0 * sum(r["bytes_handed"] for r in gathered) / coords,
        "entropy_bits_per_coordinate": None if None in entropy else sum(entropy) / coords,
        # failures are decided identically on every rank for the summed variant, and per sender for
        # the payload path, where every rank decodes every payload: rank 0's count is the count
        "decode_failure_rate": failed / nested if nested else None,
        "seconds": seconds,
        "replicas_bit_identical": True,
    }
    if isinstance(codec, hvdquant.LGC):
        # FLOPs on an unhooked copy: a backward through `model` would start an exchange
        result.update(lgc_costs(codec, opt, MODELS[args.model](), train_x[:per_rank], train_y[:per_rank],
                                args.iterations))
    if rank == 0:
        print(f"{args.model} P={size} seed={args.seed} {method.label:16s} acc {result['final_accuracy']:.4f} "
              f"bits {result['bits_per_coordinate']:.3f} ({seconds:.0f} s)", flush=True)
    return result


def lgc_costs(codec: hvdquant.LGC, opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    """LGC's own costs beside the model's: bits per coordinate in each stage, codec seconds
    per step, autoencoder parameters, and the autoencoder's FLOPs per step (encoding and decoding the
    top-k values of every compressed tensor) over the model's forward and backward FLOPs per step,
    both counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from hvdquant.codecs.lgc import ChunkAutoencoder

    s = opt.hvdquant_stats()
    ae = ChunkAutoencoder(codec)
    k = sum(math.ceil(codec.ratio * p.numel()) for p in model.parameters()
            if p.numel() >= MIN_NUMEL and p.dim() >= 2)
    chunks = torch.zeros(math.ceil(k / codec.chunk), codec.chunk)
    with FlopCounterMode(display=False) as ae_flops, torch.no_grad():
        ae.decode(ae.encode(chunks))
    with FlopCounterMode(display=False) as model_flops:
        F.cross_entropy(model(x), y).backward()
    return {"lgc_stage_bits_per_coordinate": s["lgc_stage_bits_per_coordinate"],
            "codec_seconds_per_step": s["lgc_codec_seconds"] / steps,
            "ae_parameters": s["lgc_autoencoder_parameters"],
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "ae_flops_per_step": ae_flops.get_total_flops(),
            "model_flops_per_step": model_flops.get_total_flops()}


def comm_stats(codec, opt, method: Method) -> dict:
    """This rank's bytes handed, coordinates, entropy bits (None without symbols), failed buckets."""
    if method.stock is None:
        s = opt.hvdquant_stats()
        payload_coords = s["coordinates"]
        # entropy_bits_per_coordinate covers the compressed tensors; the rest travel as float32
        ent = s["entropy_bits_per_coordinate"]
        compressed = s["compressed_coordinates"]
        bits = None if ent is None or math.isnan(ent) else ent * compressed + 32.0 * (payload_coords - compressed)
        return {"bytes_handed": s["bytes_handed"], "coordinates": payload_coords, "entropy_bits": bits,
                "failed_buckets": s["failed_buckets"]}
    stats = codec.stats
    return {"bytes_handed": stats.bytes_handed, "coordinates": stats.coordinates,
            "entropy_bits": (codec.entropy_bits_per_coordinate * stats.coordinates
                             if hasattr(codec, "entropy_bits_per_coordinate") and stats.coordinates else None),
            "failed_buckets": codec.decode_stats.failed_buckets if hasattr(codec, "decode_stats") else 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=200, help="total batch, split across ranks")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--out", type=Path, default=Path("runs/experiments"))
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return args


def merged_results(path: Path, results: list[dict], args: argparse.Namespace) -> list[dict]:
    """This run's results, plus those of other methods already in ``path`` from a run of the same
    configuration (so a sweep can be split by method, and one method rerun after a fix): this run's
    in the order run, then the others in their recorded order. Each result carries the date it was
    measured."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    results = [{**r, "date": now} for r in results]
    if path.exists():
        old = json.loads(path.read_text())
        if (old["batch"], old["lr"]) == (args.batch, args.lr):
            ran = {r["method"] for r in results}
            results += [{"date": old["date"], **r} for r in old["results"] if r["method"] not in ran]
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hvd.init()
    torch.set_num_threads(1)
    size = hvd.size()
    if args.batch % size:
        raise SystemExit(f"total batch {args.batch} does not split evenly across {size} ranks")
    data = load_fashion_mnist()
    rank = hvd.rank()
    data = (data[0][rank::size], data[1][rank::size], data[2], data[3])
    results = []
    for m in args.methods:
        try:
            results.append(run_method(METHODS[m], args, data))
        except FloatingPointError as e:  # hvdquant raises on every rank alike: record and go on
            if hvd.rank() == 0:
                print(f"{args.model} P={size} seed={args.seed} {m}: diverged ({e})", flush=True)
            results.append({"method": m, "diverged": str(e)})
    if hvd.rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"paper-{args.model}-P{size}-seed{args.seed}-it{args.iterations}.json"
        results = merged_results(path, results, args)
        path.write_text(json.dumps({
            "model": args.model, "ranks": size, "seed": args.seed, "iterations": args.iterations,
            "batch": args.batch, "lr": args.lr, "lr_decay": "x0.9 every 300 iterations",
            "parameters": sum(p.numel() for p in MODELS[args.model]().parameters()),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "results": results}, indent=1))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
