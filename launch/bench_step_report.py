"""Tables, docs/BENCHMARKS.md's training-step block and docs/bench_step.png, from the JSON that
launch/bench_step.sh writes (runs/bench_step/step_*.json and profile_*.json).

    .venv/bin/python launch/bench_step_report.py            # print the tables, rewrite the block and the plot
    .venv/bin/python launch/bench_step_report.py --print    # print only

The block lies between the markers below in docs/BENCHMARKS.md and is replaced as a whole (appended
at the end of the file the first time).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

BEGIN, END = "<!-- bench_step: begin (launch/bench_step_report.py) -->", "<!-- bench_step: end -->"
ORDER = ["horovod fp32", "horovod fp16", "hvdquant stock dqsg s=1", "hvdquant dqsg s=1 allgather",
         "hvdquant dqsg s=1 scatter_reduce", "ddp fp32 (gloo)", "ddp powersgd r=4 (gloo)",
         "ddp hvdquant hook dqsg s=1 (gloo)"]
FP32, FP16, STOCK = ORDER[0], ORDER[1], ORDER[2]
PAYLOAD = ORDER[3:5]
MODELS = ["mlp4x256", "mlp20x512", "resnet18"]
COLORS = ["#7f7f7f", "#bcbd22", "#d62728", "#ff9896", "#9467bd", "#1f77b4", "#17becf", "#2ca02c"]


def link_key(link: str) -> tuple[int, float]:
    """unlimited first, then by rate, fastest first."""
    m = re.fullmatch(r"([\d.]+)(mbit|gbit)", link)
    if not m:
        return (0 if link == "unlimited" else 2, 0.0)
    return (1, -float(m[1]) * (1e3 if m[2] == "gbit" else 1.0))


def load(src: Path) -> tuple[list[dict], list[dict]]:
    rows, profiles = [], []
    for f in sorted(src.glob("step_*.json")):
        rows += json.loads(f.read_text())["rows"]
    for f in sorted(src.glob("profile_*.json")):
        profiles.append(json.loads(f.read_text()))
    return rows, profiles


def index(rows: list[dict]) -> dict[tuple[str, int, str], dict[str, dict]]:
    by: dict[tuple[str, int, str], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[r["link"], r["ranks"], r["model"]][r["method"]] = r
    return by


def ms(r: dict | None) -> float | None:
    return None if r is None or "seconds_per_step" not in r else 1e3 * r["seconds_per_step"]


def better_payload(cell: dict[str, dict]) -> str | None:
    got = [(ms(cell.get(m)), m) for m in PAYLOAD if ms(cell.get(m)) is not None]
    return min(got)[1] if got else None


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}"


def short(function: str) -> str:
    """A profiled function's name without the checkout's or site-packages' path."""
    function = re.sub(r"^.*/site-packages/", "", function)
    return function.replace(str(Path.cwd().resolve()) + "/", "")


def tables(by: dict) -> list[str]:
    """One table per (link, P): every model and method, with time ratios to Horovod fp16 and fp32."""
    out: list[str] = []
    keys = sorted({(k[0], k[1]) for k in by}, key=lambda lp: (link_key(lp[0]), lp[1]))
    for link, ranks in keys:
        out += [f"### {link}, P = {ranks}", "",
                "| model | method | ms/step | bits/coord | ÷ fp16 | ÷ fp32 |", "|---|---|---:|---:|---:|---:|"]
        for model in [m for m in MODELS if (link, ranks, m) in by] + sorted(
                {k[2] for k in by if k[:2] == (link, ranks) and k[2] not in MODELS}):
            cell = by[link, ranks, model]
            f16, f32 = ms(cell.get(FP16)), ms(cell.get(FP32))
            best = better_payload(cell)
            any_row = next(iter(cell.values()))
            name = f"{model} ({any_row['parameters'] / 1e6:.2f}M, {any_row['tensors']} tensors)"
            for m in ORDER + sorted(set(cell) - set(ORDER)):
                r = cell.get(m)
                if r is None:
                    continue
                label = f"{m} **(better)**" if m == best and all(p in cell for p in PAYLOAD) else m
                if "error" in r:
                    out.append(f"| {name} | {label} | failed: {r['error'][:80]} | | | |")
                else:
                    src = {"nominal": " (nominal)", "counted": " (counted)"}.get(r.get("bits_source"), "")
                    bits = r.get("bits_per_coordinate")
                    out.append(f"| {name} | {label} | {ms(r):.1f} | "
                               f"{'–' if bits is None else f'{bits:.2f}'}{src} | {fmt_ratio(ms(r), f16)} | "
                               f"{fmt_ratio(ms(r), f32)} |")
                name = ""
        out.append("")
    return out


