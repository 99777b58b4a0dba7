"""Error per bit: every codec's error of the mean over P senders against the bits it hands to the
collective, beside reference implementations of the best published unbiased mean estimators.

    python launch/bench_error.py [--quick] [--out runs/bench_error] [--report docs/RESULTS.md]

Error: ‖mean_p ĝ_p − mean_p g_p‖² / ‖mean_p g_p‖² (normalised mean squared error of the mean, one
draw of every dither and rotation, averaged over ``--repeats`` draws). Bits per coordinate: the bytes
of each sender's payload (``Encoded.nbytes()``, what a payload transport hands to the collective;
for the references, their packed bytes), × 8 / coordinates, averaged over the senders.

Data: Gaussian, Student-t with 3 degrees of freedom, signed log-normal (σ = 1.5); senders
g_p = √ρ·z_0 + √(1−ρ)·z_p with inter-sender correlation ρ ∈ {0, 0.5, 0.9}; and real gradients of
both main jobs (``--job cnn`` and ``--job lm`` of hvdquant.examples.train) at their first step and
after ``--late`` steps of single-process training: sender p's gradient is that of the p-th next
batch, every tensor of at least 1024 coordinates (the jobs' --min-numel) coded on its own.

Codecs (hvdquant's, through their public classes): DQSG s ∈ {1, 2, 3, 7} with either dither, with
and without ``rotation="hadamard"``, and entropy coded (``coding="rans"``, rotated, s up to 15);
ECDQ (rotated, symbols coded under the dither-conditioned Gaussian model) at steps 3.0 to 0.12 with
one step per tensor (``scope="tensor"``) and, at fewer steps, one per bucket, its default (the senders' own-scale
payloads, aggregated as the payload transports do); NDQSG (s₁, s₂) ∈
{(3, 1), (7, 1)}, half the senders nested, with and without the rotation, decoded in rank order with
the plain senders' mean as side information (its recovery replies counted in its bits); QSGD
s ∈ {1, 2, 4, 8} with Elias coding; the 1-bit quantizer of 1-bit SGD (one step's error: error
feedback carries it to the next step); top-k at 1%, 5%, 10% (int64 indices and
float32 values). References written here from the papers' definitions:

- DRIVE (Vargaftik et al., "DRIVE: One-bit Distributed Mean Estimation", NeurIPS 2021): rotate
  x by a randomized Hadamard transform R (orthonormal), send sign(Rx) and one scale
  S = ‖x‖²/‖Rx‖₁; the receiver returns S·Rᵀ sign(Rx). Unbiased for a uniformly random rotation.
- EDEN (Vargaftik et al., "EDEN: Communication-Efficient and Robust Distributed Mean Estimation
  for Federated Learning", ICML 2022), unbiased, b ∈ {1, 2, 3, 4} bits: rotate, scale the rotated
  vector to unit variance per coordinate (η = √d/‖x‖), quantize each coordinate to the nearest of
  the 2^b Lloyd–Max centroids of N(0, 1) (computed here by Lloyd's iteration), send the indices and
  S = ‖x‖²/⟨Rx, Q⟩ with Q the centroids in x's units; the receiver returns S·Rᵀ Q. (b = 1 is DRIVE.)

Each sender draws its own rotation (independent errors, as the papers' senders do). A vector whose
length is not a power of two is split into the pieces of its binary expansion, each rotated and
scaled on its own (32 bits of scale per piece): no padding is sent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hvdquant import DQSG, ECDQ, NDQSG, QSGD
from hvdquant.codecs import TensorContext
from hvdquant.codecs.onebit import OneBitQuantizer
from hvdquant.codecs.topk import TopK
from hvdquant.kernels import DitherKey, tensor_id

BEGIN, END = "<!-- bench_error: begin (launch/bench_error.py) -->", "<!-- bench_error: end -->"
SEED = 2026
ENTROPY_CODED = "DQSG stratified + rotation + rANS"
ECDQ_FAMILY = "ECDQ (rotation, dither-conditioned rANS, one step per tensor)"
ECDQ_BUCKET_FAMILY = "ECDQ, one step per bucket"
#: ECDQ's steps (Δ in units of the tensor's RMS): about 0.9 to 5 bits per coordinate on Gaussian data (fewer
#: on real gradients, whose quiet buckets cost almost nothing: the finest steps keep 4 bits within reach)
ECDQ_STEPS = (3.0, 2.6, 2.2, 1.9, 1.6, 1.35, 1.1, 0.9, 0.75, 0.6, 0.5, 0.4, 0.33, 0.27, 0.22, 0.18, 0.15, 0.12)
ECDQ_BUCKET_STEPS = (3.0, 2.6, 1.6, 1.1, 0.6, 0.27)
#: the bits per coordinate at which hvdquant is compared with EDEN (its 1-4 bit points and midway)
EQUAL_BITS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


# ----------------------------------------------------------------------------- references (numpy)
def lloyd_max_gaussian(bits: int, iterations: int = 300) -> np.ndarray:
    """The 2^bits centroids of the mean-squared-error-optimal scalar quantizer of N(0, 1), by Lloyd's
    iteration on a fine grid (boundaries at midpoints, centroids at the conditional means)."""
    grid = np.linspace(-9.0, 9.0, 360_001)
    weight = np.exp(-grid ** 2 / 2)
    levels = 1 << bits
    centroids = np.quantile(np.random.default_rng(0).standard_normal(200_000), (np.arange(levels) + 0.5) / levels)
    for _ in range(iterations):
        cell = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, grid)
        centroids = np.bincount(cell, weight * grid, levels) / np.bincount(cell, weight, levels)
    return centroids


def fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh–Hadamard transform of a power-of-two-long vector (float64)."""
    m = x.size
    y = x.reshape(1, m)
    h = 1
    while h < m:
        y = y.reshape(-1, 2, h)
        y = np.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1)
        h *= 2
    return y.reshape(m) / math.sqrt(m)


