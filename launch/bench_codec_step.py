"""hvdquant's codec work per training step, without collectives or other ranks.

    python launch/bench_codec_step.py [--job lm|cnn] [--steps 30] [--out runs/bench_codec_step.json]

One process runs, over the main job's gradient shapes, with collectives that hand back their input
at once (P = 1), the two exchanges Horovod users get: the stock path's summable exchange
(:class:`~hvdquant.transports.summed.SummedExchange`, as ``hvdquant.Compression.dqsg`` builds it,
groups of 1 MiB; and as ``hvdquant.Compression.ndqsg`` builds it, NDQSG (3, 1) with adaptive
nesting, whose side information is exact here: the gradients repeat and P = 1, so nesting turns on
and never fails) and the payload exchange of ``hvdquant.DistributedOptimizer``
(:class:`~hvdquant.transports.payload.PayloadExchange`, allgather, tensors below 1024 elements or
of one dimension uncompressed). What remains is hvdquant's own CPU work per step, in the hooks
(stock path: rotation, bucket maxima, and, with the maxima in, quantizing the groups' fields;
payload path: queueing) and in the finishers (stock path: decoding, rotating back; payload path:
encoding each fusion group, decoding, rotating back). Medians over ``--steps`` steps after 5
warm-up steps, the kernel launches per step (``ops.launches``) and torch's own operations per step
(``hvdquant.stats.TorchOperations``, counted in one more step, untimed; on a GPU each is a kernel
launch or a copy). Last, NDQSG's payload path
(``hvdquant.NDQSG()``, adaptive nesting, over the allgather of ``hvdquant.DistributedOptimizer``)
with P = 3 emulated senders: each sends the same gradients plus its own noise (σ = 5% of each
tensor's), all encoded here; timed are the nested-role sender's encoding of its fusion group
(column "hooks") and one receiver's rank-order decoding of all three (column "finishers"),
recovery replies answered from the senders' own payloads. A benchmark, not a test: it prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from hvdquant.codecs.base import TensorContext
from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.ndqsg import NDQSG
from hvdquant.codecs.state import CodecState
from hvdquant.examples.tasks import TASKS
from hvdquant.examples.train import parse_args
from hvdquant.kernels import ops
from hvdquant.stats import TorchOperations
from hvdquant.transports.collectives import Started
from hvdquant.transports.fused import compressible
from hvdquant.transports.groups import GROUP_THRESHOLD
from hvdquant.transports.nested_sum import NestedSum
from hvdquant.transports.payload import PayloadExchange
from hvdquant.transports.session import Session, dither_key
from hvdquant.transports.sum_schemes import DQSGSum
from hvdquant.transports.summed import SummedExchange


class Immediate:
    """Collectives of one rank: every result is the input, available at once."""

    rank, size = 0, 1

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> Started[torch.Tensor]:
        return Started(lambda: tensor.clone(), tensor.numel() * tensor.element_size())

    def allgather_bytes(self, buf, name: str) -> Started:
        return Started(lambda: [buf], 0 if buf is None else buf.numel())

    def alltoall_bytes(self, bufs, name: str) -> Started:
        return Started(lambda: bufs, 0)

    def allgather_object(self, obj, name: str) -> list:
        return [obj]


PATHS = ("stock", "stock-ndqsg", "payload")
PAYLOAD_MIN_NUMEL = 1024  # hvdquant.DistributedOptimizer's default


def time_steps(grads: list[tuple[str, torch.Tensor]], path: str, levels: int, rotation: str, steps: int) -> dict:
    if path.startswith("stock"):
        scheme = NestedSum((levels, 1), 512) if path == "stock-ndqsg" else DQSGSum(levels, 512, rotation=rotation)
        ex, min_numel = SummedExchange(scheme, False, Immediate(), GROUP_THRESHOLD), None
    else:
        ex, min_numel = PayloadExchange(DQSG(levels, 512, rotation=rotation), "allgather", True,
                                        Immediate()), PAYLOAD_MIN_NUMEL
    session = Session(ex, 1, "bench")
    session.agree()
    hooks, finishers, launches = [], [], []

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        handed = [ex.start(session.buffer([(name, g)], min_numel)) for name, g in reversed(grads)]  # backward order
        t1 = time.perf_counter()
        for finish in handed:
            finish()
        return t0, t1, time.perf_counter()

    for k in range(steps + 5):
        before = ops.launches["cpu"]
        t0, t1, t2 = step()
        if k >= 5:
            hooks.append(t1 - t0)
            finishers.append(t2 - t1)
            launches.append(ops.launches["cpu"] - before)
    with TorchOperations() as counted:
        step()
    return {"path": path, "levels": levels, "rotation": rotation, "hooks_ms": 1e3 * statistics.median(hooks),
            "finishers_ms": 1e3 * statistics.median(finishers), "launches": statistics.median(launches),
            "torch_ops": counted.count}


def answered(codec: NDQSG, payloads: list, ctx: TensorContext):
    """A tensor's recovery round answered by its senders' own payloads (what the allgather brings)."""
    return lambda failed: {p: codec.recovery_payload(payloads[p], ctx.sender(p), asked) for p, asked in failed.items()}


def time_nested_payload(grads: list[tuple[str, torch.Tensor]], steps: int, senders: int = 3) -> dict:
    """NDQSG's payload path among ``senders`` emulated senders (module docstring): the last sender's
    group encoding and the rank-order decoding of every sender's payloads, per step."""
    codec, state = NDQSG(), CodecState()
    tensors = [(name, g) for name, g in grads if compressible(g, PAYLOAD_MIN_NUMEL)]
    gen = torch.Generator().manual_seed(1)
    sent = [[g + 0.05 * g.std() * torch.randn(g.shape, generator=gen) for _, g in tensors] for _ in range(senders)]
    encodes, decodes, launches = [], [], []

    def step(k: int, counted: TorchOperations | None = None) -> tuple[float, float, float]:
        ctxs = [TensorContext(name, g.shape, dither_key(0, k, name, 0), senders, state) for name, g in tensors]
        by_sender = [codec.encode_group(sent[p], [c.sender(p) for c in ctxs]) for p in range(senders - 1)]
        with counted or contextlib.nullcontext():
            t0 = time.perf_counter()
            by_sender.append(codec.encode_group(sent[-1], [c.sender(senders - 1) for c in ctxs]))
            t1 = time.perf_counter()
            payloads = [[by_sender[p][i] for p in range(senders)] for i in range(len(tensors))]
            codec.aggregate_group(payloads, ctxs, [answered(codec, enc, c) for enc, c in zip(payloads, ctxs)])
            return t0, t1, time.perf_counter()

    for k in range(steps + 5):
        before = ops.launches["cpu"]
        t0, t1, t2 = step(k)
        if k >= 5:
            encodes.append(t1 - t0)
            decodes.append(t2 - t1)
            launches.append(ops.launches["cpu"] - before)
    counted = TorchOperations()
    step(steps + 5, counted)
    return {"path": f"payload-ndqsg (P={senders})", "levels": codec.levels[0], "rotation": codec.rotation,
            "hooks_ms": 1e3 * statistics.median(encodes), "finishers_ms": 1e3 * statistics.median(decodes),
            "launches": statistics.median(launches), "torch_ops": counted.count}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", choices=sorted(TASKS), default="lm")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("runs/bench_codec_step.json"))
    args = p.parse_args(argv)
    model = TASKS[args.job](parse_args(["--job", args.job]), 0, 1).model()  # loads the job's data too
    gen = torch.Generator().manual_seed(0)
    grads = [(name, torch.randn(q.shape, generator=gen)) for name, q in model.named_parameters()]
    coords = sum(g.numel() for _, g in grads)
    rows = [time_steps(grads, path, s, rotation, args.steps) for path in PATHS for s in (1, 3)
            for rotation in ("none", "hadamard") if path != "stock-ndqsg" or (s, rotation) == (3, "none")]
    rows.append(time_nested_payload(grads, args.steps))
    print(f"{args.job}: {len(grads)} gradient tensors, {coords} coordinates, one process, torch threads "
          f"{torch.get_num_threads()}")
    print("| path | DQSG (NDQSG: s₁) | rotation | hooks (ms/step) | finishers (ms/step) | total | "
          "kernel launches/step | torch ops/step |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | s={r['levels']} | {r['rotation']} | {r['hooks_ms']:.1f} | {r['finishers_ms']:.1f} | "
              f"{r['hooks_ms'] + r['finishers_ms']:.1f} | {r['launches']:g} | {r['torch_ops']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"job": args.job, "tensors": len(grads), "coordinates": coords, "rows": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
