"""GPU end-to-end check, part 2 (launch/gpu_e2e.sh runs it after the training runs).

1. **Codes on the GPU equal the CPU's.** The main job's model on the GPU, one real minibatch
   gradient per parameter; every codec encodes each gradient on the GPU (the CUDA kernels) and
   the same gradient copied to the host (the CPU twins) with the same dither key: the payload
   bytes must be equal bit for bit, and so must the stock path's summable words. Decoded floats
   are compared too (max ulps reported; the CUDA compiler may contract a multiply-add).
2. **The codec's share of a step.** Per training run (its JSON summary), the GPU time of its own
   codec's arithmetic for one step of the whole model on these gradients — stock path: bucket
   maxima, quantize into the summable words, decode the reduced words; payload path: P encodes
   (one per simulated sender; a rank does one) and the aggregate of the P payloads —
   CUDA-synchronized, median of repeats, divided by the median step time the run recorded.

Prints a table, writes ``gpu_e2e.json`` to ``--out``; exits non-zero if any code differs.

``--dry-run`` (no GPU): runs the CUDA kernels in Numba's CUDA simulator on host tensors
(``NUMBA_ENABLE_CUDASIM=1``), on the first 2048 elements of each gradient, to check this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import hvdquant
from hvdquant.codecs.base import TensorContext
from hvdquant.data import load_fashion_mnist
from hvdquant.examples.models import SmallCNN
from hvdquant.examples.train_fashion_mnist import make_codec
from hvdquant.kernels import ops
from hvdquant.keys import dither_key
from hvdquant.transports.summable import SumFieldLayout

CODECS: dict[str, Callable[[], object]] = {
    "dqsg s=1": lambda: hvdquant.DQSG(levels=1, bucket_size=512),
    "dqsg s=3": lambda: hvdquant.DQSG(levels=3, bucket_size=512),
    "dqsg s=1 independent": lambda: hvdquant.DQSG(levels=1, bucket_size=512, dither="independent"),
    "ndqsg (3,1) nested": lambda: hvdquant.NDQSG(levels=(3, 1), bucket_size=512, adaptive=False),
    "qsgd s=4 elias": lambda: hvdquant.QSGD(levels=4, bucket_size=512),
    "qsgd s=4 fixed": lambda: hvdquant.QSGD(levels=4, bucket_size=512, coding="fixed"),
    "onebit": lambda: hvdquant.OneBitSGD(),
    "topk 1%": lambda: hvdquant.TopK(ratio=0.01),
}


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 units in the last place between a and b (0: bit-identical)."""
    ia, ib = a.contiguous().view(torch.int32).to(torch.int64), b.contiguous().view(torch.int32).to(torch.int64)
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)  # sign-magnitude -> monotone integers
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def gradients(device: torch.device, limit: int | None) -> dict[str, torch.Tensor]:
    """One real minibatch gradient per parameter of the main job's model (first ``limit`` elements)."""
    torch.manual_seed(0)
    x, y, _, _ = load_fashion_mnist()
    model = SmallCNN().to(device)
    loss = F.cross_entropy(model(x[:64].to(device)), y[:64].to(device))
    loss.backward()
    return {n: p.grad.detach().reshape(-1)[:limit].contiguous() for n, p in model.named_parameters() if p.dim() >= 2}


def compare_codes(grads: dict[str, torch.Tensor], ranks: int, twin: Callable) -> list[dict]:
    """Per codec: payload bytes GPU vs CPU (equal?), decoded max ulps; plus the stock path's words."""
    rows = []
    for label, make in CODECS.items():
        equal, worst, nbytes = True, 0, 0
        for name, g in grads.items():
            ctx = TensorContext(name, tuple(g.shape), dither_key(7, 3, name, ranks - 1), ranks)
            gpu_codec, cpu_codec = make(), make()
            with twin():
                enc = gpu_codec.encode(g, ctx)
                side = torch.zeros_like(g)
                dec = (gpu_codec.decode(enc, ctx, side) if "cosets" in enc.fields else gpu_codec.decode(enc, ctx))
            ref = cpu_codec.encode(g.cpu(), ctx)
            ref_dec = (cpu_codec.decode(ref, ctx, side.cpu()) if "cosets" in ref.fields else cpu_codec.decode(ref, ctx))
            equal &= torch.equal(enc.to_bytes().cpu(), ref.to_bytes())
            worst = max(worst, ulps(dec.cpu(), ref_dec))
            nbytes += enc.nbytes()
        rows.append({"codec": label, "codes_equal": bool(equal), "decoded_max_ulps": worst, "payload_bytes": nbytes})
    # the stock path: summable words of P senders, their sum decoded
    equal, worst = True, 0
    codec = hvdquant.DQSG(levels=1, bucket_size=512)
    layout = SumFieldLayout.for_levels(1, ranks)
    for name, g in grads.items():
        results = []
        for run in (twin, nullcontext):
            src = g if run is twin else g.cpu()
            with run():
                delta = codec.step_size(codec.bucket_absmax(src))
                words = sum(ops.dqsg_encode_fields(src, delta, 512, 1, codec.keyed(dither_key(7, 3, name, p), ranks),
                                                   layout.radix, layout.per_word)[0] for p in range(ranks))
                out = ops.dqsg_decode_fields(words, src.numel(), 1.0, layout.radix, layout.per_word,
                                             layout.offset * ranks, delta, 512,
                                             codec.keyed(dither_key(7, 3, name, 0), ranks), senders=ranks)
            results.append((words.cpu(), out.cpu()))
        equal &= torch.equal(results[0][0], results[1][0])
        worst = max(worst, ulps(results[0][1], results[1][1]))
    rows.append({"codec": "dqsg s=1 stock fields (sum of P)", "codes_equal": bool(equal), "decoded_max_ulps": worst,
                 "payload_bytes": None})
    return rows


