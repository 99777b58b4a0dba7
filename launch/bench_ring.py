"""Ring-allreduce benchmark (a benchmark, not a test): run under mpirun, e.g.

    mpirun -n 4 .venv/bin/python launch/bench_ring.py --sizes 1e6 1e7 2.5e7

Per size, the median time of one allreduce (after a warm-up) and the bytes this rank handed to the
collective, for: hvdquant's float32 ring (mpi4py), the coset ring (NDQSG (3,1) and (16,2), previous
mean as side information; gradients change slowly between calls), MPI_Allreduce, and Horovod's
allreduce. Rank 0 prints a table and writes JSON. Bytes are measured for hvdquant's rings (every
Sendrecv and allreduce it makes); for MPI_Allreduce and Horovod, which choose their own algorithms,
the table shows a ring's 2(P−1)/P·4n for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from hvdquant import NDQSG, PreviousMean, RingStats, ring_allreduce


def bench_size(n: int, comm, hvd, repeats: int, rows: list[dict]) -> None:
    rank, size = comm.Get_rank(), comm.Get_size()
    base = torch.randn(n, generator=torch.Generator().manual_seed(0))

    def grad(i: int) -> torch.Tensor:
        return base + 1e-3 * torch.randn(n, generator=torch.Generator().manual_seed(1000 * i + rank))

    def timed(fn, label: str) -> None:
        fn(grad(0))  # warm-up (and, for the coset ring, the first side information)
        times, nbytes = [], 0
        for i in range(1, repeats + 1):
            g = grad(i)
            comm.Barrier()
            t = time.perf_counter()
            nbytes = fn(g)
            times.append(time.perf_counter() - t)
        worst = comm.allreduce(statistics.median(times), op=MPI.MAX)
        rows.append({"method": label, "n": n, "ranks": size, "seconds": worst,
                     "bytes_per_rank": nbytes, "bits_per_coordinate": 8.0 * nbytes / n})
        if rank == 0:
            print(f"{label:32s} n={n:.2g} {worst * 1e3:9.1f} ms  {nbytes / 1e6:9.2f} MB/rank", flush=True)

    def plain(g):
        st = RingStats()
        ring_allreduce(g, comm, stats=st)
        return st.bytes_sent

    timed(plain, "hvdquant fp32 ring (mpi4py)")
    for levels in ((3, 1), (16, 2)):  # the paper's ρ = 3, and ρ = 8 > P where side information can work
        side, codec = PreviousMean(), NDQSG(levels, 512)

        def coset(g, codec=codec, side=side):
            st = RingStats()
            ring_allreduce(g, comm, codec=codec, side=side, name="bench", stats=st)
            return st.bytes_sent

        timed(coset, f"hvdquant coset ring NDQSG{levels}")

    def mpi(g):
        x = g.numpy()
        out = np.empty_like(x)
        comm.Allreduce(x, out, op=MPI.SUM)
        return x.nbytes * 2 * (size - 1) // size  # a ring's volume, for reference

    timed(mpi, "MPI_Allreduce fp32")

    def horovod(g):
        hvd.allreduce(g, op=hvd.Sum, name=f"bench.{n}")
        return g.numel() * 4 * 2 * (size - 1) // size

    timed(horovod, "Horovod allreduce fp32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 2.5e7])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("runs/bench_ring"))
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    import horovod.torch as hvd  # after mpi4py: Horovod shares its MPI_COMM_WORLD

    hvd.init(comm=comm)
    torch.set_num_threads(1)
    rows: list[dict] = []
    for s in args.sizes:
        bench_size(int(s), comm, hvd, args.repeats, rows)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"date": date.today().isoformat(), "ranks": size, "repeats": args.repeats}
        (args.out / f"bench_ring_P{size}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print()
        print("| method | n | ms (median, slowest rank) | bytes/rank (MB) | bits/coord |\n|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['n']:.2g} | {r['seconds'] * 1e3:.1f} | {r['bytes_per_rank'] / 1e6:.2f} "
                  f"| {r['bits_per_coordinate']:.2f} |")


if __name__ == "__main__":
    main()
