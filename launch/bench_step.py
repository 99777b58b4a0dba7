"""Training-step benchmark (a benchmark, not a test), one mpirun job per (model, ranks, link);
driven by launch/bench_step.sh.

    mpirun -np 2 --mca btl self,tcp ... python launch/bench_step.py --model resnet18 --link unlimited

Time per training step: forward + backward + gradient exchange + optimizer step, each step started
after an MPI barrier; per rank the median of ``--steps`` timed steps after ``--warmup`` untimed ones;
reported: the slowest rank's median. Every method starts from the same weights
(``torch.manual_seed(0)``) and trains on a fixed synthetic batch per rank (SGD, lr 0.01, momentum 0.9).

Methods, run in turn inside the one job (Horovod is initialized once, and torch.distributed with
gloo once, only when a DDP method is selected); only public APIs are used:

- ``fp32`` / ``fp16``: ``hvd.DistributedOptimizer(..., compression=hvd.Compression.none / .fp16)``;
- ``stock``: ``hvd.DistributedOptimizer(..., compression=hvdquant.Compression.dqsg(levels=1, bucket_size=512))``;
- ``allgather`` / ``scatter_reduce``: ``hvdquant.DistributedOptimizer(..., codec=hvdquant.DQSG(levels=1,
  bucket_size=512), reducer=...)``;
- ``ddp`` / ``powersgd``: ``DistributedDataParallel`` over gloo, plain (DDP's default buckets) or with
  the PowerSGD comm hook (rank 4, as in launch/bench_network.py) over one bucket (see ``ddp_setup``);
- ``ddp-dqsg``: ``DistributedDataParallel`` over gloo (default buckets) with ``hvdquant.ddp.hook``,
  DQSG s=1 over the summable allreduce.

They run in the order of ``RUN_ORDER`` (hvdquant's payload paths, the slowest today, last), whatever
the order given.

Bits per coordinate: hvdquant's own measurement (``compression.stats.bits_per_coordinate``,
``opt.hvdquant_stats()["bits_per_coordinate"]``, mean over ranks); PowerSGD's counted from the tensors
its hook hands to ``dist.all_reduce``; nominal 32/16 for the plain fp32/fp16 rows.

No thread counts are set here (no ``torch.set_num_threads``): the ranks run with the library
defaults, as a user's job would; the counts seen are recorded in every row. ``--profile`` runs
``--steps`` more steps of the stock method under cProfile on rank 0 (after the timed ones, so the
timing is not disturbed) and writes ``profile_<model>_P<ranks>_<link>_stock.{txt,json,pstats}``.

Rank 0 writes ``<out>/step_<model>_P<ranks>_<link>.json`` after every method; a rerun replaces the
rows of the methods it runs and keeps the others. Every row records the machine, the thread counts,
the command, and which hvdquant it measured (commit and a hash of hvdquant/ and kernels/ on disk).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import statistics
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

# ---------------------------------------------------------------------------------------------- models


def mlp(inputs: int, width: int, hidden: int, classes: int = 10) -> nn.Sequential:
    """``hidden`` hidden layers of ``width`` units: hidden + 1 Linear layers, 2·(hidden + 1) tensors."""
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(hidden - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convolutions with BatchNorm, identity or 1×1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """The standard ResNet-18 (He et al. 2016; torchvision's layout: 7×7/2 stem, 3×3/2 max-pool, four
    stages of two basic blocks, 64-128-256-512 channels), with a 10-class head: 11.18M parameters in
    62 tensors."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# name -> (constructor, input shape of one sample, default per-rank batch, description)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, str]] = {
    "mlp4x256": (lambda: mlp(32, 256, 4), (32,), 64, "MLP 32-256-256-256-256-10"),
    "mlp20x512": (lambda: mlp(512, 512, 20), (512,), 32, "MLP 512-(512×20)-10"),
    "resnet18": (ResNet18, (3, 32, 32), 8, "ResNet-18 (BatchNorm), 3×32×32 inputs"),
}

