"""The main job: data-parallel training of a small CNN on Fashion-MNIST under horovodrun.

    horovodrun -np 2 python -m hvdquant.examples.train_fashion_mnist --compression dqsg --levels 1

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


class SmallCNN(nn.Module):
    """conv(1→16, 5) · pool · conv(16→32, 5) · pool · fc(512→10): 18k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def make_compression(args: argparse.Namespace):
    """Horovod's own compressors wrapped to be measured, or an hvdquant one (measured itself)."""
    if args.compression == "none":
        return hvdquant.Compression.metered(hvd.Compression.none)
    if args.compression == "fp16":
        return hvdquant.Compression.metered(hvd.Compression.fp16)
    return hvdquant.Compression.dqsg(levels=args.levels, bucket_size=args.bucket_size, seed=args.seed)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compression", choices=["none", "fp16", "dqsg"], default="dqsg")
    p.add_argument("--levels", type=int, default=1, help="DQSG levels s (2s+1 symbols)")
    p.add_argument("--bucket-size", type=int, default=512, help="DQSG bucket size d")
    p.add_argument("--op", choices=["average", "sum"], default="average", help="Horovod reduction op")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="model init, data order and dither seed")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for the JSON summary")
    return p.parse_args(argv)


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
    compression = make_compression(args)
    # With op=Sum Horovod returns the sum of gradients, so the step size is divided by the world size
    # to train the same model; the compression must then return the sum (hvdquant does).
    lr = args.lr / size if args.op == "sum" else args.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=compression,
                                   op=hvd.Sum if args.op == "sum" else hvd.Average)

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
        stats = compression.stats
        history.append({"epoch": epoch, "test_accuracy": acc, "seconds": time.perf_counter() - start,
                        "bits_per_coordinate": stats.bits_per_coordinate, "bytes_handed": stats.bytes_handed})
        if rank == 0:
            print(f"epoch {epoch}: test accuracy {acc:.4f}  bits/coordinate handed to allreduce "
                  f"{stats.bits_per_coordinate:.3f}  bytes handed {stats.bytes_handed:,}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)

    # Replicas must end bit-identical: compare every rank's parameters with rank 0's.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    identical = bool(torch.equal(hvd.broadcast(flat, root_rank=0, name="hvdquant.check"), flat))
    all_identical = bool(hvd.allreduce(torch.tensor([int(identical)]), op=hvd.Min, name="hvdquant.check.min"))
    summary = {
        "compression": args.compression,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ranks": size,
        "test_accuracy": history[-1]["test_accuracy"],
        "bits_per_coordinate": compression.stats.bits_per_coordinate,
        "bytes_handed_per_rank": compression.stats.bytes_handed,
        "coordinates_per_rank": compression.stats.coordinates,
        "parameters": sum(p.numel() for p in model.parameters()),
        "replicas_bit_identical": all_identical,
        "seconds": time.perf_counter() - start,
        "history": history,
    }
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"train-{args.compression}.json"
        path.write_text(json.dumps(summary, indent=2))
        print(f"final test accuracy {summary['test_accuracy']:.4f}; replicas bit-identical: {all_identical}; "
              f"summary written to {path}", flush=True)
    if not all_identical:
        raise SystemExit("replicas diverged: parameters differ between ranks")
    return summary


if __name__ == "__main__":
    main()