def pieces(n: int) -> list[tuple[int, int]]:
    """[start, end) of the binary expansion of n, largest first."""
    out, pos = [], 0
    while pos < n:
        m = 1 << ((n - pos).bit_length() - 1)
        out.append((pos, pos + m))
        pos += m
    return out


def eden(x: np.ndarray, bits: int, rng: np.random.Generator, centroids: np.ndarray) -> tuple[np.ndarray, float]:
    """One sender's EDEN (DRIVE for bits = 1, where the centroids are ±√(2/π)) estimate of x, and
    its bits per coordinate: the packed indices plus 32 bits of scale per piece."""
    out = np.empty_like(x)
    for a, b in pieces(x.size):
        signs = rng.choice((-1.0, 1.0), b - a)
        y = fwht(signs * x[a:b])
        norm2 = float(x[a:b] @ x[a:b])
        if norm2 == 0.0:
            out[a:b] = 0.0
            continue
        eta = math.sqrt(b - a) / math.sqrt(norm2)
        index = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, eta * y)
        q = centroids[index] / eta
        scale = norm2 / float(y @ q)
        out[a:b] = signs * fwht(scale * q)
    packed_bytes = math.ceil(x.size * bits / 8) + 4 * len(pieces(x.size))
    return out, 8.0 * packed_bytes / x.size


# ----------------------------------------------------------------------------- hvdquant's codecs
def codec_mean(codec, tensors: list[torch.Tensor], name: str, step: int) -> tuple[torch.Tensor, float, float | None]:
    """The mean over senders as the payload transports form it (``codec.aggregate``), the senders'
    mean payload bits per coordinate, and what an ideal entropy coder of the same symbols would send
    (zeroth-order empirical entropy of each sender's symbols plus its side bits; None where the codec
    keeps no symbol statistics)."""
    ranks = len(tensors)
    ctx = TensorContext(name, tuple(tensors[0].shape), DitherKey(SEED, step, tensor_id(name), 0), ranks)
    payloads = [codec.encode(t, ctx.sender(p)) for p, t in enumerate(tensors)]
    replied = []  # nested decoding's recovery replies: on the wire too

    def recover(failed: dict[int, list]) -> dict[int, torch.Tensor]:
        replies = {p: codec.recovery_payload(payloads[p], ctx.sender(p), requests) for p, requests in failed.items()}
        replied.extend(replies.values())
        return replies

    mean, _ = codec.aggregate(payloads, ctx, recover)
    n = tensors[0].numel()
    bits = (sum(8.0 * e.nbytes() for e in payloads) + sum(8.0 * r.numel() for r in replied)) / (ranks * n)
    entropies = [e.entropy() for e in payloads]
    entropy = None if None in entropies else sum(n * h + e.side_bits for h, e in zip(entropies, payloads)) / (ranks * n)
    return mean.reshape(-1), bits, entropy