def targets(by: dict) -> list[str]:
    """Unlimited loopback: hvdquant's step ≤ 2× Horovod fp16's (every model); 1 Gbit/s: hvdquant faster
    than fp16 on the ResNet-18-shaped model. Checked for the stock path and the better payload reducer."""
    out = ["### Targets", "",
           "hvdquant's step time ÷ Horovod fp16's, for the stock path and the better payload reducer; "
           "targets: ≤ 2 on the unlimited loopback for every model, < 1 at 1 Gbit/s for resnet18.", "",
           "| link | P | model | target | stock ÷ fp16 | payload (better reducer) ÷ fp16 | met |",
           "|---|---:|---|---|---:|---:|:---:|"]
    n = 0
    for (link, ranks, model), cell in sorted(by.items(), key=lambda kv: (link_key(kv[0][0]), kv[0][1],
                                                                         MODELS.index(kv[0][2])
                                                                         if kv[0][2] in MODELS else 99)):
        if link == "unlimited":
            limit, text = 2.0, "≤ 2×"
        elif link == "1gbit" and model == "resnet18":
            limit, text = 1.0, "< 1×"
        else:
            continue
        f16 = ms(cell.get(FP16))
        if f16 is None:
            continue
        stock = ms(cell.get(STOCK))
        best = better_payload(cell)
        pay = ms(cell.get(best)) if best else None
        ratios = [x / f16 for x in (stock, pay) if x is not None]
        if not ratios:
            continue
        met = [(r <= limit if limit == 2.0 else r < limit) for r in ratios]
        verdict = "both" if all(met) else ("one path" if any(met) else "no")
        pay_txt = "–" if pay is None else f"{pay / f16:.2f} ({best.rsplit(' ', 1)[1]})"
        out.append(f"| {link} | {ranks} | {model} | {text} | {fmt_ratio(stock, f16)} | {pay_txt} | {verdict} |")
        n += 1
    return out + [""] if n else ["### Targets", "", "Not measured yet (needs Horovod fp16 and hvdquant rows).", ""]


def profile_section(profiles: list[dict], by: dict) -> list[str]:
    out: list[str] = []
    for p in profiles:
        cell = by.get((p["link"], p["ranks"], p["model"]), {})
        f16, stock = ms(cell.get(FP16)), ms(cell.get(STOCK))
        cats = sorted(p["categories_seconds_per_step"].items(), key=lambda kv: -kv[1])
        total = p["profiled_seconds_per_step"]
        out += [f"### What is left: cProfile of the stock path, {p['model']}, P = {p['ranks']}, {p['link']}", "",
                f"Rank 0, {p['steps']} steps after the timed ones (`runs/bench_step/profile_{p['model']}_P"
                f"{p['ranks']}_{p['link']}_stock.txt`, with the pstats dump beside it): "
                f"{1e3 * p['median_wall_seconds']:.1f} ms per profiled step (median wall, profiler overhead "
                f"included)"
                + (f"; unprofiled, the stock step takes {stock:.1f} ms against Horovod fp16's {f16:.1f} ms "
                   f"({stock / f16:.2f}×)" if stock and f16 else "") + ".", "",
                "Own time by where it lives (cProfile's tottime; Numba kernels count in the hvdquant function "
                "that calls them; the waits in Horovod's C++ calls are the time rank 0 spent blocked on "
                "collectives):", "",
                "| where | ms/step | share |", "|---|---:|---:|"]
        out += [f"| {k} | {1e3 * v:.1f} | {100 * v / total:.0f}% |" for k, v in cats]
        out += ["", "Top 15 by cumulative time:", "", "| function | calls | cumulative ms/step | own ms/step |",
                "|---|---:|---:|---:|"]
        out += [f"| `{short(t['function'])}` | {t['ncalls']} | {t['cumtime_ms_per_step']:.1f} | "
                f"{t['tottime_ms_per_step']:.1f} |" for t in p["top_cumulative"]]
        if p.get("top_hvdquant_own"):
            out += ["", "hvdquant's own functions by own time (Numba kernels included in their callers):", "",
                    "| function | calls | own ms/step | cumulative ms/step |", "|---|---:|---:|---:|"]
            out += [f"| `{short(t['function'])}` | {t['ncalls']} | {t['tottime_ms_per_step']:.1f} | "
                    f"{t['cumtime_ms_per_step']:.1f} |" for t in p["top_hvdquant_own"]]
        out.append("")
    return out


