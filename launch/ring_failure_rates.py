"""Decode-failure rates of the coset ring on real gradients (a measurement, not a test).

    .venv/bin/python launch/ring_failure_rates.py --steps 60

The main job's CNN trains on Fashion-MNIST with P simulated ranks (P minibatches of 64 per step,
the exact mean gradient applied). At every step and for every weight tensor the coset ring's
decoder runs exactly as in :func:`hvdquant.ring_allreduce`: common Δ_b = max over ranks of
max|g_b| / s₁, Σ_p k_p reduced mod ρ, resolved with side information P·ḡ_prev (the previous step's
decoded mean, PreviousMean). The ring only moves these residues, so the decoder sees the same
numbers whether they travelled over MPI or not; this script counts, per (ρ, P), the buckets whose
checksum fails (they would be recovered by the second round) and the coordinates that were wrong.
Nesting: s₂ = 1, s₁ = ρ. Writes JSON and a PNG; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from hvdquant import DQSG
from hvdquant.data import load_fashion_mnist
from hvdquant.examples.models import SmallCNN
from hvdquant.kernels import DitherKey, ops, tensor_id


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rhos", nargs="+", type=int, default=[3, 5, 7, 9, 15])
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--bucket-size", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("runs/ring_failure_rates"))
    args = p.parse_args()
    torch.set_num_threads(2)
    x, y, _, _ = load_fashion_mnist()
    rows = []
    for ranks in args.ranks:
        torch.manual_seed(0)
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        gen = torch.Generator().manual_seed(ranks)
        prev: dict[tuple[int, str], torch.Tensor] = {}
        counts = {rho: [0, 0, 0, 0] for rho in args.rhos}  # failed buckets, buckets, wrong coords, coords
        for step in range(args.steps):
            grads: list[dict[str, torch.Tensor]] = []
            for _ in range(ranks):
                idx = torch.randint(0, len(x), (64,), generator=gen)
                model.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                grads.append({n: q.grad.detach().reshape(-1).clone() for n, q in model.named_parameters()})
            for name, _ in model.named_parameters():
                if grads[0][name].numel() < 1024:
                    continue
                gs = [gr[name] for gr in grads]
                for rho in args.rhos:
                    fine = DQSG(rho, args.bucket_size)
                    delta = fine.step_size(torch.stack([fine.bucket_absmax(g) for g in gs]).max(0).values)
                    keys = [DitherKey(1, step, tensor_id(name), q) for q in range(ranks)]
                    ksum = sum(fine.quantize(g, delta, k).int() for g, k in zip(gs, keys))
                    mean = fine.decode_sum(ksum, delta, keys[0], senders=ranks) / ranks
                    side = prev.get((rho, name))
                    prev[(rho, name)] = mean
                    if side is None:
                        continue
                    residues = ((ksum + ranks * (rho // 2)) % rho).to(torch.uint8)
                    kout = torch.empty_like(ksum)
                    ops.nested_decode(residues, delta, args.bucket_size, rho, side * ranks, keys[0],
                                      senders=ranks, kout=kout)
                    failed = ops.bucket_checksum(kout, args.bucket_size) != ops.bucket_checksum(ksum, args.bucket_size)
                    c = counts[rho]
                    c[0] += int(failed.sum())
                    c[1] += failed.numel()
                    c[2] += int((kout != ksum).sum())
                    c[3] += ksum.numel()
            for n, q in model.named_parameters():
                q.grad = torch.stack([gr[n] for gr in grads]).mean(0).reshape(q.shape)
            opt.step()
        for rho, (fb, nb, fc, nc) in counts.items():
            rows.append({"rho": rho, "ranks": ranks, "bucket_failure_rate": fb / nb,
                         "coordinate_failure_rate": fc / nc,
                         "buckets": nb, "coordinates": nc})
            print(f"P={ranks} rho={rho:2d}: buckets failed {fb / nb:7.2%}  coordinates wrong {fc / nc:8.4%}",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "steps": args.steps, "bucket_size": args.bucket_size,
            "side_information": "previous step's decoded mean", "model": "SmallCNN, Fashion-MNIST, batch 64 per rank"}
    (args.out / "ring_failure_rates.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n| ρ | P | buckets failed (recovered) | coordinates wrong before recovery |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rho']} | {r['ranks']} | {r['bucket_failure_rate']:.2%} | {r['coordinate_failure_rate']:.3%} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ranks in args.ranks:
        pts = [(r["rho"], r["bucket_failure_rate"]) for r in rows if r["ranks"] == ranks]
        ax.plot(*zip(*pts), marker="o", label=f"P = {ranks}")
    ax.set_xlabel("nesting ratio ρ (s₁ = ρ, s₂ = 1)")
    ax.set_ylabel("fraction of buckets failing (recovered)")
    ax.set_title(f"Coset ring on Fashion-MNIST CNN gradients, {meta['date']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "ring_failure_rates.png", dpi=110)


if __name__ == "__main__":
    main()
