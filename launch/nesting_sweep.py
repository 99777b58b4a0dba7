"""When does nesting pay? Nested decoding against DQSG across inter-rank gradient correlation
(a measurement, not a test).

    .venv/bin/python launch/nesting_sweep.py                 # the full sweep
    .venv/bin/python launch/nesting_sweep.py --ranks 8 --levels 3,1 8,1

Gradients come from two sources, P ranks simulated in one process (the decoders see exactly the
numbers they would see after a real exchange; the transports are tested bit for bit elsewhere):

- **real**: the main job's CNN on Fashion-MNIST; every rank draws its own minibatch of B images
  (B = 25 … 1600), early in training (the first steps from the initial weights) and late (after
  300 steps of training at 4 × 64 images); every weight tensor separately. The mean gradient is
  applied with SGD(0.02, momentum 0.9), so the steps follow a real trajectory.
- **synthetic**: g_{p,t} = c_t + σ·z_{p,t} with c_t = c_{t−1} + σ·z_t (z standard normal), so the
  ranks' correlation is 1/(1 + σ²) and the step-to-step change is of the same size σ.

For each setting and nesting configuration (s₁, s₂), ρ = s₁/s₂:

- **payload NDQSG** (the paper's scheme, `hvdquant.NDQSG`, allgather): half the ranks send DQSG(s₁),
  the others coset indices decoded against the running mean of the senders decoded before them
  (side information *within* the step). Reported: the fraction of nested coordinates resolved to
  the wrong coset member and of nested buckets failing their checksum, and the bytes all ranks
  hand over (payloads plus the recovery of failed buckets) ÷ the bytes of DQSG(s₁) payloads.
  Recovered NDQSG decodes to DQSG(s₁) exactly, so this is the bits ratio **at equal variance**.
- **payload NDQSG + locate** (`NDQSG(..., adaptive=False, locate=True)`): the same nesting, failed
  buckets first asked for syndromes that locate up to t wrong coordinates (docs/ALGORITHMS.md §2),
  only the buckets they cannot explain resent whole; the syndromes count in the bytes.
- **adaptive payload NDQSG** (`NDQSG(..., adaptive=True)`, the default, which locates): the same,
  nesting switched per tensor from the previous step's outcome (off at a tensor's first step), its
  bytes over all steps; **adaptive, whole** (`locate=False`): the same with failed buckets resent
  whole (the default before locating was added).
- **nested sum / coset ring** (`Compression.ndqsg(adaptive=False)`, `ring_allreduce`): a common
  Δ, the residues of Σ_p k_p mod ρ resolved against P × the previous step's decoded mean (side
  information *across* steps). The two share this decoder, hence these failure rates. Bits are
  the stock path's per coordinate: coset sums as digits of base (ρ−1)P + 1 and a float64 checksum
  per bucket, plus the failed buckets' DQSG(s₁) index sums as digits of base 2s₁P + 1,
  ÷ DQSG(s₁)'s own summable digits (scales, equal for both, left out of both). Its adaptive twin
  (the default of both paths) sends the fields while nesting is off and decides from the probe.

Writes runs/nesting_sweep/nesting_sweep.json and .png; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from hvdquant import NDQSG, CodecState
from hvdquant.codecs.base import TensorContext
from hvdquant.codecs.coset_resolver import bucket_coordinates
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.data import load_fashion_mnist
from hvdquant.examples.models import SmallCNN
from hvdquant.kernels import DitherKey, ops, tensor_id
from hvdquant.transports.summable import SumFieldLayout

SEED = 2026


def correlation(gs: list[torch.Tensor]) -> float:
    """Mean pairwise Pearson correlation of the ranks' gradients."""
    x = torch.stack([g.double() - g.double().mean() for g in gs])
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    c = x @ x.T
    p = len(gs)
    return float((c.sum() - c.diagonal().sum()) / (p * (p - 1)))