def reference_mean(bits: int, centroids: np.ndarray) -> Callable:
    def run(tensors: list[torch.Tensor], name: str, step: int) -> tuple[torch.Tensor, float]:
        outs, total = [], 0.0
        for p, t in enumerate(tensors):
            rng = np.random.default_rng([SEED, step, tensor_id(name), p])
            est, b = eden(t.reshape(-1).double().numpy(), bits, rng, centroids)
            outs.append(est)
            total += b
        return torch.from_numpy(np.mean(outs, axis=0)), total / len(tensors), None
    return run


def methods(quick: bool) -> dict[str, tuple[str, Callable]]:
    """name -> (family, f(tensors, name, step) -> (mean estimate, bits per coordinate))."""
    out: dict[str, tuple[str, Callable]] = {}

    def add(family: str, name: str, codec) -> None:
        out[name] = (family, lambda ts, n, s, c=codec: codec_mean(c, ts, n, s))

    for dither in ("stratified", "independent"):
        for rotation in ("none", "hadamard"):
            family = f"DQSG {dither}" + (" + rotation" if rotation == "hadamard" else "")
            for s in (1, 3) if quick else (1, 2, 3, 7):
                add(family, f"dqsg-{dither[:5]}-{rotation[:4]}-s{s}", DQSG(s, 512, dither, rotation))
    for s in (1, 3) if quick else (1, 2, 3, 4, 5, 7, 11, 15):
        add(ENTROPY_CODED, f"dqsg-strat-hada-rans-s{s}", DQSG(s, 512, "stratified", "hadamard", "rans"))
    for step in (2.6, 1.1) if quick else ECDQ_STEPS:
        add(ECDQ_FAMILY, f"ecdq-{step:g}", ECDQ(step, 512, "stratified", "hadamard", "tensor"))
    for step in (2.6,) if quick else ECDQ_BUCKET_STEPS:
        add(ECDQ_BUCKET_FAMILY, f"ecdq-bucket-{step:g}", ECDQ(step, 512, "stratified", "hadamard", "bucket"))
    for rotation in ("none", "hadamard"):
        family = "NDQSG" + (" + rotation" if rotation == "hadamard" else "")
        for s1 in (3,) if quick else (3, 7):
            add(family, f"ndqsg-{rotation[:4]}-s{s1}", NDQSG((s1, 1), 512, adaptive=False, rotation=rotation))
    for s in (1, 4) if quick else (1, 2, 4, 8):
        add("QSGD + Elias", f"qsgd-elias-s{s}", QSGD(s, 512, "l2", "elias"))
    add("1-bit (one step)", "onebit", OneBitQuantizer())
    for ratio in (0.01,) if quick else (0.01, 0.05, 0.1):
        add("top-k", f"topk-{ratio:g}", TopK(ratio))
    for bits in (1, 2) if quick else (1, 2, 3, 4):
        family = "DRIVE (reference)" if bits == 1 else "EDEN unbiased (reference)"
        out[f"{'drive' if bits == 1 else 'eden'}-b{bits}"] = (family, reference_mean(bits, lloyd_max_gaussian(bits)))
    return out


