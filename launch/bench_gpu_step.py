"""GPU step benchmark: time per DDP training step of realistically sized models on synthetic data,
hvdquant's hooks beside PyTorch's own (fp32, fp16, PowerSGD) in the same run, with hvdquant's own
GPU time per step (the codec), its share of the step and its kernel launches per step.

    torchrun --nproc_per_node P launch/bench_gpu_step.py --model resnet50|gpt2 [--methods a,b] [--out DIR]
    python launch/bench_gpu_step.py report --runs DIR       # the table of every run in DIR (and JSON)
    bash launch/bench_gpu_step.sh                           # both models at P = 1 and 4, then the report

Models: ``resnet50`` (the torchvision layout: bottleneck blocks [3, 4, 6, 3], BatchNorm, 25.6M
parameters in 161 tensors; 3×--image² inputs, 1000 classes) and ``gpt2`` (GPT-2 small's shape:
12 blocks of width 768 and 12 heads, 50257 tokens, 124M parameters; --context tokens). Per method
the ranks train a fresh copy of the same model (seeded; DDP broadcasts rank 0's weights) for
--warmup steps, then time --steps steps, each between two ``torch.cuda.synchronize`` (median over
the steps, rank 0's clock). The codec's time per step is measured apart, on rank 0 after the DDP
runs: the method's exchange over the model's gradients, in DDP's buckets (25 MiB, reverse
parameter order), with collectives that hand back their input at once, so what remains is
hvdquant's own work (encode and decode), synchronised; its share is that time over the method's
DDP step time. Launches: hvdquant's kernel launches per step during that pass (``ops.launches``),
and torch's operations per step (``hvdquant.stats.TorchOperations``, counted in one more pass,
untimed: each is a kernel launch or a copy on the GPU).
Ranks share one GPU over Gloo when there are more ranks than GPUs (NCCL refuses that), as
launch/gpu_e2e.sh does.

``--dry-run``: small shapes on the CPU (a check that the script runs end to end, not a
measurement). A benchmark, not a test: it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hvdquant.kernels import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_codec_step import Immediate  # noqa: E402 (beside this script: one process's collectives)

#: method -> the main job's flags (``--framework ddp``)
METHODS: dict[str, list[str]] = {
    "fp32": ["--compression", "none"],
    "fp16": ["--compression", "fp16"],
    "powersgd-r4": ["--compression", "powersgd", "--powersgd-rank", "4"],
    "dqsg-s1": ["--compression", "dqsg", "--levels", "1", "--reducer", "allreduce"],
    "dqsg-s3-rot": ["--compression", "dqsg", "--levels", "3", "--rotation", "hadamard", "--reducer", "allreduce"],
    "ecdq-1.1": ["--compression", "ecdq", "--step", "1.1", "--reducer", "allgather"],
}
BUCKET_BYTES = 25 << 20  # DDP's default bucket cap


# ----------------------------------------------------------------------------- models
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.down(x))


class ResNet50(nn.Module):
    """ResNet-50 (bottleneck blocks [3, 4, 6, 3]); ``base`` 64 is the real one (25.6M parameters)."""

    def __init__(self, base: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], base
        for i, blocks in enumerate([3, 4, 6, 3]):
            width = base * 2 ** i
            for b in range(blocks):
                layers.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1))
                cin = 4 * width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def build(model: str, dry: bool, args: argparse.Namespace) -> tuple[nn.Module, Callable]:
    """(the model, a function of (model, step) giving this step's loss on synthetic data)."""
    from hvdquant.examples.gpt import ByteGPT

    if model == "resnet50":
        net, size, classes = (ResNet50(8, 10), 32, 10) if dry else (ResNet50(), args.image, 1000)

        def loss(m: nn.Module, step: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(step)
            x = torch.randn(args.batch, 3, size, size, generator=g).to(args.device)
            y = torch.randint(0, classes, (args.batch,), generator=g).to(args.device)
            return F.cross_entropy(m(x), y)

        return net, loss
    shape = dict(layers=2, width=64, heads=4, context=32, vocabulary=512) if dry else \
        dict(layers=12, width=768, heads=12, context=args.context, vocabulary=50257)
    net = ByteGPT(**shape)

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, shape["vocabulary"], (args.batch, shape["context"] + 1), generator=g).to(args.device)
        logits = m(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    return net, loss


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ddp_steps(method: str, args: argparse.Namespace) -> dict:
    """The method's median DDP step time (rank 0's), and the bits it handed over."""
    from hvdquant.examples.frameworks import DDPJob
    from hvdquant.examples.train import parse_args

    flags = parse_args(["--framework", "ddp", "--device", args.device.type, "--seed", "0", *METHODS[method]])
    job = DDPJob(flags)
    torch.manual_seed(0)
    model, loss = build(args.model, args.dry_run, args)
    model = model.to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    ddp, opt, report = job.wrap(flags, model, opt)
    times = []
    for step in range(args.warmup + args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss(ddp, step).backward()
        opt.step()
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    stats = report()
    return {"step_s": statistics.median(times), "bits_per_coordinate": stats.get("bits_per_coordinate"),
            "replicas_identical": job.identical(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))}


def ddp_buckets(model: nn.Module) -> list[list[tuple[str, torch.Tensor]]]:
    """The parameters in reverse order, cut into buckets of at most 25 MiB (DDP's default cap)."""
    buckets: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, p in reversed(list(model.named_parameters())):
        if buckets[-1] and size + 4 * p.numel() > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append((name, p))
        size += 4 * p.numel()
    return buckets


def codec_steps(method: str, args: argparse.Namespace, repeats: int) -> dict:
    """hvdquant's own time and kernel launches per step: the method's exchange over the model's
    gradients (random, in DDP's buckets) with collectives that return at once, synchronised."""
    from hvdquant.examples.frameworks import make_codec
    from hvdquant.examples.train import parse_args
    from hvdquant.stats import TorchOperations
    from hvdquant.transports.exchange import make_exchange
    from hvdquant.transports.session import Session

    flags = parse_args(["--framework", "ddp", *METHODS[method]])
    ex = make_exchange(make_codec(flags), flags.reducer, True, Immediate())
    session = Session(ex, 0, "bench")
    session.agree()
    model, _ = build(args.model, args.dry_run, args)
    buckets = [[(name, torch.randn(p.shape, device=args.device)) for name, p in bucket]
               for bucket in ddp_buckets(model)]
    times, launches = [], []
    target = "cuda" if args.device.type == "cuda" else "cpu"

    def step() -> None:
        finishers = []
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for _, g in bucket])
            parts = flat.split([g.numel() for _, g in bucket])
            fused = session.buffer([(name, part.view(g.shape)) for (name, g), part in zip(bucket, parts)], 1024, flat)
            finishers.append(ex.start(fused))
            ex.send()
        for finish in finishers:
            finish()

    for k in range(2 + repeats):
        sync(args.device)
        before = ops.launches[target]
        t0 = time.perf_counter()
        step()
        sync(args.device)
        if k >= 2:
            times.append(time.perf_counter() - t0)
            launches.append(ops.launches[target] - before)
    with TorchOperations() as counted:
        step()
    return {"codec_s": statistics.median(times), "launches_per_step": statistics.median(launches),
            "torch_ops_per_step": counted.count, "tensors": sum(len(b) for b in buckets), "buckets": len(buckets)}


