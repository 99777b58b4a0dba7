"""Time to quality on the language-model job: the methods launch/bench_quality.sh runs, and the report
(one table, one figure, a block in docs/RESULTS.md) from the summaries the runs write.

    python launch/bench_quality.py methods [--only a,b]     # the method names, one per line
    python launch/bench_quality.py flags NAME               # the training job's flags of a method
    python launch/bench_quality.py report [--runs runs/bench_quality] [--fraction 0.98] [--print]

Every method trains the same model from the same initial weights on the same data order (per seed) with
``python -m hvdquant.examples.train --job lm``; only the gradient exchange differs. The quality target
of a link is a fraction of the drop of Horovod fp32's validation loss (mean over seeds) from a uniform
byte (ln 256): ``target = ln 256 - fraction * (ln 256 - L_fp32)``; a run's time to the target is
interpolated linearly between the evaluations around its first crossing (wall-clock from the first
step, evaluations included; every method evaluates the same windows at the same steps).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

BEGIN, END = "<!-- bench_quality: begin (launch/bench_quality.py report) -->", "<!-- bench_quality: end -->"
UNIFORM = math.log(256)

#: name -> the training job's flags; the order of the table and the figure
METHODS: dict[str, str] = {
    "hvd-fp32": "--framework horovod --compression none",
    "hvd-fp16": "--framework horovod --compression fp16",
    "ddp-fp32": "--framework ddp --compression none",
    "ddp-fp16": "--framework ddp --compression fp16",
    "ddp-powersgd-r1": "--framework ddp --compression powersgd --powersgd-rank 1",
    "ddp-powersgd-r2": "--framework ddp --compression powersgd --powersgd-rank 2",
    "ddp-powersgd-r4": "--framework ddp --compression powersgd --powersgd-rank 4",
    "dqsg-s1": "--framework horovod --compression dqsg --levels 1",
    "dqsg-s3": "--framework horovod --compression dqsg --levels 3",
    "dqsg-s1-hadamard": "--framework horovod --compression dqsg --levels 1 --rotation hadamard",
    "dqsg-s3-hadamard": "--framework horovod --compression dqsg --levels 3 --rotation hadamard",
    "dqsg-s7-hadamard": "--framework horovod --compression dqsg --levels 7 --rotation hadamard",
    "dqsg-s3-hadamard-rans": "--framework horovod --compression dqsg --levels 3 --rotation hadamard --coding rans "
                             "--reducer allgather",
    "ecdq-1.1": "--framework horovod --compression ecdq --step 1.1 --reducer allgather",
    "dqsg-s1-allgather": "--framework horovod --compression dqsg --levels 1 --reducer allgather",
    "dqsg-s3-allgather": "--framework horovod --compression dqsg --levels 3 --reducer allgather",
    "dqsg-s3-scatter": "--framework horovod --compression dqsg --levels 3 --reducer scatter_reduce",
    "dqsg-s1-ef-scatter": "--framework horovod --compression dqsg --levels 1 --error-feedback --reducer scatter_reduce",
    "ndqsg-adaptive": "--framework horovod --compression ndqsg --reducer allgather",
    "qsgd-s4-elias": "--framework horovod --compression qsgd --levels 4 --coding elias --reducer allgather",
    "onebit-ef": "--framework horovod --compression onebit --reducer allgather",
    "topk-ef-1pct": "--framework horovod --compression topk --ratio 0.01 --reducer allgather",
    "lgc": "--framework horovod --compression lgc --ratio 0.01 --warmup-steps 100 --train-steps 100",
    "qsgd-s1-crude": "--framework horovod --compression qsgd --levels 1 --coding elias --reducer allgather",
}
REFERENCE = "hvd-fp32"


def load(runs: Path) -> tuple[dict, dict]:
    """({(link, method): [summary per seed]}, meta) from ``runs/<link>/seed<s>/train-<method>.json``."""
    found: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in sorted(runs.glob("*/seed*/train-*.json")):
        name = path.stem[len("train-"):]
        if name in METHODS:
            found[(path.parts[-3], name)].append(json.loads(path.read_text()))
    meta_path = runs / "meta.json"
    return found, json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def time_to(history: list[dict], target: float) -> float | None:
    """Seconds until the validation loss first reaches ``target`` (linear between evaluations; the
    start is (0 s, ln 256)); None if it never does."""
    prev_t, prev_l = 0.0, UNIFORM
    for h in history:
        t, loss = h["seconds"], h["validation_loss"]
        if loss <= target:
            return prev_t + (t - prev_t) * (prev_l - target) / max(prev_l - loss, 1e-12)
        prev_t, prev_l = t, loss
    return None


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def reference_losses(found: dict, link: str) -> tuple[list[float], str | None]:
    """The reference's final validation losses on ``link``, or where it did not run there, on another
    link (the losses of a method do not depend on the link, only its times: every rank computes the
    same steps whatever the wire's speed), and the link they come from."""
    for source in [link, *sorted(other for other, name in found if name == REFERENCE and other != link)]:
        losses = [s["validation_loss"] for s in found.get((source, REFERENCE), [])]
        if losses:
            return losses, source
    return [], None


def rows_for(found: dict, link: str, fraction: float) -> tuple[float | None, list[dict]]:
    """(target, one row per method run on ``link``)."""
    ref, _ = reference_losses(found, link)
    target = UNIFORM - fraction * (UNIFORM - statistics.mean(ref)) if ref else None
    rows = []
    for name in METHODS:
        runs = found.get((link, name))
        if not runs:
            continue
        times = [time_to(s["history"], target) for s in runs] if target is not None else []
        reached = [t for t in times if t is not None]
        rows.append({
            "method": name, "seeds": len(runs),
            "bits_per_coordinate": statistics.mean(s["bits_per_coordinate"] for s in runs),
            "step_seconds": statistics.mean(s["step_seconds_median"] or math.nan for s in runs),
            "final_losses": [s["validation_loss"] for s in runs], "times_to_target": times,
            "time_to_target": statistics.mean(reached) if len(reached) == len(runs) else None,
            "reached": len(reached), "identical": all(s["replicas_bit_identical"] for s in runs)})
    return target, rows


def table(link: str, target: float | None, rows: list[dict], source: str | None = None) -> list[str]:
    fp16 = next((r["time_to_target"] for r in rows if r["method"] == "hvd-fp16"), None)
    borrowed = (f" (from {REFERENCE} on {source}: losses do not depend on the link)"
                if source not in (None, link) else "")
    lines = [f"#### Link: {link}" + (f"; target validation loss {target:.4f}{borrowed}" if target is not None else ""),
             "",
             "| method | bits / coordinate | step (s, median) | final validation loss | time to target (s) "
             "| ÷ Horovod fp16 |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["time_to_target"]
        shown = (f"{t:.0f}" if t is not None else f"not reached ({r['reached']}/{r['seeds']} seeds)")
        ratio = f"{t / fp16:.2f}" if t is not None and fp16 else "–"
        lines.append(f"| {r['method']} | {r['bits_per_coordinate']:.3f} | {r['step_seconds']:.3f} | "
                     f"{mean_sd(r['final_losses'])} | {shown} | {ratio} |")
    return lines + [""]


def plot(found: dict, links: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(links), 2, figsize=(12, 4.2 * len(links)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for i, link in enumerate(links):
        for k, name in enumerate(METHODS):
            runs = found.get((link, name))
            if not runs:
                continue
            points = len(min((s["history"] for s in runs), key=len))
            steps = [runs[0]["history"][j]["step"] for j in range(points)]
            loss = [statistics.mean(s["history"][j]["validation_loss"] for s in runs) for j in range(points)]
            secs = [statistics.mean(s["history"][j]["seconds"] for s in runs) for j in range(points)]
            style = {"color": cmap(k % 20), "label": name, "lw": 2.0 if name in ("hvd-fp32", "hvd-fp16") else 1.2,
                     "ls": "--" if name.startswith("ddp") else "-"}
            axes[i][0].plot(steps, loss, **style)
            axes[i][1].plot(secs, loss, **style)
        for ax, xlabel in zip(axes[i], ("step", "wall-clock (s)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss (nats/byte)")
            ax.set_title(f"{link}: validation loss against {xlabel.split(' ')[0]} (mean over seeds)")
            ax.grid(alpha=0.3)
    legend: dict[str, object] = {}  # every method of every link, once (links may run different methods)
    for row in axes:
        for handle, label in zip(*row[0].get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=6, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(args: argparse.Namespace) -> None:
    found, meta = load(args.runs)
    if not found:
        raise SystemExit(f"no summaries under {args.runs}/<link>/seed<s>/: run launch/bench_quality.sh first")
    links = sorted({link for link, _ in found}, key=lambda s: (s != "unlimited", s))
    body, data = [], {}
    for link in links:
        target, rows = rows_for(found, link, args.fraction)
        body += table(link, target, rows, reference_losses(found, link)[1])
        data[link] = {"target": target, "rows": rows}
    print("\n".join(body))
    (args.runs / "quality.json").write_text(json.dumps({"meta": meta, "fraction": args.fraction, "links": data},
                                                       indent=2))
    if args.print:
        return
    first = next(iter(found.values()))[0]
    header = [
        "## Time to quality: the language-model job", "",
        "Commands: " + "; ".join(f"`{c}`" for c in meta.get("commands", ["bash launch/bench_quality.sh"]))
        + f" ({', '.join(meta.get('dates', ['?']))}); machine: "
        f"{meta.get('machine', '?')}. P = {first['ranks']} ranks in one network namespace (its loopback unshaped, "
        "or `tc tbf`-shaped to the link's rate, shared by all ranks), every rank launched by mpirun. Job: "
        f"`--job lm`, {first['parameters']:,}-parameter byte-level GPT, {first['steps']} steps, per-rank batch "
        f"{first['config']['batch_size']} × {first['config']['context']} bytes, AdamW (peak lr "
        f"{first['config']['lr']}, warm-up then cosine), validation every {first['config']['eval_every']} steps. "
        f"Seeds: {', '.join(str(x) for x in sorted({s['config']['seed'] for r in found.values() for s in r}))}. "
        f"Target: {args.fraction:.0%} of Horovod fp32's drop in validation loss from ln 256. "
        "Final validation loss: mean ± standard deviation over the seeds. Time to target: mean over the "
        "seeds, shown only when every seed reached it. Bits per coordinate: measured bytes handed to the "
        "collectives (PowerSGD: counted at `dist.all_reduce`; Horovod/DDP fp32 and fp16: nominal, counted "
        "per bucket). Report: `.venv/bin/python launch/bench_quality.py report`.", ""]
    block = [BEGIN, *header, *body, "![validation loss against steps and wall-clock](bench_quality.png)", "", END]
    plot(found, links, args.docs / "bench_quality.png")
    doc = args.docs / "RESULTS.md"
    text = doc.read_text()
    new = "\n".join(block)
    text = (text[:text.index(BEGIN)] + new + text[text.index(END) + len(END):] if BEGIN in text and END in text
            else text.rstrip() + "\n\n" + new + "\n")
    doc.write_text(text)
    print(f"wrote {doc} (block between the bench_quality markers) and {args.docs / 'bench_quality.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("methods")
    m.add_argument("--only", default="", help="comma-separated method names (default: all)")
    f = sub.add_parser("flags")
    f.add_argument("name")
    r = sub.add_parser("report")
    r.add_argument("--runs", type=Path, default=Path("runs/bench_quality"))
    r.add_argument("--docs", type=Path, default=Path("docs"))
    r.add_argument("--fraction", type=float, default=0.98, help="share of fp32's loss drop that is the target")
    r.add_argument("--print", action="store_true", help="print the tables only; leave docs/ alone")
    args = p.parse_args()
    if args.cmd == "methods":
        names = [n.strip() for n in args.only.split(",") if n.strip()] or list(METHODS)
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        print("\n".join(names))
    elif args.cmd == "flags":
        if args.name not in METHODS:
            raise SystemExit(f"unknown method {args.name!r}; known: {', '.join(METHODS)}")
        print(METHODS[args.name])
    else:
        report(args)


if __name__ == "__main__":
    main()