# ----------------------------------------------------------------------------- data
def synthetic(kind: str, n: int, senders: int, rho: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        if kind == "gaussian":
            return torch.randn(n, generator=gen)
        if kind == "student3":  # t_3 = Z / sqrt(χ²_3 / 3)
            chi2 = torch.randn(3, n, generator=gen).pow(2).sum(0)
            return torch.randn(n, generator=gen) / (chi2 / 3).sqrt()
        return torch.randn(n, generator=gen).mul(1.5).exp() * torch.randn(n, generator=gen).sign()

    common = draw()
    return [math.sqrt(rho) * common + math.sqrt(1 - rho) * draw() for _ in range(senders)]


def real_gradients(job: str, late: int, senders: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """{"early": [...], "late": [...]}: per sender p, the named gradients (≥ 1024 coordinates) of
    the job's model on its p-th next batch, at the first step and after ``late`` training steps
    (one process, the job's optimizer and learning-rate schedule)."""
    from hvdquant.examples.tasks import TASKS
    from hvdquant.examples.train import parse_args

    args = parse_args(["--job", job, "--steps", str(max(late, 250)), "--seed", "0"])
    torch.manual_seed(0)
    task = TASKS[job](args, 0, 1)
    model = task.model()
    opt = task.optimizer(model, args, 1)
    base_lr = [group["lr"] for group in opt.param_groups]

    def batches():
        r = 0
        while True:
            yield from task.batches(r)
            r += 1

    stream = batches()

    def grads() -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(senders):
            x, y = next(stream)
            model.zero_grad()
            task.loss(model(x), y).backward()
            out.append({name: p.grad.detach().clone() for name, p in model.named_parameters()
                        if p.grad is not None and p.numel() >= 1024})
        return out

    sets = {"early": grads()}
    for step in range(late):
        for group, lr in zip(opt.param_groups, base_lr):
            group["lr"] = lr * task.lr_factor(step)
        x, y = next(stream)
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
    sets["late"] = grads()
    return sets


# ----------------------------------------------------------------------------- measurement
def measure(run: Callable, tensors: dict[str, list[torch.Tensor]], repeats: int) -> tuple[float, float, float | None]:
    """(normalised error of the mean, bits per coordinate, entropy bits per coordinate or None) over
    every named tensor (errors and bits summed over tensors, weighted by their sizes), averaged over
    ``repeats`` draws."""
    err = norm = bits = entropy = 0.0
    has_entropy = True
    coords = sum(ts[0].numel() for ts in tensors.values())
    for step in range(repeats):
        for name, ts in tensors.items():
            true = torch.stack([t.reshape(-1).double() for t in ts]).mean(0)
            est, b, h = run(ts, name, step)
            err += float(((est.double() - true) ** 2).sum())
            norm += float((true ** 2).sum())
            bits += b * ts[0].numel() / coords
            has_entropy = has_entropy and h is not None
            entropy += (h or 0.0) * ts[0].numel() / coords
    return err / norm, bits / repeats, entropy / repeats if has_entropy else None


def scenarios(args: argparse.Namespace) -> list[tuple[str, int, float, dict[str, list[torch.Tensor]]]]:
    """(data name, P, ρ, {tensor name: per-sender tensors})."""
    out = []
    n = 1 << 14 if args.quick else args.coordinates
    for kind in ("gaussian", "student3", "lognormal"):
        for senders in args.senders:
            for rho in (0.0,) if senders == 1 else args.correlations:
                gs = synthetic(kind, n, senders, rho, seed=zlib.crc32(f"{kind}/{senders}/{rho}".encode()))
                out.append((kind, senders, rho, {kind: gs}))
    for job in args.jobs:
        sets = real_gradients(job, args.late, max(args.senders))
        for when, per_sender in sets.items():
            for senders in args.senders:
                named = {name: [per_sender[p][name] for p in range(senders)] for name in per_sender[0]}
                out.append((f"{job}-{when}", senders, float("nan"), named))
    return out


def run_all(args: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    table = methods(args.quick)
    rows = []
    cases = scenarios(args)
    with tqdm(total=len(cases) * len(table), desc="bench_error", disable=args.quiet) as bar:
        for data, senders, rho, tensors in cases:
            for name, (family, run) in table.items():
                error, bits, entropy = measure(run, tensors, args.repeats)
                rows.append({"data": data, "senders": senders, "correlation": rho, "method": name, "family": family,
                             "bits_per_coordinate": bits, "entropy_bits_per_coordinate": entropy,
                             "normalised_error": error})
                bar.update()
    return rows


# ----------------------------------------------------------------------------- report
def at_zero_correlation(r: dict) -> bool:
    return math.isnan(r["correlation"]) or r["correlation"] == 0.0


def unbiased(r: dict) -> bool:
    """hvdquant's unbiased estimators (DQSG, ECDQ, NDQSG and QSGD); 1-bit SGD and top-k are biased (their
    error does not average out over senders or steps without error feedback)."""
    return r["family"].startswith(("DQSG", "NDQSG", "QSGD", "ECDQ"))




def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    datas = sorted({r["data"] for r in rows}, key=lambda d: (d.startswith(("cnn", "lm")), d))
    senders = sorted({r["senders"] for r in rows})
    fig, axes = plt.subplots(len(datas), len(senders), figsize=(4.2 * len(senders), 3.4 * len(datas)),
                             squeeze=False)
    families = sorted({r["family"] for r in rows})
    colors = dict(zip(families, plt.get_cmap("tab20").colors, strict=False))  # up to 20 families
    for i, data in enumerate(datas):
        for j, p in enumerate(senders):
            ax = axes[i][j]
            sel = [r for r in rows if r["data"] == data and r["senders"] == p and at_zero_correlation(r)]
            for fam in families:
                pts = sorted((r["bits_per_coordinate"], r["normalised_error"]) for r in sel if r["family"] == fam)
                if pts:
                    style = "--" if "reference" in fam else "-"
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[fam], label=fam,
                            lw=2.2 if fam in (ECDQ_FAMILY, "EDEN unbiased (reference)") else 1.2)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator([0.25, 0.5, 1, 2, 4, 8, 16, 32]))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{data}, P = {p}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(datas) - 1:
                ax.set_xlabel("bits per coordinate (measured)")
            if j == 0:
                ax.set_ylabel("normalised error of the mean")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def best_below(rows: list[dict], data: str, senders: int, pred: Callable[[dict], bool], budget: float) -> dict | None:
    """The lowest-error row among ``pred``'s methods that hand over at most ``budget`` bits per coordinate."""
    sel = [r for r in rows if r["data"] == data and r["senders"] == senders and pred(r)
           and r["bits_per_coordinate"] <= budget and at_zero_correlation(r)]
    return min(sel, key=lambda r: r["normalised_error"], default=None)


def achievable(rows: list[dict], budget: float) -> tuple[float, str] | None:
    """(the lowest error reachable with at most ``budget`` bits per coordinate, how): one configuration
    within the budget, or two on either side of it sharing the coordinates (time-sharing: a fraction
    θ of the coordinates at b₁ bits and error e₁, the rest at b₂, e₂, with θb₁ + (1−θ)b₂ = budget
    gives θe₁ + (1−θ)e₂: linear interpolation). The same rule for hvdquant and the references."""
    pts = [(r["bits_per_coordinate"], r["normalised_error"], r["method"]) for r in rows]
    best = min(((e, m) for b, e, m in pts if b <= budget), default=None)
    for b1, e1, m1 in pts:
        for b2, e2, m2 in pts:
            if b1 < budget < b2:
                theta = (b2 - budget) / (b2 - b1)
                e = theta * e1 + (1 - theta) * e2
                if best is None or e < best[0]:
                    best = (e, f"{m1}/{m2}")
    return best


def equal_bits_rows(rows: list[dict]) -> list[dict]:
    """Per data set and P: hvdquant's and EDEN's (DRIVE's at 1 bit) lowest error within each of
    :data:`EQUAL_BITS`, taken as the references' own measured bits there (:func:`achievable`), and
    their ratio."""
    out = []
    datas = sorted({r["data"] for r in rows}, key=lambda d: (d.startswith(("cnn", "lm")), d))
    for data in datas:
        for p in sorted({r["senders"] for r in rows}):
            sel = [r for r in rows if r["data"] == data and r["senders"] == p and at_zero_correlation(r)]
            ours = [r for r in sel if unbiased(r)]
            refs = [r for r in sel if "reference" in r["family"]]
            # the budget of column b: the reference's own measured bits at b (a scale per piece adds a hair)
            own = {round(r["bits_per_coordinate"]): r["bits_per_coordinate"] for r in refs}
            for bits in EQUAL_BITS:
                lo, hi = own.get(math.floor(bits), bits), own.get(math.ceil(bits), bits)
                budget = (lo + hi) / 2
                a, b = achievable(ours, budget), achievable(refs, budget)
                out.append({"data": data, "senders": p, "bits": bits, "budget": budget, "hvdquant": a[0] if a else None,
                            "hvdquant_how": a[1] if a else None, "reference": b[0] if b else None,
                            "ratio": a[0] / b[0] if a and b else None})
    return out


def cell(r: dict | None) -> tuple[str, str]:
    return (f"{r['method']} ({r['bits_per_coordinate']:.2f})", f"{r['normalised_error']:.3g}") if r else ("–", "–")


def ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['normalised_error'] / b['normalised_error']:.2f}" if a and b else "–"


