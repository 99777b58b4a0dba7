"""GPU end-to-end check, the codes part (launch/gpu_e2e.sh runs it beside the training runs).

Real gradients: the main job's model on the GPU, minibatch gradients of its weight tensors. Each
check runs twice on the same gradients, once on the GPU (the CUDA kernels) and once on copies in
host memory (the CPU twins), and compares bit for bit:

1. **Codecs**: every codec, both dither families, encodes and decodes one gradient per tensor
   with the same dither key: the payload bytes must be equal and so must the decoded floats.
2. **Exchanges, through the objects the adapters build**: every adapter (Horovod's stock path
   ``hvdquant.Compression.dqsg``/``ndqsg``, ``hvdquant.DistributedOptimizer``, the DDP hook) holds a
   ``make_exchange(codec, reducer, average, collectives)`` (reducer ``"allreduce"``: the summable
   words of the stock path and of DDP's allreduce) and hands it fused buffers. Each training run's
   exchange (and a few more, for both dither families on the summed words) runs here with P ranks
   in P threads of this process over a loopback :class:`Collectives` that records every tensor a
   rank hands to a collective: the summed words, scale maxima, checksums and payload bytes of every
   rank at every step must be equal on both devices, the decoded means equal, and the ranks' means
   identical. The adapters add only framework plumbing around these objects (tensor names, the
   session's step counters and first-step agreement), and the real collectives move bytes without
   reading them; the training runs of launch/gpu_e2e.sh show that plumbing on the GPU (replicas
   bit-identical). Equal bytes here therefore mean that a GPU rank and a CPU rank of one job send
   the same codes and decode the same means.
3. **The codec's time per step** of each training run (``--run NAME=FLAGS``, the main job's flags):
   the GPU time of its codec's arithmetic for one step of the whole model — stock path: bucket
   maxima, quantize into the summable words, decode the reduced words; payload path: P encodes
   (one per simulated sender; a rank does one) and the aggregate of the P payloads —
   CUDA-synchronized, median of repeats (launch/gpu_report.py divides it by the run's step time).

Prints the tables, writes ``--out`` (JSON); on any difference exits 1 after a last line
``FAILED: <what differs>``.

``--dry-run`` (no GPU): the CUDA kernels run in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)
on host tensors, on the first 512 elements of each gradient, to check this script.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import hvdquant
from hvdquant.codecs.base import TensorContext
from hvdquant.data import load_fashion_mnist
from hvdquant.examples.frameworks import make_codec
from hvdquant.examples.models import SmallCNN
from hvdquant.examples.train import parse_args
from hvdquant.kernels import ops
from hvdquant.transports.collectives import Started
from hvdquant.transports.exchange import make_exchange
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.session import dither_key
from hvdquant.transports.summable import SumFieldLayout

SEED = 7
BATCH = 64

CODECS: dict[str, Callable[[], Any]] = {
    "dqsg s=1": lambda: hvdquant.DQSG(levels=1, bucket_size=512),
    "dqsg s=1 independent": lambda: hvdquant.DQSG(levels=1, bucket_size=512, dither="independent"),
    "dqsg s=3": lambda: hvdquant.DQSG(levels=3, bucket_size=512),
    "dqsg s=3 independent": lambda: hvdquant.DQSG(levels=3, bucket_size=512, dither="independent"),
    "ndqsg (3,1) nested": lambda: hvdquant.NDQSG(levels=(3, 1), bucket_size=512, adaptive=False),
    "ndqsg (3,1) nested stratified": lambda: hvdquant.NDQSG(levels=(3, 1), bucket_size=512, adaptive=False,
                                                            dither="stratified"),
    "qsgd s=4 elias": lambda: hvdquant.QSGD(levels=4, bucket_size=512),
    "qsgd s=4 fixed": lambda: hvdquant.QSGD(levels=4, bucket_size=512, coding="fixed"),
    "onebit": lambda: hvdquant.OneBitSGD(),
    "topk 1%": lambda: hvdquant.TopK(ratio=0.01),
}
#: exchanges checked besides the training runs' own: both dither families and s=3 on the summed words
EXTRA_EXCHANGES = ["--compression dqsg --reducer stock --dither independent",
                   "--compression dqsg --reducer stock --levels 3",
                   "--compression ndqsg --reducer stock"]


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 units in the last place between a and b (0: bit-identical)."""
    ia, ib = a.contiguous().view(torch.int32).to(torch.int64), b.contiguous().view(torch.int32).to(torch.int64)
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)  # sign-magnitude -> monotone integers
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def minibatch_gradients(device: torch.device, count: int, limit: int | None) -> list[dict[str, torch.Tensor]]:
    """Gradients of the main job's model (its weight tensors, flat, the first ``limit`` elements) on
    ``count`` consecutive minibatches of the training set."""
    torch.manual_seed(0)
    x, y, _, _ = load_fashion_mnist()
    model = SmallCNN().to(device)
    out = []
    for i in range(count):
        model.zero_grad()
        batch = slice(i * BATCH, (i + 1) * BATCH)
        F.cross_entropy(model(x[batch].to(device)), y[batch].to(device)).backward()
        out.append({n: p.grad.detach().reshape(-1)[:limit].clone() for n, p in model.named_parameters()
                    if p.dim() >= 2})
    return out


