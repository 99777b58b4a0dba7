"""docs/BENCHMARKS.md's network section and docs/bench_network_speedup.png, from the JSON that
launch/bench_network.sh writes (runs/bench_network/bench_network.json and tta/*.json).

    .venv/bin/python launch/bench_network_report.py

The section lies between the markers below in docs/BENCHMARKS.md and is replaced as a whole.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BEGIN, END = "<!-- network: begin (launch/bench_network_report.py) -->", "<!-- network: end -->"
LINK_BPS = {"100mbit": 1e8, "1gbit": 1e9, "10gbit": 1e10, "unshaped": None}  # unshaped: the compute floor
BASE, FP16, POWERSGD = "horovod fp32", "horovod fp16", "ddp powersgd rank 4 (gloo)"


def best(rows: dict[str, dict], prefix: str) -> tuple[str, dict] | None:
    """The fastest method whose label starts with prefix (the best transport of a scheme)."""
    hits = [(m, r) for m, r in rows.items() if m.startswith(prefix)]
    return min(hits, key=lambda mr: mr[1]["seconds"]) if hits else None


def section(data: dict, tta: list[dict], docs: Path) -> list[str]:
    rows = data["rows"]
    by: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[r["link"], r["n"]][r["method"]] = r
    links = [link for link in LINK_BPS if any(k[0] == link for k in by)]
    sizes = sorted({k[1] for k in by})
    dates = sorted({r["date"][:10] for r in rows})
    out = [BEGIN, "## Gradient exchange on an emulated slow network", "",
           f"Command: `bash launch/bench_network.sh` ({', '.join(dates)}; {platform.machine()} Linux, 2 cores, "
           "4 ranks oversubscribed). The ranks share one network namespace whose loopback is shaped with "
           "`tc tbf` to the link rate: **the rate is shared by all ranks' traffic** (a shared medium, not a "
           "switch with one link per rank), so absolute times are long for fp32 and ratios are what carries "
           "over. Open MPI is confined to TCP on that loopback (`--mca btl self,tcp`), torch.distributed "
           "(gloo) can only use it. Time: one exchange of an n-coordinate float32 gradient **including "
           "encode and decode**, median of 5 after a warm-up, slowest rank; DDP rows: backward with "
           "communication minus the same backward under `no_sync()`. Bytes: what each rank handed to its "
           "collectives (measured). Gradients are one shared vector plus 10⁻³ noise per rank and call, the "
           "best case for the nested schemes' side information. Speed-up: Horovod fp32 time / method time.", ""]
    for link in links:
        for n in sizes:
            cell = by.get((link, n))
            if not cell or BASE not in cell:
                continue
            base = cell[BASE]["seconds"]
            out += [f"### {link}, n = {n:.2g}", "", "| method | ms | MB per rank | bits/coord | speed-up vs "
                    "Horovod fp32 | failed nested buckets |", "|---|---:|---:|---:|---:|---:|"]
            for m, r in sorted(cell.items(), key=lambda mr: mr[1]["seconds"]):
                fb = r.get("failed_buckets")
                out.append(f"| {m} | {1e3 * r['seconds']:.1f} | {r['bytes_per_rank'] / 1e6:.2f} | "
                           f"{r['bits_per_coordinate']:.2f} | {base / r['seconds']:.2f}× | "
                           f"{'' if fb is None else fb} |")
            out.append("")
    out += targets(by)
    out += crossovers(by, links, sizes)
    out += time_to_accuracy(tta)
    plot(by, links, sizes, docs / "bench_network_speedup.png")
    out += ["![speed-up against bandwidth](bench_network_speedup.png)", "", END]
    return out


def targets(by: dict) -> list[str]:
    """Targets: at 1 Gbit/s and 2.5e7, DQSG s=1 (best transport) ≥ 6× Horovod fp32, ≥ 2.5× fp16, ≥ PowerSGD."""
    cell = by.get(("1gbit", 25_000_000))
    if not cell or BASE not in cell:
        return ["Targets: not measured (needs the 1gbit, n = 2.5e7 run).", ""]
    dq = best(cell, "dqsg s=1")
    if dq is None:
        return ["Targets: DQSG s=1 not measured at 1gbit, n = 2.5e7.", ""]
    m, r = dq
    t = r["seconds"]
    vs32 = cell[BASE]["seconds"] / t
    out = ["### Targets at 1 Gbit/s, n = 2.5e7", "", f"DQSG s=1 on its best transport here: **{m}**, "
           f"{1e3 * t:.0f} ms.", "", "| target | measured | met |", "|---|---:|:---:|",
           f"| ≥ 6× Horovod fp32 | {vs32:.2f}× | {'yes' if vs32 >= 6 else 'no'} |"]
    if FP16 in cell:
        ratio = cell[FP16]["seconds"] / t
        out.append(f"| ≥ 2.5× Horovod fp16 | {ratio:.2f}× | {'yes' if ratio >= 2.5 else 'no'} |")
    if POWERSGD in cell:
        ratio = cell[POWERSGD]["seconds"] / t
        out.append(f"| at least as fast as PowerSGD rank 4 | {ratio:.2f}× | {'yes' if ratio >= 1 else 'no'} |")
    return out + [""]


def crossovers(by: dict, links: list[str], sizes: list[int]) -> list[str]:
    """Where each hvdquant scheme (best transport) is slower than Horovod fp32 or fp16."""
    out = ["### Where hvdquant does not win", "", "Best transport of each scheme against Horovod fp32 and fp16 "
           "(speed-up < 1 means hvdquant is slower):", "", "| scheme | " +
           " | ".join(f"{link} n={n:.2g}" for link in links for n in sizes) + " |",
           "|---|" + "---:|" * (len(links) * len(sizes))]
    schemes = ["dqsg s=1", "dqsg s=3", "qsgd", "1-bit", "top-1%", "ndqsg (3)", "ndqsg-sum", "ring coset",
               "ddp powersgd", "ddp fp16", "ddp hvdquant dqsg s=1"]
    for s in schemes:
        cells = []
        for link in links:
            for n in sizes:
                cell = by.get((link, n), {})
                b = best(cell, s)
                if b is None or BASE not in cell:
                    cells.append("–")
                    continue
                vs32 = cell[BASE]["seconds"] / b[1]["seconds"]
                vs16 = cell[FP16]["seconds"] / b[1]["seconds"] if FP16 in cell else float("nan")
                cells.append(f"{vs32:.2f}× / {vs16:.2f}×")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return out + ["", "Cells: speed-up over Horovod fp32 / over Horovod fp16.", ""]


def time_to_accuracy(tta: list[dict]) -> list[str]:
    if not tta:
        return []
    out = ["### The main job at 100 Mbit/s (time to accuracy)", "",
           "`horovodrun --gloo -np 4` (rows `ddp …`: `torchrun`, PyTorch DDP on Gloo, torch's hooks or the "
           "hvdquant hook) inside the shaped namespace, the main job's CNN (18k parameters), "
           "2 epochs; test accuracy and wall time at the end of each epoch.", "",
           "| method | epoch 1: s, accuracy | epoch 2: s, accuracy | bits/coord |", "|---|---:|---:|---:|"]
    for r in tta:
        h = r["history"]
        ddp = r.get("framework") == "ddp"
        label = ("ddp " if ddp else "") + r["compression"] + (
            "" if r["reducer"] == ("allreduce" if ddp else "stock") else f" ({r['reducer']})")
        out.append(f"| {label} | " + " | ".join(f"{e['seconds']:.1f} s, {e['test_accuracy']:.4f}" for e in h)
                   + f" | {r['bits_per_coordinate']:.2f} |")
    return out + [""]


def plot(by: dict, links: list[str], sizes: list[int], path: Path) -> None:
    """Speed-up over Horovod fp32 against the link rate, one panel per gradient size."""
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 5), squeeze=False, sharey=True)
    methods = sorted({m for k, cell in by.items() for m in cell} - {BASE})
    for ax, n in zip(axes[0], sizes, strict=True):
        for i, m in enumerate(methods):
            xs, ys = [], []
            for link in links:
                cell = by.get((link, n), {})
                if m in cell and BASE in cell and LINK_BPS[link]:
                    xs.append(LINK_BPS[link] / 1e9)
                    ys.append(cell[BASE]["seconds"] / cell[m]["seconds"])
            if xs:
                ax.plot(xs, ys, marker="o", label=m, linewidth=1, color=plt.cm.tab20(i % 20),
                        linestyle="-" if i < 20 else "--")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (Gbit/s, shared by 4 ranks)")
        ax.set_title(f"one gradient exchange, n = {n:.2g}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("speed-up over Horovod fp32")
    axes[0][-1].legend(fontsize=6, ncol=1, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    runs, docs = Path("runs/bench_network"), Path("docs")
    data = json.loads((runs / "bench_network.json").read_text())
    tta = [json.loads(p.read_text()) for p in sorted((runs / "tta").glob("*.json"))]
    text = (docs / "BENCHMARKS.md").read_text()
    new = "\n".join(section(data, tta, docs))
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + new + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    (docs / "BENCHMARKS.md").write_text(text)
    print("wrote docs/BENCHMARKS.md (network section) and docs/bench_network_speedup.png")


if __name__ == "__main__":
    main()