def header(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "seconds_per_step" in r]
    info = next((r for r in rows if "cpu" in r), {})
    dates = sorted({r["date"][:10] for r in rows})
    links_of: dict[str, set[str]] = defaultdict(set)  # command -> the links whose rows it made
    for r in rows:
        links_of[r.get("command") or "?"].add(r["link"])
    commands = sorted(links_of, key=lambda c: (-len(links_of[c]), c))
    codes: dict[str, set[str]] = defaultdict(set)  # hash of hvdquant/ + kernels/ -> commits it was seen at
    for r in rows:
        if "code_hash" in r:
            codes[r["code_hash"]].add((r.get("git_head") or "?") + (" + uncommitted edits" if r.get("code_dirty")
                                                                     else ""))
    thr = sorted({(r["ranks"], r.get("torch_threads"), r.get("numba_threads")) for r in ok})
    models = {}
    for r in rows:
        models[r["model"]] = (r["model_description"], r["parameters"], r["tensors"], r["batch_per_rank"])
    steps = sorted({(r["warmup"], r["steps"]) for r in rows})
    cycle = sorted({str(r.get("HOROVOD_CYCLE_TIME")) for r in rows})
    lines = [
        "## Training step: forward, backward, exchange, optimizer step", "",
        f"Command{'s' if len(commands) > 1 else ''}: "
        + "; ".join(f"`{c}`" + (f" ({', '.join(sorted(links_of[c], key=link_key))} rows)" if len(commands) > 1
                                else "") for c in commands)
        + f" ({', '.join(dates)}). Code measured: "
        + ("; ".join(f"hvdquant/ and kernels/ hash {c} (at {', '.join(sorted(heads))})"
                     for c, heads in sorted(codes.items())) if codes else "not recorded")
        + (" — **the rows come from different versions of hvdquant**, which was being changed during the "
           "sweep; rerun the command for one snapshot" if len(codes) > 1 else "")
        + f". Machine: {info.get('cpu', '?')}, {info.get('cores', '?')} cores, "
        f"{info.get('machine', '')} Linux, Python {info.get('python', '?')}, torch {info.get('torch', '?')}, "
        f"Horovod {info.get('horovod', '?')} (MPI controller); shared with other engineers' test runs, so "
        "times are noisy. Report: `.venv/bin/python launch/bench_step_report.py`.", "",
        "Time per step: zero_grad, forward, cross-entropy, backward (with the exchange the hooks start) and "
        "the optimizer step (which waits for it), each step started after an MPI barrier; per rank the "
        "median of "
        + ", ".join(f"{s} timed steps after {w} warm-up steps" for w, s in steps)
        + "; **the slowest rank's median**. All ranks run in one network namespace on one 2-core machine "
        "(P = 4 is oversubscribed): *unlimited* is its unshaped loopback, the others are `tc tbf` on it, "
        "a rate **shared by all ranks' traffic** (as in the network benchmark below). Open MPI uses TCP "
        "on that loopback only; DDP's gloo can only use it. No thread variables are set "
        "(`OMP_NUM_THREADS`, `NUMBA_NUM_THREADS` unset, no `torch.set_num_threads`); threads seen: "
        + ", ".join(f"P = {p}: torch {t}, Numba {n}" for p, t, n in thr)
        + " (Open MPI binds each rank to a core when P ≤ cores, and binds nothing when oversubscribed). "
        f"`HOROVOD_CYCLE_TIME`: {', '.join('default' if c == 'None' else c for c in cycle)}.", "",
        "Models (synthetic inputs, one fixed batch per rank, SGD lr 0.01 momentum 0.9, the same initial "
        "weights for every method): "
        + "; ".join(f"**{m}** {d}, {p / 1e6:.2f}M parameters in {t} tensors, batch {b} per rank"
                    for m, (d, p, t, b) in sorted(models.items(), key=lambda kv: MODELS.index(kv[0])
                                                  if kv[0] in MODELS else 99)) + ".", "",
        "Methods: `hvd.DistributedOptimizer` with `hvd.Compression.none` (horovod fp32) and `.fp16`; "
        "with `hvdquant.Compression.dqsg(levels=1, bucket_size=512)` (hvdquant stock); "
        "`hvdquant.DistributedOptimizer(codec=hvdquant.DQSG(levels=1, bucket_size=512), reducer=...)` over "
        "allgather and scatter_reduce (the faster of the two marked **(better)**); `DistributedDataParallel` "
        "over gloo, plain (default buckets) and with the PowerSGD comm hook (rank 4, error feedback, warm "
        "start, from the third step; one DDP bucket, since with several the hook deadlocked on gloo here), "
        "launched in the same mpirun job. Bits per coordinate: hvdquant's own measurement of "
        "the bytes it handed to Horovod (mean over ranks), PowerSGD's counted from the tensors its hook "
        "hands to `dist.all_reduce`, nominal for fp32/fp16. ÷ fp16, ÷ fp32: the method's step time over "
        "Horovod fp16's / fp32's in the same job.", ""]
    return lines