def payload_ndqsg(codec: NDQSG, gs: list[torch.Tensor], name: str, step: int,
                  state: CodecState | None = None) -> dict[str, float]:
    """The paper's NDQSG over allgather: counts and bytes (payloads + recovery) against DQSG(s₁);
    ``state`` holds an adaptive codec's decisions from step to step."""
    ranks, n = len(gs), gs[0].numel()
    ctx = TensorContext(name, (n,), DitherKey(SEED, step, tensor_id(name), 0), ranks, state)
    encs = [codec.encode(g, ctx.sender(p)) for p, g in enumerate(gs)]
    recovered = 0

    def recover(failed: dict[int, list]) -> dict[int, torch.Tensor]:
        nonlocal recovered
        replies = {p: codec.recovery_payload(encs[p], ctx.sender(p), b) for p, b in failed.items()}
        recovered += sum(r.numel() for r in replies.values())
        return replies

    _, stats = codec.aggregate(encs, ctx, recover)
    nested = ranks - codec.dqsg_senders(ranks)
    fine = codec.fine
    return {"bytes": sum(e.nbytes() for e in encs) + recovered,
            "dqsg_bytes": sum(fine.encode(g, ctx.sender(p)).nbytes() for p, g in enumerate(gs)),
            "failed_coordinates": stats.failed_coordinates, "coordinates": nested * n,
            "failed_buckets": stats.failed_buckets, "buckets": nested * ops.num_buckets(n, codec.bucket_size)}