# ---------------------------------------------------------------------------------------------- methods

LABELS = {
    "fp32": "horovod fp32",
    "fp16": "horovod fp16",
    "stock": "hvdquant stock dqsg s=1",
    "allgather": "hvdquant dqsg s=1 allgather",
    "scatter_reduce": "hvdquant dqsg s=1 scatter_reduce",
    "ddp": "ddp fp32 (gloo)",
    "powersgd": "ddp powersgd r=4 (gloo)",
    "ddp-dqsg": "ddp hvdquant hook dqsg s=1 (gloo)",
}
RUN_ORDER = ("fp32", "fp16", "ddp", "powersgd", "ddp-dqsg", "stock", "allgather", "scatter_reduce")  # slowest last
HOROVOD = ("fp32", "fp16", "stock", "allgather", "scatter_reduce")
DDP = ("ddp", "powersgd", "ddp-dqsg")
LEVELS, BUCKET = 1, 512


class Setup:
    """A model wrapped for one method: ``step()`` runs one training step, ``bits()`` the bits per
    coordinate and where they come from."""

    def __init__(self, model: nn.Module, opt, bits: Callable[[], tuple[float, str]],
                 mark: Callable[[], None] | None = None) -> None:
        self.model, self.opt, self.bits, self.mark = model, opt, bits, mark


def horovod_setup(method: str, model: nn.Module) -> Setup:
    import horovod.torch as hvd

    import hvdquant

    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    named = model.named_parameters()
    if method in ("fp32", "fp16"):
        comp = hvd.Compression.none if method == "fp32" else hvd.Compression.fp16
        opt = hvd.DistributedOptimizer(sgd, named_parameters=named, compression=comp)
        nominal = 32.0 if method == "fp32" else 16.0
        return Setup(model, opt, lambda: (nominal, "nominal"))
    if method == "stock":
        comp = hvdquant.Compression.dqsg(levels=LEVELS, bucket_size=BUCKET)
        opt = hvd.DistributedOptimizer(sgd, named_parameters=named, compression=comp)
        return Setup(model, opt, lambda: (comp.stats.bits_per_coordinate, "measured"))
    opt = hvdquant.DistributedOptimizer(sgd, named_parameters=named,
                                        codec=hvdquant.DQSG(levels=LEVELS, bucket_size=BUCKET), reducer=method)
    return Setup(model, opt, lambda: (opt.hvdquant_stats()["bits_per_coordinate"], "measured"))


class AllReduceCounter:
    """Counts the bytes handed to ``dist.all_reduce`` (PowerSGD's hook calls it for its P and Q
    matrices and its uncompressed tensors; DDP's own bucket allreduce does not go through it)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes = 0
        self._real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._real(tensor, *args, **kwargs)

        dist.all_reduce = counting


def ddp_setup(method: str, model: nn.Module, counter: AllReduceCounter, coords: int, steps: Callable[[], int]) -> Setup:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.nn.parallel import DistributedDataParallel

    import hvdquant

    if method == "ddp":  # DDP's defaults (25 MiB buckets, a 1 MiB first bucket)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        return Setup(ddp, opt, lambda: (32.0, "nominal"))
    if method == "ddp-dqsg":  # DDP's default buckets, hvdquant's hook over the summable allreduce
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        state = hvdquant.ddp.State(hvdquant.DQSG(LEVELS, BUCKET), "allreduce")
        ddp.register_comm_hook(state, hvdquant.ddp.hook)
        return Setup(ddp, opt, lambda: (state.statistics()["bits_per_coordinate"], "measured"))
    # PowerSGD gets one bucket: with several, its hook's chained allreduces (waited on inside gloo's
    # callback threads) start in different bucket orders on different ranks and deadlock (seen with
    # torch 2.13 on CPU at the ResNet-18's 45 MB; an explicit bucket_cap_mb also sets the first bucket's)
    ddp = DistributedDataParallel(model, bucket_cap_mb=math.ceil(4 * coords / 2**20) + 1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2,
                                   min_compression_rate=0.0, use_error_feedback=True, warm_start=True)
    ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    start = {"bytes": 0, "steps": 0}

    def bits() -> tuple[float, str]:  # over the timed steps only (the first two are plain allreduces)
        n = steps() - start["steps"]
        return (8.0 * (counter.bytes - start["bytes"]) / (n * coords) if n else float("nan")), "counted"

    return Setup(ddp, opt, bits, mark=lambda: start.update(bytes=counter.bytes, steps=steps()))


# ---------------------------------------------------------------------------------------------- timing


def machine() -> dict:
    import horovod

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "horovod": horovod.__version__}


def code_version() -> dict:
    """Which hvdquant was measured: the checkout's commit and a hash of hvdquant/ and kernels/ as they
    are on disk (uncommitted edits included), so rows from different code can be told apart."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted([*root.glob("hvdquant/**/*.py"), *root.glob("kernels/**/*.py")]):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "hvdquant", "kernels"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return {"git_head": head, "code_dirty": bool(dirty), "code_hash": h.hexdigest()[:12]}