def verdict(row: dict) -> str | None:
    """What differs in a row (None: nothing)."""
    if row.get("error"):
        return row["error"]
    bad = []
    if not row["codes_equal"]:
        bad.append("codes differ")
    if row["decoded_max_ulps"]:
        bad.append(f"decoded {row['decoded_max_ulps']} ulp apart")
    if row.get("replicas_identical") is False:
        bad.append("ranks decoded different means")
    return ", ".join(bad) or None


# ----------------------------------------------------------------------------- 1. codecs
def compare_codecs(grads: dict[str, torch.Tensor], ranks: int, twin: Callable) -> list[dict]:
    """Per codec: payload bytes GPU vs CPU (equal?), decoded max ulps, payload bytes."""
    rows = []
    for label, make in CODECS.items():
        row: dict[str, Any] = {"codec": label, "codes_equal": True, "decoded_max_ulps": 0, "payload_bytes": 0}
        try:
            for name, g in grads.items():
                key = dither_key(SEED, 3, name, ranks - 1)
                # each side its own (fresh) codec state: error feedback's residuals
                ctx, cpu_ctx = (TensorContext(name, tuple(g.shape), key, ranks, hvdquant.CodecState()) for _ in "ab")
                gpu_codec, cpu_codec = make(), make()
                side = torch.zeros_like(g)
                with twin():
                    enc = gpu_codec.encode(g, ctx)
                    dec = gpu_codec.decode(enc, ctx, side) if "cosets" in enc.fields else gpu_codec.decode(enc, ctx)
                ref = cpu_codec.encode(g.cpu(), cpu_ctx)
                ref_dec = (cpu_codec.decode(ref, cpu_ctx, side.cpu()) if "cosets" in ref.fields
                           else cpu_codec.decode(ref, cpu_ctx))
                row["codes_equal"] &= torch.equal(enc.to_bytes().cpu(), ref.to_bytes())
                row["decoded_max_ulps"] = max(row["decoded_max_ulps"], ulps(dec.cpu(), ref_dec))
                row["payload_bytes"] += enc.nbytes()
        except Exception as exc:  # noqa: BLE001 - reported in the row, the other rows still run
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 2. exchanges
class Loopback:
    """``size`` ranks of one job as threads of this process, taking turns: one runs at a time (a
    rank waiting for a collective lets the next one run), so kernels never run concurrently.
    Each rank's :class:`LoopbackRank` is a :class:`~hvdquant.transports.collectives.Collectives`."""

    TIMEOUT_S = 120

    def __init__(self, size: int) -> None:
        self.size = size
        self.turn = threading.Condition()
        self.slots: dict[tuple[str, int], dict[int, Any]] = {}
        self.error: BaseException | None = None

    def run(self, body: Callable[[LoopbackRank], Any]) -> tuple[list[Any], list[list[tuple]]]:
        """``body(collectives)`` on every rank; returns each rank's result and what it handed over."""
        ranks = [LoopbackRank(self, r) for r in range(self.size)]
        results: list[Any] = [None] * self.size

        def main(coll: LoopbackRank) -> None:
            with self.turn:
                try:
                    results[coll.rank] = body(coll)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                    self.error = self.error or exc
                finally:
                    self.turn.notify_all()

        threads = [threading.Thread(target=main, args=(coll,)) for coll in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.error is not None:
            raise self.error
        return results, [coll.handed for coll in ranks]

    def post(self, key: tuple[str, int], rank: int, value: Any) -> Callable[[], list[Any]]:
        """This rank's part of collective ``key``; the returned wait() gives every rank's part."""
        slot = self.slots.setdefault(key, {})
        slot[rank] = value
        self.turn.notify_all()

        def wait() -> list[Any]:
            if not self.turn.wait_for(lambda: len(slot) == self.size or self.error is not None, self.TIMEOUT_S):
                raise TimeoutError(f"rank {rank} waited {self.TIMEOUT_S} s for collective {key}")
            if self.error is not None:
                raise RuntimeError("another rank failed")
            return [slot[r] for r in range(self.size)]

        return wait


class LoopbackRank:
    """One rank's collectives over a :class:`Loopback`, with the real implementations' semantics
    (results on the input's device, ``None`` for a poisoned rank's bytes); ``handed`` records a host
    copy of every tensor this rank hands over, in order."""

    def __init__(self, group: Loopback, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size
        self.handed: list[tuple[str, str, torch.Tensor]] = []
        self._calls: Counter[str] = Counter()

    def _post(self, name: str, value: Any) -> Callable[[], list[Any]]:
        key = (name, self._calls[name])
        self._calls[name] += 1
        return self.group.post(key, self.rank, value)

    def _hand(self, name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        host = t.detach().to("cpu", copy=True).contiguous()
        self.handed.append((name, str(host.dtype), host.reshape(-1).view(torch.uint8)))
        return host

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> Started[torch.Tensor]:
        reduce = {"sum": torch.add, "max": torch.maximum}[op]
        wait = self._post(name, self._hand(name, tensor))
        return Started(lambda: functools.reduce(reduce, wait()).to(tensor.device),
                       tensor.numel() * tensor.element_size())

    def allgather_bytes(self, buf: torch.Tensor | None, name: str) -> Started[list]:
        home = torch.device("cpu") if buf is None else buf.device
        wait = self._post(name, self._hand(name, buf))
        return Started(lambda: [None if p is None else p.to(home) for p in wait()],
                       0 if buf is None else buf.numel())

    def alltoall_bytes(self, bufs: list[torch.Tensor] | None, name: str) -> Started[list]:
        home = torch.device("cpu") if bufs is None else bufs[0].device
        wait = self._post(name, None if bufs is None else [self._hand(name, b) for b in bufs])
        return Started(lambda: [None if p is None else p[self.rank].to(home) for p in wait()],
                       0 if bufs is None else sum(b.numel() for b in bufs))

    def broadcast(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        return self._post(name, self._hand(name, tensor))()[root].to(tensor.device)

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        return self._post(name, obj)()


def exchange_label(args: argparse.Namespace) -> str:
    """``dqsg s=1 stratified, summed words``, ``qsgd s=4, allgather``, ``ndqsg (3,1), allgather``…"""
    levels = f"({args.levels},{args.coarse_levels})" if args.compression == "ndqsg" else f"s={args.levels}"
    dither = f" {args.dither}" if args.compression == "dqsg" else ""
    path = "summed words" if args.reducer in ("stock", "allreduce") else args.reducer
    return f"{args.compression} {levels}{dither}, {path}"


def run_exchange(args: argparse.Namespace, grads: list[list[dict[str, torch.Tensor]]]) -> tuple[list, list]:
    """The adapters' exchange for the main job's flags ``args`` over a :class:`Loopback` of
    ``len(grads[0])`` ranks, ``len(grads)`` steps (rank r at step t sends ``grads[t][r]``): every
    rank's decoded means per step, and what each rank handed to the collectives."""
    summed = args.reducer in ("stock", "allreduce")

    def rank_main(coll: LoopbackRank) -> list[dict[str, torch.Tensor]]:
        ex = make_exchange(make_codec(args), "allreduce" if summed else args.reducer, True, coll)
        means = []
        for step, per_rank in enumerate(grads):
            # one fused buffer per step, as a DDP bucket or the stock path's step hands it over
            buf = FusedBuffer.of([(name, g, dither_key(SEED, step, name, coll.rank))
                                  for name, g in sorted(per_rank[coll.rank].items())])
            means.append(buf.unflatten(ex.start(buf)()))
        return means

    return Loopback(len(grads[0])).run(rank_main)


def compare_exchanges(configs: list[argparse.Namespace], grads: list[list[dict[str, torch.Tensor]]],
                      twin: Callable) -> list[dict]:
    """Per exchange: the tensors every rank handed to the collectives equal on both devices?
    decoded means max ulps apart, ranks' means identical (GPU), bytes handed by rank 0."""
    host = [[{n: g.cpu() for n, g in per.items()} for per in step] for step in grads]
    rows = []
    for args in configs:
        row: dict[str, Any] = {"exchange": exchange_label(args), "codes_equal": False, "decoded_max_ulps": 0}
        try:
            with twin():
                means, handed = run_exchange(args, grads)
            ref_means, ref_handed = run_exchange(args, host)
        except Exception as exc:  # noqa: BLE001 - reported in the row, the other rows still run
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        row["codes_equal"] = all(len(a) == len(b) and all(x[:2] == y[:2] and torch.equal(x[2], y[2])
                                                          for x, y in zip(a, b))
                                 for a, b in zip(handed, ref_handed))
        row["decoded_max_ulps"] = max(ulps(m[n].cpu(), r[n]) for rank, ref in zip(means, ref_means)
                                      for m, r in zip(rank, ref) for n in m)
        row["replicas_identical"] = all(torch.equal(m[n], m0[n]) for rank in means[1:]
                                        for m, m0 in zip(rank, means[0]) for n in m)
        row["bytes_handed_rank0"] = sum(t.numel() for _, _, t in handed[0])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 3. codec time per step
def codec_seconds(grads: dict[str, torch.Tensor], args: argparse.Namespace, ranks: int, twin: Callable,
                  repeats: int) -> float:
    """Seconds of one step's codec arithmetic for the whole model on the gradients' device (median of
    ``repeats``, CUDA-synchronized): the stock path's bucket maxima, summable words and decode of the
    reduced words (DQSG), or the payload path's encode of this rank's payload and the aggregate of
    all P payloads."""
    codec = make_codec(args)
    stock = args.reducer in ("stock", "allreduce")
    sync = torch.cuda.synchronize if any(g.is_cuda for g in grads.values()) else (lambda: None)
    if stock:
        layout = SumFieldLayout.for_levels(codec.levels, ranks)
    state = hvdquant.CodecState()  # what a stateful codec keeps between steps (residuals, nesting decisions)

    def one_step() -> None:
        for name, g in grads.items():
            ctx = TensorContext(name, tuple(g.shape), dither_key(SEED, 3, name, 0), ranks, state)
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
        for _ in range(repeats + 1):  # the first is a warm-up
            sync()
            tick = time.perf_counter()
            one_step()
            sync()
            times.append(time.perf_counter() - tick)
    return statistics.median(times[1:])


def table(rows: list[dict], key: str, extra: list[tuple[str, str]]) -> None:
    print(f"\n{key:40} {'codes equal':>11} {'decoded ulps':>12} " + " ".join(f"{h:>{len(h)}}" for h, _ in extra))
    for r in rows:
        cells = " ".join(f"{'' if r.get(k) is None else str(r[k]):>{len(h)}}" for h, k in extra)
        print(f"{r[key]:40} {str(r['codes_equal']):>11} {r['decoded_max_ulps']:>12} {cells}"
              + (f"  {r['error']}" if r.get("error") else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="steps of each loopback exchange")
    p.add_argument("--run", action="append", default=[], metavar="NAME=FLAGS",
                   help="a training run of launch/gpu_e2e.sh and its main-job flags (repeatable)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_e2e/codes.json"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="no GPU: CUDA simulator on host tensors, small slices")
    args = p.parse_args()
    if args.dry_run:
        device, limit, twin, repeats = torch.device("cpu"), 512, (lambda: ops.force_target("cuda")), 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("FAILED: no CUDA device (use --dry-run to check the script without one)")
        device, limit, twin, repeats = torch.device("cuda"), None, nullcontext, args.repeats
    runs = {name: parse_args(shlex.split(flags)) for name, flags in (r.split("=", 1) for r in args.run)}
    flat = minibatch_gradients(device, args.steps * args.ranks, limit)
    grads = [flat[t * args.ranks:(t + 1) * args.ranks] for t in range(args.steps)]

    codecs = compare_codecs(grads[0][0], args.ranks, twin)
    table(codecs, "codec", [("payload bytes", "payload_bytes")])
    configs = {exchange_label(a): a for a in [*runs.values(), *(parse_args(shlex.split(f)) for f in EXTRA_EXCHANGES)]}
    exchanges = compare_exchanges(list(configs.values()), grads, twin)
    table(exchanges, "exchange", [("ranks identical", "replicas_identical"), ("bytes rank 0", "bytes_handed_rank0")])
    seconds, bad = {}, []
    for name, a in runs.items():
        try:
            seconds[name] = codec_seconds(grads[0][0], a, args.ranks, twin, repeats)
        except Exception as exc:  # noqa: BLE001 - reported, the report is still written
            seconds[name] = None
            bad.append(f"{name}'s codec timing ({type(exc).__name__}: {exc})")

    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "dry run (CUDA simulator)",
              "torch": torch.__version__, "ranks": args.ranks, "steps": args.steps, "codecs": codecs,
              "exchanges": exchanges, "codec_seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    bad = [f"{r.get('codec') or r['exchange']} ({why})" for r in codecs + exchanges if (why := verdict(r))] + bad
    if bad:
        print(f"FAILED: {'; '.join(bad)}")
        raise SystemExit(1)
    print(f"GPU = CPU: {len(codecs)} codecs and {len(exchanges)} exchanges ({args.ranks} ranks, {args.steps} steps)")


if __name__ == "__main__":
    main()