def plot(by: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ranks = sorted({k[1] for k in by})
    models = [m for m in MODELS if any(k[2] == m for k in by)]
    if not ranks or not models:
        return
    links = sorted({k[0] for k in by}, key=link_key)
    methods = [m for m in ORDER if any(m in c for c in by.values())]
    fig, axes = plt.subplots(len(ranks), len(models), figsize=(5.2 * len(models), 3.8 * len(ranks)),
                             squeeze=False)
    width = 0.8 / max(1, len(methods))
    for i, p in enumerate(ranks):
        for j, model in enumerate(models):
            ax = axes[i][j]
            for k, m in enumerate(methods):
                xs, ys = [], []
                for x, link in enumerate(links):
                    v = ms(by.get((link, p, model), {}).get(m))
                    if v is not None:
                        xs.append(x - 0.4 + width * (k + 0.5))
                        ys.append(v)
                ax.bar(xs, ys, width, color=COLORS[ORDER.index(m)], label=m)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
            ax.set_xticks(range(len(links)), links)
            ax.set_title(f"{model}, P = {p}")
            ax.grid(axis="y", which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("ms per training step (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(labels), 4 if len(models) > 1 else 2)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=9 if len(models) > 1 else 7)
    bottom = min(0.4, 0.22 * -(-len(labels) // ncol) / fig.get_figheight())  # about 0.22 inch per legend row
    fig.suptitle("Time per training step (slowest rank's median), by link")
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=Path("runs/bench_step"))
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    ap.add_argument("--print", action="store_true", help="print the tables only; leave docs/ alone")
    args = ap.parse_args()
    rows, profiles = load(args.src)
    if not rows:
        raise SystemExit(f"no rows in {args.src}/step_*.json: run launch/bench_step.sh first")
    by = index(rows)
    body = tables(by) + targets(by)
    print("\n".join(body))
    if args.print:
        return
    block = [BEGIN, *header(rows), *body, *profile_section(profiles, by),
             "![time per training step](bench_step.png)", "", END]
    plot(by, args.docs / "bench_step.png")
    doc = args.docs / "BENCHMARKS.md"
    text = doc.read_text()
    new = "\n".join(block)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + new + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    doc.write_text(text)
    print(f"wrote {doc} (block between the bench_step markers) and {args.docs / 'bench_step.png'}")


if __name__ == "__main__":
    main()