def run(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    rows = []
    for method in methods:
        row = {"method": method, **ddp_steps(method, args)}
        rows.append(row)
        if dist.get_rank() == 0:
            print(f"{args.model} P={dist.get_world_size()} {method}: {row['step_s'] * 1e3:.1f} ms/step", flush=True)
    if dist.get_rank() == 0:
        for row in rows:
            if row["method"] not in ("fp32", "fp16", "powersgd-r4"):
                row.update(codec_steps(row["method"], args, args.steps))
                row["codec_share"] = row["codec_s"] / row["step_s"]
        model, _ = build(args.model, args.dry_run, args)
        out = {"model": args.model, "ranks": dist.get_world_size(), "device": device_name(args.device),
               "parameters": sum(p.numel() for p in model.parameters()),
               "tensors": sum(1 for _ in model.parameters()), "dry_run": args.dry_run,
               "batch": args.batch, "steps": args.steps, "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"gpu_step_{args.model}_P{dist.get_world_size()}.json"
        path.write_text(json.dumps(out, indent=1))
        print(table([out]))
    # every rank waits for rank 0's codec pass, then leaves the group: a rank that exits while
    # another still holds the group aborts in Gloo's teardown
    dist.barrier()
    dist.destroy_process_group()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def table(runs: list[dict]) -> str:
    lines = ["| model | P | method | ms/step | × fp16 | bits/coord | codec ms/step | codec share | launches/step "
             "(tensors) | torch ops/step | replicas |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        fp16 = next((x["step_s"] for x in r["rows"] if x["method"] == "fp16"), None)
        for x in r["rows"]:
            codec = f"{x['codec_s'] * 1e3:.1f}" if "codec_s" in x else "–"
            share = f"{100 * x['codec_share']:.0f}%" if "codec_share" in x else "–"
            launches = f"{x['launches_per_step']:g} ({x['tensors']})" if "launches_per_step" in x else "–"
            torch_ops = str(x["torch_ops_per_step"]) if "torch_ops_per_step" in x else "–"
            ratio = f"{x['step_s'] / fp16:.2f}" if fp16 else "–"
            bits = f"{x['bits_per_coordinate']:.2f}" if x.get("bits_per_coordinate") else "–"
            replicas = "identical" if x["replicas_identical"] else "DIFFER"
            lines.append(f"| {r['model']} | {r['ranks']} | {x['method']} | {x['step_s'] * 1e3:.1f} | {ratio} | {bits} "
                         f"| {codec} | {share} | {launches} | {torch_ops} | {replicas} |")
    return "\n".join(lines)


def report(runs: Path) -> None:
    found = [json.loads(p.read_text()) for p in sorted(runs.glob("gpu_step_*.json"))]
    if not found:
        raise SystemExit(f"no gpu_step_*.json in {runs}")
    print(f"device: {found[0]['device']}{' (dry run)' if found[0]['dry_run'] else ''}")
    print(table(found))
    (runs / "gpu_step.json").write_text(json.dumps(found, indent=1))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        p = argparse.ArgumentParser(description="the table of every gpu_step_*.json in --runs")
        p.add_argument("--runs", type=Path, default=Path("runs/bench_gpu_step"))
        report(p.parse_args(argv[1:]).runs)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["resnet50", "gpt2"], default="resnet50")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="per rank (resnet50 32, gpt2 4; dry run 2)")
    p.add_argument("--image", type=int, default=224, help="resnet50: input side")
    p.add_argument("--context", type=int, default=512, help="gpt2: tokens per sequence")
    p.add_argument("--dry-run", action="store_true", help="small shapes on the CPU: a check that it runs")
    p.add_argument("--out", type=Path, default=Path("runs/bench_gpu_step"))
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 2 if args.dry_run else {"resnet50": 32, "gpt2": 4}[args.model]
    import hvdquant

    hvdquant.ddp.init_from_env("gloo")
    args.device = torch.device("cpu") if args.dry_run or not torch.cuda.is_available() else \
        torch.device("cuda", torch.cuda.current_device())
    run(args)


if __name__ == "__main__":
    main()