def markdown(rows: list[dict], meta: dict) -> str:
    reference = lambda r: "reference" in r["family"]  # noqa: E731
    lines = [BEGIN, "## Error per bit", "",
             f"Command: `{meta['command']}` ({meta['date']}; {meta['machine']}). Normalised error of the mean "
             "over P senders, ‖mean ĝ − mean g‖²/‖mean g‖², against bits per coordinate measured as the payload "
             "bytes × 8 / coordinates (entropy-coded payloads included: their bytes, not their entropy). DRIVE "
             "and EDEN are reference implementations in launch/bench_error.py, written from the papers' "
             "definitions (each sender its own rotation, as in the papers). Synthetic senders are independent "
             "here (ρ = 0; the JSON holds ρ = 0.5 and 0.9); real gradients are P batches' gradients of the same "
             "model. hvdquant's unbiased estimators (DQSG in every form, ECDQ, NDQSG, QSGD) are compared with the "
             "unbiased references; 1-bit SGD and top-k are biased (figure and JSON).", "",
             "At equal measured bits: hvdquant's lowest error divided by the references' (EDEN; DRIVE at 1 bit) "
             "at each number of bits per coordinate, each side's error the lowest reachable within that budget "
             "with one configuration or two sharing the coordinates (linear interpolation between two measured "
             "points: the same rule for both; < 1: hvdquant's error is lower; the configurations behind each "
             "cell are in the JSON's `equal_bits`):", "",
             "| data | P | " + " | ".join(f"{b:g} bits" for b in EQUAL_BITS) + " |",
             "|---|---:|" + "---:|" * len(EQUAL_BITS)]
    eq = equal_bits_rows(rows)
    for key in dict.fromkeys((e["data"], e["senders"]) for e in eq):
        cells = [e for e in eq if (e["data"], e["senders"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(
            f"{e['ratio']:.2f}" if e["ratio"] is not None else "–" for e in cells) + " |")
    lines += ["", "Best configuration within a bit budget (lowest error among the methods sending at most that "
              "many bits per coordinate; ratio < 1: hvdquant's error is lower):", "",
              "| data | P | budget (bits) | hvdquant best | error | reference best | error | ratio |",
              "|---|---:|---:|---|---:|---|---:|---:|"]
    datas = sorted({r["data"] for r in rows}, key=lambda d: (d.startswith(("cnn", "lm")), d))
    for data in datas:
        for p in sorted({r["senders"] for r in rows}):
            for budget in (1.1, 1.6, 2.1, 3.1, 4.1):
                a = best_below(rows, data, p, unbiased, budget)
                b = best_below(rows, data, p, reference, budget)
                if a is None and b is None:
                    continue
                (fa, ea), (fb, eb) = cell(a), cell(b)
                lines.append(f"| {data} | {p} | {budget:g} | {fa} | {ea} | {fb} | {eb} | {ratio(a, b)} |")
    lines += ["", "![error against bits](bench_error.png)", "", END]
    return "\n".join(lines)


def write_report(rows: list[dict], meta: dict, results: Path) -> None:
    text = results.read_text() if results.is_file() else ""
    block = markdown(rows, meta)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    results.write_text(text)
    plot(rows, results.parent / "bench_error.png")


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.machine()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few methods (a smoke run)")
    p.add_argument("--senders", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--coordinates", type=int, default=1 << 17, help="length of the synthetic vectors")
    p.add_argument("--correlations", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    p.add_argument("--jobs", nargs="*", default=["cnn", "lm"], help="main jobs whose real gradients are measured")
    p.add_argument("--late", type=int, default=300, help="training steps before the late gradients")
    p.add_argument("--repeats", type=int, default=2, help="draws of the dithers and rotations per point")
    p.add_argument("--out", type=Path, default=Path("runs/bench_error"))
    p.add_argument("--report", type=Path, default=None, help="write the table into this markdown file "
                   "(between its bench_error markers) and bench_error.png beside it")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rows = run_all(args)
    args.out.mkdir(parents=True, exist_ok=True)
    import datetime
    import platform

    meta = {"command": "python launch/bench_error.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(),
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    (args.out / "bench_error.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                           "equal_bits": equal_bits_rows(rows)}, indent=1))
    print(f"{'data':<16}{'P':>3}{'rho':>5}  {'method':<28}{'bits':>7}{'error':>11}")
    for r in rows:
        print(f"{r['data']:<16}{r['senders']:>3}{r['correlation']:>5.1f}  {r['method']:<28}"
              f"{r['bits_per_coordinate']:>7.3f}{r['normalised_error']:>11.4g}")
    if args.report:
        write_report(rows, meta, args.report)


if __name__ == "__main__":
    main()
