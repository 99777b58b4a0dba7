"""Independent vs stratified dither (a benchmark, not a test): decode cost as P grows, and the
variance of the decoded mean, on synthetic patterns and on the main job's real gradients.

    python launch/bench_dither.py                  # n = 1e7, P = 2 4 8 16; writes runs/bench_dither/
    python launch/bench_dither.py --n 1e6 --ranks 2 8 --quick

Timing (one process, median of --repeats; the kernels' thread budget as in a 1-rank job):
- "stock decode": one decode of Σ_p k_p with a common Δ (what the stock Horovod path and a DDP
  allreduce hook do after the sum): the independent dither regenerates P streams, the stratified
  one regenerates one;
- "encode": one rank's dithered quantization to packed symbols (scales included);
- "allgather decode": unpack and decode the P payloads of own-scale DQSG (what the allgather
  transport does per rank); with own scales every sender's dither is needed under either family.

Variance: var(stratified) / var(independent) of the error of the decoded mean, per pattern and P.
"Real gradients": the main job's CNN on Fashion-MNIST, P ranks with different minibatches of 64,
gradients taken at steps 0 … 180 of a plain SGD run; Δ per bucket is the maximum over ranks (the
stock path's common scale).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from hvdquant import DQSG
from hvdquant.codecs.base import TensorContext
from hvdquant.kernels import DitherKey, threads

BUCKET = 512
DITHERS = ("independent", "stratified")


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timing_row(n: int, ranks: int, dither: str, gs: list[torch.Tensor], repeats: int) -> dict:
    codec = DQSG(1, BUCKET, dither)
    ctxs = [TensorContext("t", (n,), DitherKey(9, 1, 2, p), ranks) for p in range(ranks)]
    delta = codec.step_size(torch.maximum(codec.bucket_absmax(gs[0]), codec.bucket_absmax(gs[1])))
    key0 = codec.keyed(ctxs[0].key, ranks)
    ksum = sum(codec.quantize(gs[p % 2], delta, codec.keyed(c.key, ranks)).to(torch.int32)
               for p, c in enumerate(ctxs))
    wire = [codec.from_bytes(codec.encode(gs[p % 2], c).to_bytes(), n, c) for p, c in enumerate(ctxs)]
    return {"ranks": ranks, "dither": dither, "n": n,
            "stock_decode_s": timed(lambda: codec.decode_sum(ksum, delta, key0, senders=ranks), repeats),
            "encode_s": timed(lambda: codec.encode(gs[0], ctxs[-1]), repeats),
            "allgather_decode_s": timed(lambda: codec.aggregate(wire, ctxs[0]), repeats)}


def timing_rows(n: int, ranks_list: list[int], repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(n, generator=gen) for _ in range(2)]  # two distinct inputs, reused for P senders
    rows = []
    for ranks in ranks_list:
        for dither in DITHERS:
            row = timing_row(n, ranks, dither, gs, repeats)
            rows.append(row)
            print(f"P={ranks:3d} {dither:12s} stock decode {row['stock_decode_s'] * 1e3:8.1f} ms  "
                  f"encode {row['encode_s'] * 1e3:8.1f} ms  allgather decode {row['allgather_decode_s'] * 1e3:8.1f} ms",
                  flush=True)
    return rows


def mean_error(xs: torch.Tensor, dither: str, seed: int) -> torch.Tensor:
    """Error of the decoded mean of the rows of xs (P × n) under a common Δ per bucket (DQSG s=1)."""
    ranks, n = xs.shape
    codec = DQSG(1, BUCKET, dither)
    delta = codec.step_size(torch.stack([codec.bucket_absmax(x) for x in xs]).amax(0))
    ksum = torch.zeros(n, dtype=torch.int32)
    for p in range(ranks):
        ksum += codec.quantize(xs[p], delta, codec.keyed(DitherKey(seed, 0, 1, p), ranks)).to(torch.int32)
    key0 = codec.keyed(DitherKey(seed, 0, 1, 0), ranks)
    return codec.decode_sum(ksum, delta, key0, senders=ranks, factor=1.0 / ranks).double() - xs.double().mean(0)


def ratio(samples: list[torch.Tensor], seeds: int = 4) -> float:
    """Σ squared error, stratified ÷ independent, over the samples and ``seeds`` dither seeds."""
    tot = {d: sum(float((mean_error(x, d, s) ** 2).sum()) for x in samples for s in range(seeds)) for d in DITHERS}
    return tot["stratified"] / tot["independent"]


def synthetic(ranks: int, n: int) -> dict[str, list[torch.Tensor]]:
    rng = np.random.default_rng(ranks)
    common = rng.normal(0, 1, n)
    pats = {"identical": np.tile(common, (ranks, 1)),
            "independent": rng.normal(0, 1, (ranks, n)),
            "common + 3% noise": np.tile(common, (ranks, 1)) + rng.normal(0, 0.03, (ranks, n)),
            "common + 30% noise": np.tile(common, (ranks, 1)) + rng.normal(0, 0.3, (ranks, n))}
    return {k: [torch.from_numpy(v.astype(np.float32))] for k, v in pats.items()}


def real_gradients(ranks: int, steps: list[int], batch: int = 64) -> list[torch.Tensor]:
    """Per-rank gradients (P × n) of the main job's CNN at the given SGD steps, distinct minibatches."""
    import torch.nn.functional as F

    from hvdquant.data import load_fashion_mnist
    from hvdquant.examples.models import SmallCNN

    x, y, _, _ = load_fashion_mnist()
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out = []
    for step in range(max(steps) + 1):
        grads = []
        for p in range(ranks):
            i = (torch.arange(batch) + batch * (p + ranks * step)) % x.shape[0]
            model.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            grads.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]))
        if step in steps:
            out.append(torch.stack(grads))
        for q, g in zip(model.parameters(), torch.stack(grads).mean(0).split([q.numel() for q in model.parameters()])):
            q.grad = g.view_as(q).clone()
        opt.step()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=float, default=1e7, help="coordinates for the timing rows")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="fewer real-gradient steps")
    p.add_argument("--out", type=Path, default=Path("runs/bench_dither"))
    args = p.parse_args()
    timing = timing_rows(int(args.n), args.ranks, args.repeats)
    steps = [0, 60] if args.quick else [0, 30, 90, 180]
    variance = []
    for ranks in args.ranks:
        row = {"ranks": ranks, **{k: ratio(v) for k, v in synthetic(ranks, 200_000).items()},
               "real gradients": ratio(real_gradients(ranks, steps))}
        variance.append(row)
        print(f"P={ranks:3d} " + "  ".join(f"{k}: {v:.3f}" for k, v in row.items() if k != "ranks"), flush=True)
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "threads": threads.budget(), "bucket": BUCKET, "levels": 1}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_dither.json").write_text(json.dumps({"meta": meta, "timing": timing, "variance": variance},
                                                           indent=2))
    print()
    print(markdown(meta, timing, variance))
    plot(timing, args.out / "bench_dither.png", meta)