def codec_seconds(grads: dict[str, torch.Tensor], codec, stock: bool, ranks: int, twin: Callable,
                  repeats: int) -> float:
    """Seconds of one step's codec arithmetic for the whole model on the gradients' device (median of
    ``repeats``, CUDA-synchronized): the stock path's bucket maxima, summable words and decode of the
    reduced words (DQSG), or the payload path's encode of this rank's payload and the aggregate of
    all P payloads."""
    sync = torch.cuda.synchronize if any(g.is_cuda for g in grads.values()) else (lambda: None)
    if stock:
        layout = SumFieldLayout.for_levels(codec.levels, ranks)

    def one_step() -> None:
        for name, g in grads.items():
            ctx = TensorContext(name, tuple(g.shape), dither_key(7, 3, name, 0), ranks)
            if stock:
                delta = codec.step_size(codec.bucket_absmax(g))
                key = codec.keyed(ctx.key, ranks)
                words, _ = ops.dqsg_encode_fields(g, delta, codec.bucket_size, codec.levels, key, layout.radix,
                                                  layout.per_word)
                ops.dqsg_decode_fields(words, g.numel(), 1.0, layout.radix, layout.per_word, layout.offset * ranks,
                                       delta, codec.bucket_size, key, senders=ranks)
            else:
                codec.aggregate([codec.encode(g, ctx.sender(p)) for p in range(ranks)], ctx)

    times = []
    with twin():
        for _ in range(repeats + 2):
            sync()
            tick = time.perf_counter()
            one_step()
            sync()
            times.append(time.perf_counter() - tick)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--runs", type=Path, default=Path("runs/gpu_e2e"), help="folder of the training runs' JSON")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_e2e"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="no GPU: CUDA simulator on host tensors, small slices")
    args = p.parse_args()
    if args.dry_run:
        device, limit, twin = torch.device("cpu"), 2048, (lambda: ops.force_target("cuda"))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_e2e_codes: no CUDA device (use --dry-run to check the script without one)")
        device, limit, twin = torch.device("cuda"), None, nullcontext
    grads = gradients(device, limit)
    rows = compare_codes(grads, args.ranks, twin)
    print(f"\n{'codec':34} {'GPU codes = CPU codes':>22} {'decoded max ulps':>17} {'payload bytes':>14}")
    for r in rows:
        print(f"{r['codec']:34} {str(r['codes_equal']):>22} {r['decoded_max_ulps']:>17} "
              f"{'' if r['payload_bytes'] is None else r['payload_bytes']:>14}")
    runs, timed = [], {}
    for f in sorted(args.runs.glob("train-*.json")):
        s = json.loads(f.read_text())
        stock = s["reducer"] in ("stock", "allreduce")
        config = s["config"]
        key = (json.dumps(config["compression"]), config["levels"], config.get("coarse_levels"), stock)
        if key not in timed:  # the run's own codec, from its recorded configuration
            timed[key] = codec_seconds(grads, make_codec(argparse.Namespace(**config)), stock, args.ranks, twin,
                                       2 if args.dry_run else args.repeats)
        step = s.get("step_seconds_median")
        runs.append({"run": f.stem, "framework": s["framework"], "device": s.get("device"), "steps": s.get("steps"),
                     "step_ms": None if step is None else 1e3 * step, "codec_ms": 1e3 * timed[key],
                     "codec_share": None if not step else timed[key] / step,
                     "cuda_launches": s.get("kernel_launches", {}).get("cuda", 0),
                     "replicas_bit_identical": s["replicas_bit_identical"], "test_accuracy": s["test_accuracy"],
                     "bits_per_coordinate": s["bits_per_coordinate"]})
    if runs:
        print(f"\n{'run':34} {'device':>7} {'steps':>5} {'step ms':>8} {'codec ms':>9} {'share':>6} "
              f"{'CUDA launches':>13} {'identical':>9} {'accuracy':>8} {'bits':>6}")
        for r in runs:
            step = "-" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
            share = "-" if r["codec_share"] is None else f"{100 * r['codec_share']:.0f}%"
            print(f"{r['run']:34} {str(r['device']):>7} {r['steps']:>5} {step:>8} {r['codec_ms']:>9.2f} {share:>6} "
                  f"{r['cuda_launches']:>13} {str(r['replicas_bit_identical']):>9} {r['test_accuracy']:>8.4f} "
                  f"{r['bits_per_coordinate']:>6.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "dry run (CUDA simulator)",
              "torch": torch.__version__, "ranks": args.ranks, "codes": rows, "runs": runs}
    (args.out / "gpu_e2e.json").write_text(json.dumps(report, indent=2))
    bad = [r["codec"] for r in rows if not r["codes_equal"]]
    bad += [f"{r['run']}: replicas differ" for r in runs if not r["replicas_bit_identical"]]
    bad += [f"{r['run']}: no CUDA kernel ran" for r in runs if not args.dry_run and not r["cuda_launches"]]
    if bad:
        raise SystemExit(f"gpu_e2e: FAILED: {bad}")
    print(f"gpu_e2e: all codes equal, replicas bit-identical in {len(runs)} run(s); report {args.out / 'gpu_e2e.json'}")


if __name__ == "__main__":
    main()