def threads() -> dict:
    """The thread counts the ranks actually run with, and the variables that would set them."""
    out = {"torch_threads": torch.get_num_threads(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
           "HOROVOD_CYCLE_TIME": os.environ.get("HOROVOD_CYCLE_TIME")}
    try:
        import numba

        out["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        pass
    return out


def categories(stats: pstats.Stats, hvdq_roots: list[str]) -> dict[str, float]:
    """Own time (tottime) of every profiled function, summed by where it lives. Numba kernels run
    inside the Python function that calls them (cProfile does not see compiled dispatchers), so they
    count as hvdquant."""
    out: dict[str, float] = {}
    for (filename, _line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        f = filename.replace("\\", "/")
        if filename == "~":
            low = func.lower()
            if "horovod" in low and ("wait" in low or "poll" in low):
                key = "waiting for Horovod collectives"
            elif "horovod" in low:
                key = "Horovod (C++ calls)"
            elif "mpi4py" in low or "barrier" in low:
                key = "MPI (mpi4py)"
            elif "torch" in low or "run_backward" in low or "tensor" in low:
                key = "torch (forward/backward/optimizer kernels)"
            else:
                key = "other builtins"
        elif any(f.startswith(r) for r in hvdq_roots) or "/hvdquant/" in f:
            key = "hvdquant (Python + Numba kernels)"
        elif "/horovod/" in f:
            key = "Horovod (Python)"
        elif "/torch/" in f:
            key = "torch (Python)"
        elif "/numba/" in f:
            key = "numba (dispatch)"
        else:
            key = "other Python"
        out[key] = out.get(key, 0.0) + tt
    return out


def run_method(method: str, args: argparse.Namespace, comm, data, counter) -> dict:
    rank = comm.Get_rank()
    build, _, _, _ = MODELS[args.model]
    torch.manual_seed(0)
    model = build()
    coords = sum(p.numel() for p in model.parameters())
    done = {"steps": 0}
    if method in HOROVOD:
        setup = horovod_setup(method, model)
    else:
        setup = ddp_setup(method, model, counter, coords, lambda: done["steps"])
    x, y = data

    def step() -> None:
        setup.opt.zero_grad()
        F.cross_entropy(setup.model(x), y).backward()
        setup.opt.step()
        done["steps"] += 1

    for _ in range(args.warmup):
        step()
    if setup.mark is not None:  # PowerSGD's bytes are counted over the timed steps
        setup.mark()
    times = []
    for _ in range(args.steps):
        comm.Barrier()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    bits, source = setup.bits()
    medians = comm.allgather(statistics.median(times))
    bits_mean = comm.allreduce(bits) / comm.Get_size()
    row = {"method": LABELS[method], "key": method, "seconds_per_step": max(medians),
           "rank_medians": medians, "rank0_min": min(times), "rank0_max": max(times),
           "bits_per_coordinate": bits_mean, "bits_source": source}
    if rank == 0:
        print(f"{args.model:10s} P={comm.Get_size()} {args.link:9s} {LABELS[method]:34s} "
              f"{1e3 * row['seconds_per_step']:9.1f} ms/step  bits/coord {bits_mean:6.2f} ({source})  "
              f"rank medians {' '.join(f'{1e3 * m:.1f}' for m in medians)} ms", flush=True)
    if args.profile and method == "stock":
        row["profile"] = profile(step, args, comm)
    comm.Barrier()
    return row


def profile(step: Callable[[], None], args: argparse.Namespace, comm) -> str | None:
    """``--steps`` more steps, rank 0 under cProfile; writes the top entries and category sums."""
    rank = comm.Get_rank()
    prof = cProfile.Profile() if rank == 0 else None
    walls = []
    for _ in range(args.steps):
        comm.Barrier()
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        step()
        if prof is not None:
            prof.disable()
        walls.append(time.perf_counter() - t)
    if prof is None:
        return None
    stem = f"profile_{args.model}_P{comm.Get_size()}_{args.link}_stock"
    args.out.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(args.out / f"{stem}.pstats")
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    total = sum(tt for (_cc, _nc, tt, _ct, _c) in st.stats.values())  # type: ignore[attr-defined]
    buf.write(f"# {LABELS['stock']}, {args.model}, P={comm.Get_size()}, link {args.link}: rank 0, "
              f"{args.steps} steps under cProfile, median wall {1e3 * statistics.median(walls):.1f} ms/step "
              f"(profiled), {1e3 * total / args.steps:.1f} ms/step of profiled time\n")
    buf.write(f"# command: {args.command}\n\n## top 15 by cumulative time\n")
    st.sort_stats("cumulative").print_stats(15)
    buf.write("\n## top 15 by own time (tottime)\n")
    st.sort_stats("tottime").print_stats(15)
    roots = [str(Path(__file__).resolve().parents[1] / d) + "/" for d in ("hvdquant", "kernels")]
    cats = categories(st, roots)
    buf.write("\n## own time by where it lives (ms per step)\n")
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        buf.write(f"{1e3 * v / args.steps:10.1f}  {100 * v / total:5.1f}%  {k}\n")
    text = buf.getvalue()
    (args.out / f"{stem}.txt").write_text(text)
    st.stream = io.StringIO()  # type: ignore[attr-defined]
    top = []
    for func in st.sort_stats("cumulative").fcn_list[:15]:  # type: ignore[attr-defined]
        cc, nc, tt, ct, _ = st.stats[func]  # type: ignore[attr-defined]
        top.append({"function": pstats.func_std_string(func), "ncalls": nc, "tottime_ms_per_step":
                    1e3 * tt / args.steps, "cumtime_ms_per_step": 1e3 * ct / args.steps})
    mine = sorted(((f, v) for f, v in st.stats.items()  # type: ignore[attr-defined]
                   if any(f[0].startswith(r) for r in roots) or "/hvdquant/" in f[0]), key=lambda fv: -fv[1][2])
    own = [{"function": pstats.func_std_string(f), "ncalls": v[1], "tottime_ms_per_step": 1e3 * v[2] / args.steps,
            "cumtime_ms_per_step": 1e3 * v[3] / args.steps} for f, v in mine[:10]]
    (args.out / f"{stem}.json").write_text(json.dumps({
        "model": args.model, "ranks": comm.Get_size(), "link": args.link, "method": LABELS["stock"],
        "steps": args.steps, "median_wall_seconds": statistics.median(walls),
        "profiled_seconds_per_step": total / args.steps,
        "categories_seconds_per_step": {k: v / args.steps for k, v in cats.items()},
        "top_cumulative": top, "top_hvdquant_own": own, "command": args.command,
        "date": datetime.now().isoformat(timespec="seconds")}, indent=1))
    print(f"\n== cProfile of rank 0, {LABELS['stock']}, {args.model} P={comm.Get_size()} {args.link} "
          f"({args.out / (stem + '.txt')}):", flush=True)
    print(text, flush=True)
    return str(args.out / f"{stem}.txt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--link", required=True, help="label of the network, e.g. unlimited, 1gbit")
    p.add_argument("--methods", default=",".join(LABELS), help=f"comma-separated subset of {','.join(LABELS)}")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (PowerSGD compresses from the third)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=0, help="per-rank batch (0: the model's default)")
    p.add_argument("--profile", action="store_true", help="cProfile rank 0 over extra steps of the stock method")
    p.add_argument("--out", type=Path, default=Path("runs/bench_step"))
    p.add_argument("--command", default="", help="the command line that started the sweep (recorded)")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LABELS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {','.join(LABELS)}")
    methods = [m for m in RUN_ORDER if m in methods]
    if "powersgd" in methods and args.warmup < 3 and MPI.COMM_WORLD.Get_rank() == 0:
        print("warning: PowerSGD compresses from the third step; with --warmup < 3 plain allreduces are timed",
              flush=True)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if any(m in HOROVOD for m in methods):
        import horovod.torch as hvd

        hvd.init(comm=comm)
    counter = None
    if any(m in DDP for m in methods):
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29600")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(size)
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=size,
                                timeout=timedelta(minutes=10))
        counter = AllReduceCounter()
    build, shape, batch, desc = MODELS[args.model]
    batch = args.batch or batch
    probe = build()
    params = sum(p.numel() for p in probe.parameters())
    tensors = sum(1 for _ in probe.parameters())
    del probe
    gen = torch.Generator().manual_seed(1000 + rank)
    data = (torch.randn((batch, *shape), generator=gen), torch.randint(0, 10, (batch,), generator=gen))
    common = {"model": args.model, "model_description": desc, "parameters": params, "tensors": tensors,
              "batch_per_rank": batch, "ranks": size, "link": args.link, "warmup": args.warmup,
              "steps": args.steps, "command": args.command, **threads(),
              **({**machine(), **code_version()} if rank == 0 else {})}
    if rank == 0:
        unset = [v for v in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS") if os.environ.get(v) is not None]
        if unset:
            print(f"warning: {', '.join(unset)} set in the ranks' environment; the benchmark is meant to run "
                  "without them (launch/bench_step.sh unsets them)", flush=True)
        print(f"== {args.model} ({desc}: {params / 1e6:.2f}M parameters, {tensors} tensors, batch {batch}/rank), "
              f"P={size}, link {args.link}; torch threads {common['torch_threads']}, numba threads "
              f"{common.get('numba_threads')}", flush=True)
    path = args.out / f"step_{args.model}_P{size}_{args.link}.json"
    keep: list[dict] = []
    if rank == 0 and path.exists():
        keep = [r for r in json.loads(path.read_text())["rows"] if r.get("key") not in methods]
    rows: list[dict] = []
    for method in methods:
        t0 = time.perf_counter()
        try:
            row = run_method(method, args, comm, data, counter)
        except Exception as e:  # hvdquant raises on every rank together; record it and go on
            if rank == 0:
                traceback.print_exc()
            row = {"method": LABELS[method], "key": method, "error": f"{type(e).__name__}: {e}"}
        gc.collect()  # the method's model, optimizer and hooks
        row.update(common, date=datetime.now().isoformat(timespec="seconds"),
                   method_wall_seconds=time.perf_counter() - t0)
        rows.append(row)
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"rows": keep + rows}, indent=1))
    if counter is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