def markdown(meta: dict, timing: list[dict], variance: list[dict]) -> str:
    lines = [f"Dither families, {meta['date']}, {meta['machine']}, {meta['threads']} kernel threads, DQSG s=1, "
             f"bucket {meta['bucket']}, n = {timing[0]['n']:.0e}; ms per call (median).", "",
             "| P | dither | stock decode | encode | allgather decode |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['ranks']} | {r['dither']} | {r['stock_decode_s'] * 1e3:.1f} | {r['encode_s'] * 1e3:.1f} | "
              f"{r['allgather_decode_s'] * 1e3:.1f} |" for r in timing]
    cols = [k for k in variance[0] if k != "ranks"]
    lines += ["", "Variance of the decoded mean's error, stratified ÷ independent:", "",
              "| P | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    lines += [f"| {r['ranks']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for r in variance]
    return "\n".join(lines)


def plot(timing: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    for ax, key, title in zip(axes, ("stock_decode_s", "encode_s", "allgather_decode_s"),
                              ("decode of the index sum (stock path)", "encode (one rank)", "allgather decode")):
        for dither in DITHERS:
            pts = [(r["ranks"], r[key] * 1e3) for r in timing if r["dither"] == dither]
            ax.plot(*zip(*pts), marker="o", label=dither)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks P")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"ms per call, n = {timing[0]['n']:.0e}")
    axes[0].legend()
    fig.suptitle(f"DQSG s=1 dither families, {meta['machine']}, {meta['threads']} threads, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
