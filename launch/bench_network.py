"""Gradient-exchange benchmark (a benchmark, not a test), driven by launch/bench_network.sh.

    mpirun -n 4 --mca btl self,tcp ... python launch/bench_network.py --framework horovod --label 1gbit
    mpirun -n 4 ... python launch/bench_network.py --framework torch --label 1gbit   # PyTorch DDP hooks

Per gradient size n (float32 coordinates, shaped as a near-square matrix so that PowerSGD and the
"tensors of ≥ 2 dimensions" rule see one weight matrix) and per method, the time of one gradient
exchange *including encode and decode*: the median over ``--repeats`` timed calls after one warm-up,
of the slowest rank, each call started after a barrier. Bytes per rank are measured from the
tensors each method handed to its collectives (hvdquant's CommStats and RingStats; for Horovod's
own allreduce the tensor given; for DDP, a counter around ``torch.distributed.all_reduce``).

Gradients: rank r's gradient at call i is b + σ·ε(r, i) with b ~ N(0, 1) fixed and σ = ``--noise``
(default 10⁻³): ranks and calls are strongly correlated (1/(1 + σ²)), the best case for the nested
schemes' side information (real SGD gradients are not; docs/RING.md). Failed nested buckets are
recovered and counted (failed buckets and request rounds per call, summed over the timed calls).
``--noise 1`` (correlation 0.5; about half of NDQSG (3,1)'s nested buckets fail, 0.6% of its
coordinates) with ``--fixed-nesting`` prices the recovery rounds: that flag adds the rows
"ndqsg (3,1) fixed, whole buckets" and "…, locate" (select one with ``--only "whole buckets"`` or
``--only locate``), the paper's fixed nesting resending failed buckets whole, and locating their wrong coordinates
from syndromes first (up to two more request rounds).

``--framework horovod``: Horovod none/fp16 allreduce; hvdquant's stock-path compressions through
Horovod's allreduce; every codec on the payload transports (allgather, scatter-reduce); the mpi4py
ring (float32 and coset). ``--framework torch``: DDP (gloo) with its default allreduce, with torch's
fp16 and PowerSGD comm hooks (rank 4, error feedback, warm start) and with the hvdquant hook
(``hvdquant.ddp``, DQSG s=1 over the summable allreduce and over allgather); the time of a backward
pass minus the time of the same backward under ``no_sync()``. Rank 0 appends rows to ``--out``/bench_network.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from mpi4py import MPI


def shape_of(n: int) -> tuple[int, int]:
    """A near-square (rows, cols) with rows·cols = n (n a multiple of 1000 here)."""
    rows = int(math.isqrt(n))
    while n % rows:
        rows -= 1
    return rows, n // rows


def gradients(n: int, rank: int, noise: float = 1e-3) -> Callable[[int], torch.Tensor]:
    base = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return lambda i: (base + noise * torch.randn(n, generator=torch.Generator().manual_seed(1000 * i + rank))
                      ).reshape(shape_of(n))


def timed(comm, label: str, n: int, fn: Callable, grad, repeats: int, rows: list[dict],
          extra: Callable[[], dict] | None = None, warmups: int = 1) -> None:
    """fn(g, i) runs one exchange and returns the bytes this rank handed to collectives in it, or
    (bytes, seconds) where it times itself."""
    for i in range(warmups):  # JIT, buffers, first side information, PowerSGD's start iteration
        fn(grad(0), i)
    times, nbytes = [], 0
    for i in range(warmups, warmups + repeats):
        g = grad(i)
        comm.Barrier()
        t = time.perf_counter()
        result = fn(g, i)
        elapsed = time.perf_counter() - t
        nbytes, elapsed = result if isinstance(result, tuple) else (result, elapsed)
        times.append(elapsed)
    worst = comm.allreduce(statistics.median(times), op=MPI.MAX)
    nbytes = comm.allreduce(nbytes) / comm.Get_size()  # the mean: NDQSG's ranks send different sizes
    row = {"method": label, "n": n, "ranks": comm.Get_size(), "seconds": worst, "bytes_per_rank": nbytes,
           "bits_per_coordinate": 8.0 * nbytes / n, **(extra() if extra else {})}
    rows.append(row)
    if comm.Get_rank() == 0:
        print(f"{label:34s} n={n:.2g} {worst * 1e3:10.1f} ms {nbytes / 1e6:9.2f} MB/rank", flush=True)


def horovod_methods(comm, n: int, fixed_nesting: bool = False) -> list[tuple[str, Callable, Callable | None]]:
    import horovod.torch as hvd

    import hvdquant
    from hvdquant.transports import FusedBuffer, HorovodCollectives, make_exchange
    from hvdquant.transports.session import dither_key

    out: list[tuple[str, Callable, Callable | None]] = []

    def stock(label: str, compression) -> None:
        def fn(g, i):
            hvd.allreduce(g, op=hvd.Average, compression=compression, name=f"bench.{label}")
            return g.numel() * (2 if compression is hvd.Compression.fp16 else 4)
        out.append((label, fn, None))

    stock("horovod fp32", hvd.Compression.none)
    stock("horovod fp16", hvd.Compression.fp16)

    def hvdq_stock(label: str, comp) -> None:
        def fn(g, i):
            before = comp.stats.bytes_handed
            hvd.allreduce(g, op=hvd.Average, compression=comp, name=f"bench.{label}")
            return comp.stats.bytes_handed - before
        nested = getattr(comp, "decode_stats", None)
        extra = (lambda: {"failed_buckets": nested.failed_buckets}) if nested is not None else None
        out.append((label, fn, extra))

    hvdq_stock("dqsg s=1 stock allreduce", hvdquant.Compression.dqsg(levels=1, bucket_size=512, seed=0))
    hvdq_stock("dqsg s=1 stock, independent dither",
               hvdquant.Compression.dqsg(levels=1, bucket_size=512, seed=0, dither="independent"))
    hvdq_stock("dqsg s=3 stock allreduce", hvdquant.Compression.dqsg(levels=3, bucket_size=512, seed=0))
    hvdq_stock("ndqsg-sum (3,1) stock allreduce", hvdquant.Compression.ndqsg(levels=(3, 1), bucket_size=512, seed=0))

    def payload(label: str, codec, reducer: str) -> None:
        ex = make_exchange(codec, reducer, True, HorovodCollectives())

        def fn(g, i):
            before = ex.stats.bytes_handed
            name = f"bench.{label}"
            ex.start(FusedBuffer.of([(name, g, dither_key(0, i, name, ex.coll.rank))]))()
            return ex.stats.bytes_handed - before
        out.append((f"{label} {reducer}", fn, lambda: {"failed_buckets": ex.decode.failed_buckets,
                                                        "recovery_rounds": ex.decode.recovery_rounds}))

    for reducer in ("allgather", "scatter_reduce"):
        payload("dqsg s=1", hvdquant.DQSG(1, 512), reducer)
        payload("dqsg s=3", hvdquant.DQSG(3, 512), reducer)
        payload("qsgd s=3 d=512", hvdquant.QSGD(3, 512), reducer)
        payload("1-bit SGD + EF", hvdquant.OneBitSGD(), reducer)
        payload("top-1% + EF", hvdquant.TopK.with_feedback(0.01), reducer)
    payload("ndqsg (3)/(3,1) r=0.5", hvdquant.NDQSG((3, 1), 512, 0.5), "allgather")
    if fixed_nesting:
        payload("ndqsg (3,1) fixed, whole buckets", hvdquant.NDQSG((3, 1), 512, adaptive=False, locate=False),
                "allgather")
        payload("ndqsg (3,1) fixed, locate", hvdquant.NDQSG((3, 1), 512, adaptive=False, locate=True), "allgather")

    def ring(label: str, codec) -> None:
        session = hvdquant.coset_ring(codec, hvdquant.PreviousMean(), comm) if codec else None
        st = session.exchange.stats if codec else hvdquant.RingStats()

        def fn(g, i):
            before = st.bytes_sent
            if session is None:
                hvdquant.ring_allreduce(g, comm, name="bench", average=True, stats=st)
            else:
                hvdquant.ring_allreduce(g, session=session, name="bench", average=True)
            return st.bytes_sent - before
        out.append((label, fn, lambda: {"failed_buckets": st.failed_buckets}))

    ring("ring fp32 (mpi4py)", None)
    ring("ring coset ndqsg (3,1) (mpi4py)", hvdquant.NDQSG((3, 1), 512))
    ring("ring coset ndqsg (16,2) (mpi4py)", hvdquant.NDQSG((16, 2), 512))  # ρ = 8 > P: side info can work
    return out


def torch_methods(n: int) -> list[tuple[str, Callable, Callable | None]]:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hvdquant

    counted = {"bytes": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counted["bytes"] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # PowerSGD's and the fp16 hook call dist.all_reduce

    class Weight(torch.nn.Module):
        """One weight matrix; forward(g) = Σ w∘g, so the gradient DDP exchanges is g."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(shape_of(n)))

        def forward(self, g: torch.Tensor) -> torch.Tensor:
            return (self.w * g).sum()

    def ddp(label: str, hook: Callable | None = None, hook_state=None,
            handed: Callable[[], int] | None = None) -> tuple[str, Callable, None]:
        """A DDP row: no hook (DDP's own fp32 allreduce) or ``hook``; bytes from ``handed`` (the
        hvdquant hook's own statistics) or from the dist.all_reduce counter."""
        model = DDP(Weight(), bucket_cap_mb=4 * n / 2**20 + 1)
        if hook is not None:
            model.register_comm_hook(hook_state, hook)

        def fn(g, i):
            counted["bytes"] = 0
            before = handed() if handed is not None else 0
            with model.no_sync():  # the same forward and backward without communication, subtracted
                t = time.perf_counter()
                model(g).backward()
                local = time.perf_counter() - t
            t = time.perf_counter()
            model(g).backward()
            total = time.perf_counter() - t
            model.module.w.grad = None
            if handed is not None:
                return handed() - before, total - local
            # DDP's own bucket allreduce does not go through dist.all_reduce: count the bucket
            return counted["bytes"] if hook is not None else 4 * n, total - local
        return label, fn, None

    def hvdquant_hook(label: str, codec, reducer: str) -> tuple[str, Callable, None]:
        state = hvdquant.ddp.State(codec, reducer, seed=0)
        return ddp(label, hvdquant.ddp.hook, state, lambda: state.statistics()["bytes_handed"])

    return [ddp("ddp fp32 (gloo)"),
            ddp("ddp fp16 hook (gloo)", default_hooks.fp16_compress_hook),
            ddp("ddp powersgd rank 4 (gloo)", powersgd.powerSGD_hook,
                powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2,
                                       min_compression_rate=0.0, use_error_feedback=True, warm_start=True)),
            hvdquant_hook("ddp hvdquant dqsg s=1 hook allreduce (gloo)", hvdquant.DQSG(1, 512), "allreduce"),
            hvdquant_hook("ddp hvdquant dqsg s=1 hook allgather (gloo)", hvdquant.DQSG(1, 512), "allgather")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=["horovod", "torch"], required=True)
    p.add_argument("--label", required=True, help="the link, e.g. 100mbit")
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 2.5e7])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--noise", type=float, default=1e-3, help="σ of each rank's gradient around the common one")
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching methods")
    p.add_argument("--fixed-nesting", action="store_true",
                   help="add the paper's fixed NDQSG (3,1) with whole-bucket recovery and with locating")
    p.add_argument("--out", type=Path, default=Path("runs/bench_network"))
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    if args.framework == "horovod":
        import horovod.torch as hvd

        hvd.init(comm=comm)
    else:
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo", rank=rank, world_size=size)
    rows: list[dict] = []
    wanted = [s for s in args.only.split(",") if s]
    for s in args.sizes:
        n = int(s)
        grad = gradients(n, rank, args.noise)
        methods = horovod_methods(comm, n, args.fixed_nesting) if args.framework == "horovod" else torch_methods(n)
        for label, fn, extra in methods:
            if wanted and not any(w in label for w in wanted):
                continue
            timed(comm, label, n, fn, grad, args.repeats, rows, extra,
                  warmups=1 if args.framework == "horovod" else 3)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "bench_network.json"
        old = json.loads(path.read_text()) if path.exists() else {"rows": []}
        stamp = {"link": args.label, "framework": args.framework, "noise": args.noise,
                 "date": datetime.now().isoformat(timespec="seconds")}
        # a rerun replaces its own (method, size) rows and keeps the rest (e.g. one size remeasured)
        ran = {(x["method"], x["n"]) for x in rows}
        keep = [r for r in old["rows"] if not (r["link"] == args.label and r["framework"] == args.framework
                                               and (r["method"], r["n"]) in ran)]
        path.write_text(json.dumps({"rows": keep + [{**stamp, **r} for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