def summed_ndqsg(codec: NDQSG, gs: list[torch.Tensor], side: torch.Tensor | None, name: str, step: int,
                 adaptive: tuple[NDQSG, NestingPolicy] | None = None) -> tuple[dict[str, float] | None, torch.Tensor]:
    """Nested sum / coset ring: Σk mod ρ resolved against ``side`` (P × the previous decoded mean).
    Returns the counts (None without side information) and this step's P × decoded mean. With
    ``adaptive`` (an adaptive NDQSG and the policy holding its decisions), the bytes are the fields'
    while nesting is off, and the decision for the next step is made as `NestedSum` makes it."""
    ranks, n, d = len(gs), gs[0].numel(), codec.bucket_size
    fine, rho, s1 = codec.fine, codec.nesting_ratio, codec.levels[0]
    delta = fine.step_size(torch.stack([fine.bucket_absmax(g) for g in gs]).amax(0))
    keys = [DitherKey(SEED, step, tensor_id(name), p) for p in range(ranks)]
    ksum = sum(fine.quantize(g, delta, k).int() for g, k in zip(gs, keys))
    total = fine.decode_sum(ksum, delta, keys[0], senders=ranks)
    if side is None:
        return None, total
    residues = ((ksum + ranks * (rho // 2)) % rho).to(torch.uint8)
    checks = ops.bucket_checksum(ksum, d)
    kout, bad = codec.resolver.resolve(residues, delta, side, keys[0], ranks, checks, rho)
    fine_fields = SumFieldLayout.for_levels(s1, ranks)
    failed_coords = int((kout != ksum).sum())
    nb = ops.num_buckets(n, d)

    def words_at(r: int, failed: list[int]) -> int:
        recovery = fine_fields.field_words(bucket_coordinates(failed, d, n).numel()) if failed else 0
        return SumFieldLayout(0, r - 1, ranks).field_words(n) + nb + recovery

    words = words_at(rho, bad)
    plain = fine_fields.field_words(n)
    if adaptive is not None:  # as NestedSum decides: every candidate ratio priced on the exact sums
        nesting, policy = adaptive
        nested_now = policy.is_on(name)
        cost = {r: words_at(r, nesting.resolver.probe(ksum, delta, side, keys[0], ranks, r))
                for r in nesting.candidate_ratios()}
        words = cost[nesting.ratio(name, policy)] if nested_now else plain
        policy.choose(name, cost, plain, buckets=nb)
    return ({"bytes": 8 * words, "dqsg_bytes": 8 * plain,
             "failed_coordinates": failed_coords, "coordinates": n,
             "failed_buckets": len(bad), "buckets": ops.num_buckets(n, d)}, total)


def add(acc: dict[str, float], part: dict[str, float] | None) -> None:
    if part is not None:
        for k, v in part.items():
            acc[k] = acc.get(k, 0) + v


def real_settings(args: argparse.Namespace):
    """Yields (setting, tensor name, step, per-rank gradients) along real training trajectories."""
    x, y, _, _ = load_fashion_mnist()
    gen = torch.Generator().manual_seed(SEED)

    def grads_of(model: torch.nn.Module, batch: int, ranks: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(ranks):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            model.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            out.append({n: q.grad.detach().reshape(-1).clone() for n, q in model.named_parameters()})
        return out

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, grads: list[dict[str, torch.Tensor]]) -> None:
        for n, q in model.named_parameters():
            q.grad = torch.stack([g[n] for g in grads]).mean(0).reshape(q.shape)
        opt.step()

    torch.manual_seed(0)
    model = SmallCNN()
    start = {"early": {k: v.clone() for k, v in model.state_dict().items()}}
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(args.late_after):
        step(model, opt, grads_of(model, 64, 4))
    start["late"] = {k: v.clone() for k, v in model.state_dict().items()}
    for phase, weights in start.items():
        for batch in args.batches:
            model.load_state_dict(weights)
            opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
            for t in range(args.steps):
                grads = grads_of(model, batch, args.ranks)
                for name, _ in model.named_parameters():
                    if name.endswith("weight"):
                        yield f"real {phase} B={batch}", name, t, [g[name] for g in grads]
                step(model, opt, grads)


def synthetic_settings(args: argparse.Namespace):
    gen = torch.Generator().manual_seed(SEED)
    for sigma in args.sigmas:
        c = torch.randn(args.synthetic_n, generator=gen)
        for step in range(args.steps):
            c = c + sigma * torch.randn(args.synthetic_n, generator=gen)
            yield (f"synthetic σ={sigma:g}", "w", step,
                   [c + sigma * torch.randn(args.synthetic_n, generator=gen) for _ in range(args.ranks)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--levels", nargs="+", default=["3,1", "8,1"], help="nesting configurations s1,s2")
    p.add_argument("--batches", nargs="+", type=int, default=[25, 100, 400, 1600])
    p.add_argument("--sigmas", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3, 1.0])
    p.add_argument("--steps", type=int, default=8, help="measured steps per setting (the first has no "
                   "previous mean: the nested sum skips it)")
    p.add_argument("--late-after", type=int, default=300)
    p.add_argument("--synthetic-n", type=int, default=1 << 16)
    p.add_argument("--bucket-size", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("runs/nesting_sweep"))
    args = p.parse_args()
    codecs = [NDQSG(tuple(int(v) for v in lv.split(",")), args.bucket_size, adaptive=False) for lv in args.levels]
    located = {codec.levels: NDQSG(codec.levels, args.bucket_size, adaptive=False, locate=True) for codec in codecs}
    adaptive = {codec.levels: NDQSG(codec.levels, args.bucket_size, adaptive=True) for codec in codecs}
    whole = {codec.levels: NDQSG(codec.levels, args.bucket_size, adaptive=True, locate=False) for codec in codecs}
    summed_adaptive = {codec.levels: (NDQSG(codec.levels, args.bucket_size, adaptive=True), NestingPolicy())
                       for codec in codecs}
    states = {(kind, codec.levels): CodecState() for kind in ("adaptive", "whole") for codec in codecs}
    acc: dict[tuple[str, str, str, str], dict[str, float]] = {}
    corr: dict[tuple[str, str], list[float]] = {}
    side: dict[tuple[str, str, str], torch.Tensor] = {}
    for source in (real_settings(args), synthetic_settings(args)):
        for setting, name, step, gs in source:
            layer = name if setting.startswith("real") else "all"
            corr.setdefault((setting, layer), []).append(correlation(gs))
            for codec in codecs:
                cfg = f"({codec.levels[0]},{codec.levels[1]})"
                add(acc.setdefault((setting, layer, cfg, "payload"), {}),
                    payload_ndqsg(codec, gs, f"{setting}/{name}", step))
                add(acc.setdefault((setting, layer, cfg, "payload-locate"), {}),
                    payload_ndqsg(located[codec.levels], gs, f"{setting}/{name}", step))
                add(acc.setdefault((setting, layer, cfg, "adaptive"), {}),
                    payload_ndqsg(adaptive[codec.levels], gs, f"{setting}/{name}", step,
                                  states["adaptive", codec.levels]))
                add(acc.setdefault((setting, layer, cfg, "adaptive-whole"), {}),
                    payload_ndqsg(whole[codec.levels], gs, f"{setting}/{name}", step, states["whole", codec.levels]))
                prev = side.get((setting, name, cfg)) if step > 0 else None
                part, side[(setting, name, cfg)] = summed_ndqsg(codec, gs, prev, f"{setting}/{name}", step)
                add(acc.setdefault((setting, layer, cfg, "sum"), {}), part)
                part, _ = summed_ndqsg(codec, gs, prev, f"{setting}/{name}", step, summed_adaptive[codec.levels])
                add(acc.setdefault((setting, layer, cfg, "sum-adaptive"), {}), part)
            print(f"{setting:24s} {name:14s} step {step}", flush=True)
    rows = []
    for (setting, layer, cfg, scheme), a in acc.items():
        if not a:
            continue
        rows.append({"setting": setting, "layer": layer, "levels": cfg, "scheme": scheme,
                     "correlation": sum(corr[setting, layer]) / len(corr[setting, layer]),
                     "coordinate_failure_rate": a["failed_coordinates"] / max(a["coordinates"], 1),
                     "bucket_failure_rate": a["failed_buckets"] / max(a["buckets"], 1),
                     "bits_ratio": a["bytes"] / a["dqsg_bytes"]})
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "ranks": args.ranks, "bucket_size": args.bucket_size,
            "steps": args.steps, "command": "launch/nesting_sweep.py"}
    (args.out / "nesting_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n| setting | layer | ρ config | mean corr. | payload NDQSG: coords wrong | buckets failed "
          "| bits ÷ DQSG(s₁) | + locate | adaptive, whole | adaptive (locate) | nested sum / ring: coords wrong "
          "| buckets failed | bits ÷ DQSG(s₁) | adaptive: bits ÷ DQSG(s₁) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = {(r["setting"], r["layer"], r["levels"], r["scheme"]): r for r in rows}
    for (setting, layer, cfg, scheme), r in by.items():
        if scheme != "payload":
            continue
        s = by.get((setting, layer, cfg, "sum"))
        sa = by.get((setting, layer, cfg, "sum-adaptive"))
        tail = (f"{s['coordinate_failure_rate']:.2%} | {s['bucket_failure_rate']:.1%} | {s['bits_ratio']:.2f} | "
                f"{sa['bits_ratio']:.2f}" if s else "– | – | – | –")
        a = by[setting, layer, cfg, "adaptive"]
        loc, aw = by[setting, layer, cfg, "payload-locate"], by[setting, layer, cfg, "adaptive-whole"]
        print(f"| {setting} | {layer} | {cfg} | {r['correlation']:.3f} | {r['coordinate_failure_rate']:.2%} | "
              f"{r['bucket_failure_rate']:.1%} | {r['bits_ratio']:.3f} | {loc['bits_ratio']:.3f} | "
              f"{aw['bits_ratio']:.3f} | {a['bits_ratio']:.3f} | {tail} |")
    plot(rows, args.out / "nesting_sweep.png", meta)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4), sharey=True)
    axes = axes.reshape(-1)
    for ax, scheme, title in zip(axes, ("payload", "payload-locate", "sum", "adaptive-whole", "adaptive",
                                        "sum-adaptive"),
                                 ("payload NDQSG, whole-bucket recovery (side info: this step's DQSG ranks)",
                                  "payload NDQSG, locating (syndromes, then whole buckets)",
                                  "nested sum / coset ring (side info: last step)",
                                  "payload NDQSG, adaptive, whole-bucket recovery",
                                  "payload NDQSG, adaptive (default: locating)",
                                  "nested sum / coset ring, adaptive")):
        for cfg in sorted({r["levels"] for r in rows}):
            for kind, marker in (("real", "o"), ("synthetic", "s")):
                pts = sorted((-math.log10(max(1 - r["correlation"], 1e-6)), r["bits_ratio"]) for r in rows
                             if r["scheme"] == scheme and r["levels"] == cfg and r["setting"].startswith(kind))
                if pts:
                    ax.plot(*zip(*pts), marker=marker, linestyle="-" if kind == "synthetic" else "none",
                            label=f"{kind} {cfg}", alpha=0.8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.8, color="g", lw=0.8, ls="--")
        ticks = [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999]
        ax.set_xticks([-math.log10(1 - c) for c in ticks], [f"{c:g}" for c in ticks])
        ax.set_xlabel("inter-rank correlation (axis: −log10(1 − c))", fontsize=8)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits ÷ DQSG(s₁) bits (equal variance)")
    axes[3].set_ylabel("bits ÷ DQSG(s₁) bits (equal variance)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"When nesting pays: P = {meta['ranks']}, d = {meta['bucket_size']}, {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
