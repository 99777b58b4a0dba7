"""Kernel throughput benchmark (a benchmark, not a test).

For each codec, the time of encode+pack and of unpack+decode on n float32 coordinates, against
(a) a copy of the same buffer in the same run (the memory-bandwidth roofline) and (b) a
straightforward torch-ops implementation of the same codec. Prints a table, writes JSON and a PNG.

    python launch/bench_kernels.py                         # CPU, 1e5 .. 1e8
    python launch/bench_kernels.py --device cuda --sizes 1e6 1e7 1e8 1e9 --no-torch-ref

Throughput is GB/s of float32 gradient processed: 4·n bytes / seconds (median of --repeats runs
after one warm-up). "vs copy" = throughput / copy throughput; "vs torch" = torch-ops time / ours.
CPU kernels run serially or on up to "threads" threads as kernels/threads.py decides per call.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from hvdquant.kernels import DitherKey, ops, threads

KEY = DitherKey(seed=2026, step=1, tensor_id=7, sender=0)
BUCKET = 512


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------- hvdquant pipelines
def rotate_into_reused(key: DitherKey) -> Callable[[torch.Tensor], torch.Tensor]:
    """g ↦ its shared rotation into a buffer reused from call to call, as the exchanges reuse theirs
    from step to step."""
    rotated: dict[int, torch.Tensor] = {}

    def rotate(g: torch.Tensor) -> torch.Tensor:
        if g.numel() not in rotated:
            rotated[g.numel()] = torch.empty_like(g)
        return ops.hadamard_rotate(g, BUCKET, key, out=rotated[g.numel()])

    return rotate


def dqsg_pipeline(levels: int, rotation: bool = False) -> tuple[Callable, Callable]:
    """The DQSG payload codec's passes: encode = one fused pass from g to scales, dithered indices as
    unsigned symbols k + s densely packed (base 3 for s = 1, else ⌈log2(2s+1)⌉ bits) and their
    histogram; decode = one fused pass from the packed symbols to Δ(k − u). With ``rotation``, the
    shared Hadamard rotation of g into a copy before, and its inverse in place after
    (``DQSG(rotation="hadamard")``)."""
    rotate = rotate_into_reused(KEY)

    def encode(g):
        if rotation:
            g = rotate(g)
        delta, packed, _ = ops.dqsg_encode_packed(g, BUCKET, levels, KEY)
        return packed, delta

    def decode(payload, n):
        packed, delta = payload
        out = ops.dqsg_decode_packed(packed, delta, BUCKET, levels, KEY, n)
        return ops.hadamard_rotate(out, BUCKET, KEY, inverse=True, out=out) if rotation else out

    return encode, decode


def stock_pipeline(levels: int, ranks: int = 4, rotation: bool = False) -> tuple[Callable, Callable]:
    """The stock (summable allreduce) path's passes for one rank of ``ranks``, as the exchange runs
    them on a group: encode = (rotation,) bucket maxima, steps Δ = max/s and one fused pass from g to
    summable float64 words (digits of base R = 2sP + 1, the layout of the exchange); decode = one
    fused pass from the (here: this rank's) words to Δ(Σk − Σu) over all P senders (the stratified
    dither's shared stream), (and the rotation back). The maxima's MAX allreduce and the words' SUM
    allreduce are the collectives', not timed."""
    from hvdquant.transports.summable import SumFieldLayout

    layout = SumFieldLayout.for_levels(levels, ranks)
    key = DitherKey(seed=KEY.seed, step=KEY.step, tensor_id=KEY.tensor_id, sender=0, ranks=ranks)
    rotate = rotate_into_reused(key)

    def encode(g):
        if rotation:
            g = rotate(g)
        delta = ops.bucket_step(ops.bucket_absmax(g, BUCKET), levels)
        words, _ = ops.dqsg_encode_fields(g, delta, BUCKET, levels, key, layout.radix, layout.per_word)
        return words, delta

    def decode(payload, n):
        words, delta = payload
        out = ops.dqsg_decode_fields(words, n, 1.0, layout.radix, layout.per_word, layout.offset * ranks, delta,
                                     BUCKET, key, senders=ranks)
        return ops.hadamard_rotate(out, BUCKET, key, inverse=True, out=out) if rotation else out

    return encode, decode


def ndqsg_pipeline(levels: int = 3, rho: int = 3) -> tuple[Callable, Callable]:
    def encode(g):
        delta = ops.bucket_absmax(g, BUCKET) / levels
        return ops.pack_cosets(ops.nested_encode(g, delta, BUCKET, levels, rho, KEY), rho), delta

    def decode(payload, n, side=None):
        packed, delta = payload
        side = torch.zeros(n, device=packed.device) if side is None else side
        return ops.nested_decode(ops.unpack_cosets(packed, rho, n), delta, BUCKET, rho, side, KEY)

    return encode, decode


def qsgd_pipeline(levels: int = 4) -> tuple[Callable, Callable]:
    nbits = (2 * levels).bit_length()

    def encode(g):
        norm = ops.bucket_l2(g, BUCKET)
        codes = ops.qsgd_encode(g, norm, BUCKET, levels, KEY)
        return ops.bitpack((codes + levels).view(torch.uint8), nbits), norm

    def decode(payload, n):
        packed, norm = payload
        return ops.scale_decode(ops.bitunpack(packed, nbits, n).view(torch.int8) - levels, norm, BUCKET, levels)

    return encode, decode


def onebit_pipeline(cols: int = 1000) -> tuple[Callable, Callable]:
    def encode(g):
        pos, neg = ops.onebit_column_means(g, cols)
        return ops.bitpack(ops.onebit_encode(g), 1), pos, neg

    def decode(payload, n):
        packed, pos, neg = payload
        return ops.onebit_decode(ops.bitunpack(packed, 1, n), cols, pos, neg)

    return encode, decode


# ----------------------------------------------------------------------------- torch-ops references
def torch_bitpack(sym: torch.Tensor, nbits: int) -> torch.Tensor:
    n = sym.numel()
    pad = (-n) % 8
    s = torch.nn.functional.pad(sym.to(torch.int64), (0, pad)).view(-1, 8)
    shifts = torch.arange(8, device=sym.device) * nbits
    words = (s << shifts).sum(1)  # 8 codes in nbits bytes
    byte_shifts = torch.arange(nbits, device=sym.device) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)[: (n * nbits + 7) // 8]


def torch_bitunpack(packed: torch.Tensor, nbits: int, n: int) -> torch.Tensor:
    pad = (-packed.numel()) % nbits
    b = torch.nn.functional.pad(packed.to(torch.int64), (0, pad)).view(-1, nbits)
    words = (b << (torch.arange(nbits, device=packed.device) * 8)).sum(1)
    sym = (words.unsqueeze(1) >> (torch.arange(8, device=packed.device) * nbits)) & ((1 << nbits) - 1)
    return sym.reshape(-1)[:n].to(torch.uint8)


def torch_scales(g: torch.Tensor, kind: str = "max") -> torch.Tensor:
    n = g.numel()
    gp = torch.nn.functional.pad(g, (0, (-n) % BUCKET)).view(-1, BUCKET)
    return gp.abs().amax(1) if kind == "max" else gp.norm(dim=1)


def torch_dqsg(levels: int) -> tuple[Callable, Callable]:
    nbits = (2 * levels).bit_length()

    def encode(g):
        delta = torch_scales(g) / levels
        d = delta.repeat_interleave(BUCKET)[: g.numel()]
        u = torch.rand(g.numel(), generator=torch.Generator(g.device).manual_seed(1), device=g.device) - 0.5
        k = torch.floor(g / d + u + 0.5).clamp(-levels, levels)
        return torch_bitpack((k + levels).to(torch.uint8), nbits), delta

    def decode(payload, n):
        packed, delta = payload
        d = delta.repeat_interleave(BUCKET)[:n]
        u = torch.rand(n, generator=torch.Generator(packed.device).manual_seed(1), device=packed.device) - 0.5
        return d * (torch_bitunpack(packed, nbits, n).to(torch.float32) - levels - u)

    return encode, decode


def torch_onebit(cols: int = 1000) -> tuple[Callable, Callable]:
    def encode(g):
        m = g.view(-1, cols)
        pos = m >= 0
        pm = (m * pos).sum(0) / pos.sum(0).clamp_min(1)
        nm = (m * ~pos).sum(0) / (~pos).sum(0).clamp_min(1)
        return torch_bitpack(pos.reshape(-1).to(torch.uint8), 1), pm, nm

    def decode(payload, n):
        packed, pm, nm = payload
        bits = torch_bitunpack(packed, 1, n).view(-1, cols).bool()
        return torch.where(bits, pm, nm).reshape(-1)

    return encode, decode


CODECS: dict[str, tuple[Callable, Callable | None]] = {
    "dqsg s=1 (base-3)": (lambda: dqsg_pipeline(1), lambda: torch_dqsg(1)),
    "dqsg s=3 (3 bit)": (lambda: dqsg_pipeline(3), lambda: torch_dqsg(3)),
    "dqsg s=3 + rotation": (lambda: dqsg_pipeline(3, rotation=True), None),
    "stock dqsg s=3, P=4 (fields)": (lambda: stock_pipeline(3), None),
    "stock dqsg s=3 + rotation, P=4": (lambda: stock_pipeline(3, rotation=True), None),
    "ndqsg (3)/(3,1)": (ndqsg_pipeline, None),
    "qsgd s=4 l2 (4 bit)": (qsgd_pipeline, None),
    "1-bit sgd": (onebit_pipeline, torch_onebit),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7, 1e8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch-ref", action="store_true", help="skip the torch-ops implementations")
    p.add_argument("--out", type=Path, default=Path("runs/bench_kernels"))
    args = p.parse_args()
    dev = args.device
    rows = []
    for size in args.sizes:
        n = int(size)
        n -= n % 1000  # 1-bit SGD views the gradient as (n/1000, 1000)
        g = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dev)
        repeats = args.repeats if n <= 10_000_000 else max(3, args.repeats // 2)
        copy_s = timed(lambda g=g: torch.empty_like(g).copy_(g), repeats, dev)
        for name, (ours, theirs) in CODECS.items():
            enc, dec = ours()
            payload = enc(g)
            row = {"codec": name, "n": n, "device": dev,
                   "copy_gbps": 4 * n / copy_s / 1e9,
                   "encode_pack_s": timed(lambda enc=enc, g=g: enc(g), repeats, dev),
                   "unpack_decode_s": timed(lambda dec=dec, p=payload, n=n: dec(p, n), repeats, dev)}
            if theirs is not None and not args.no_torch_ref:
                tenc, tdec = theirs()
                tpay = tenc(g)
                row["torch_encode_pack_s"] = timed(lambda tenc=tenc, g=g: tenc(g), repeats, dev)
                row["torch_unpack_decode_s"] = timed(lambda tdec=tdec, p=tpay, n=n: tdec(p, n), repeats, dev)
            for k in ("encode_pack", "unpack_decode"):
                row[f"{k}_gbps"] = 4 * n / row[f"{k}_s"] / 1e9
                row[f"{k}_vs_copy"] = row[f"{k}_gbps"] / row["copy_gbps"]
                if f"torch_{k}_s" in row:
                    row[f"{k}_vs_torch"] = row[f"torch_{k}_s"] / row[f"{k}_s"]
            rows.append(row)
            print(format_row(row), flush=True)
        del g
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": threads.budget(), "device": dev,  # the kernels' thread budget (kernels/threads.py)
            "gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "bucket": BUCKET}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_kernels_{dev}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print()
    print(markdown(rows, meta))
    plot(rows, args.out / f"bench_kernels_{dev}.png", meta)


HEADER = ("| codec | n | copy GB/s | encode+pack GB/s | × copy | × torch | unpack+decode GB/s | × copy | × torch |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: dict) -> str:
    def f(key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(r[key]) if key in r else "–"

    return (f"| {r['codec']} | {r['n']:.0e} | {f('copy_gbps')} | {f('encode_pack_gbps')} | {f('encode_pack_vs_copy')} "
            f"| {f('encode_pack_vs_torch', '{:.1f}')} | {f('unpack_decode_gbps')} | {f('unpack_decode_vs_copy')} "
            f"| {f('unpack_decode_vs_torch', '{:.1f}')} |")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Kernel throughput, {meta['device']}"
             + (f" ({meta['gpu']})" if meta["gpu"] else f", {meta['cpus']} threads") + f", {meta['date']}, "
             f"bucket {meta['bucket']}; GB/s of float32 gradient; median of repeats.", "", HEADER]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in ((axes[0], "encode_pack_gbps", "encode + pack"),
                           (axes[1], "unpack_decode_gbps", "unpack + decode")):
        for codec in dict.fromkeys(r["codec"] for r in rows):
            pts = [(r["n"], r[key]) for r in rows if r["codec"] == codec]
            ax.plot(*zip(*pts), marker="o", label=codec)
        copies = sorted({(r["n"], r["copy_gbps"]) for r in rows})
        ax.plot(*zip(*copies), "k--", label="copy (roofline)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("coordinates")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s of float32 gradient")
    axes[1].legend(fontsize=8)
    where = meta["gpu"] or f"{meta['cpus']} threads"
    fig.suptitle(f"hvdquant kernels on {meta['device']} ({where}), {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
