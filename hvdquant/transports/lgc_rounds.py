"""One tensor's round of learned gradient compression, per stage (docs/ALGORITHMS.md §6).

- :func:`topk_round` (warm-up and training stages): every rank allgathers its top-k indices and
  values; during training rank 0 trains the autoencoder on every rank's values, and the last
  training exchange freezes it (broadcast to every rank).
- :func:`compress_round` (compression stage): the step's leader (rank step mod P) picks the
  indices; then :func:`ps_form` (parameter-server: the leader sends its latent code, the others
  their innovations against its decoding) or :func:`ring_form` (every rank's latent code at the
  leader's indices, summed in rank order and decoded once).

Each function starts the round and returns its finisher; the finisher updates the exchange's
float64 residual of the tensor. Every collective is an allgather of bytes and every sum runs in
rank order, so all ranks end bit-identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from hvdquant.codecs.base import as_bytes, split_bytes
from hvdquant.codecs.lgc import LGC, from_chunks, innovation, least_squares_gain, rebuild, to_chunks
from hvdquant.kernels import ops
from hvdquant.transports.collectives import Collectives, raise_if_poisoned
from hvdquant.transports.lgc_training import AutoencoderTraining


@dataclass(frozen=True)
class Round:
    """One tensor's exchange: its name, step, stage, the error-compensated gradient c = g + residual
    (float64, and as float32) and k = ⌈ratio·n⌉."""

    name: str
    step: int
    stage: str
    c: torch.Tensor
    c32: torch.Tensor
    k: int

    @property
    def n(self) -> int:
        return self.c32.numel()


class LGCHost(Protocol):
    """What a round uses of the exchange that runs it (:class:`~hvdquant.transports.lgc_exchange.LGCExchange`)."""

    cfg: LGC
    coll: Collectives
    training: AutoencoderTraining
    residuals: dict[str, torch.Tensor]
    codec_seconds: float

    def record(self, stage: str, coordinates: int, handed: int) -> None: ...

    def gather(self, r: Round, buf: torch.Tensor, part: str, coordinates: int = 0) -> list[torch.Tensor]: ...

    def output(self, mean: torch.Tensor) -> torch.Tensor: ...


def leader_layout(cfg: LGC, k: int) -> list:
    """The fields of the leader's buffer: indices, chunk scales and (parameter-server form) latents."""
    m = -(-k // cfg.chunk)
    zlen = m * cfg.latent_channels * (cfg.chunk // 16)
    layout = [("idx", torch.int32, k), ("scale", torch.float32, m), ("z", torch.float32, zlen)]
    return layout if cfg.form == "ps" else layout[:2]


def latent_shape(cfg: LGC, k: int) -> tuple[int, int, int]:
    """The shape of the latent code of k values: (chunks, channels, length)."""
    return (-(-k // cfg.chunk), cfg.latent_channels, cfg.chunk // 16)


# ---------------------------------------------------------------------- warm-up and training: top-k
def topk_round(ex: LGCHost, r: Round) -> Callable[[], torch.Tensor]:
    """Every rank's top-k of c, summed at their indices; rank 0 trains on them (training stage)."""
    idx = ops.topk_indices(r.c32, r.k)
    vals = r.c32[idx]
    started = ex.coll.allgather_bytes(as_bytes(idx.to(torch.int32), vals), f"hvdquant.lgc.{r.name}.topk")
    ex.record(r.stage, r.n, started.nbytes)
    sent = torch.zeros(r.n, dtype=torch.float64)
    sent[idx] = vals.double()
    ex.residuals[r.name] = r.c - sent

    def finish() -> torch.Tensor:
        out = torch.zeros(r.n, dtype=torch.float32)
        chunks = []
        for buf_p in raise_if_poisoned(started.wait(), r.name):
            f = split_bytes(buf_p, [("idx", torch.int32, r.k), ("vals", torch.float32, r.k)])
            out[f["idx"].long()] += f["vals"]
            chunks.append(to_chunks(f["vals"], ex.cfg.chunk)[0])
        training = ex.training
        if r.stage == "train" and not training.frozen:
            if ex.coll.rank == 0:
                training.train(torch.cat(chunks))
            if r.step == ex.cfg.warmup_steps + ex.cfg.train_steps - 1:
                training.freeze(ex.coll)
        return ex.output(out / ex.coll.size)

    return finish


# ---------------------------------------------------------------------- compression: the autoencoder
def compress_round(ex: LGCHost, r: Round) -> Callable[[], torch.Tensor]:
    """The leader's indices (and, parameter-server form, its latent code) to every rank; the finisher
    runs the form's second round."""
    cfg, ae = ex.cfg, ex.training.ae
    leader = r.step % ex.coll.size
    t0 = time.perf_counter()
    if ex.coll.rank == leader:
        idx = ops.topk_indices(r.c32, r.k)
        x, scale = to_chunks(r.c32[idx], cfg.chunk)
        z = torch.empty(0)
        if cfg.form == "ps":
            with torch.no_grad():
                z = ae.encode(x)
                scale = scale * least_squares_gain(x, ae.decode(z))  # ‖x − α·D(z)‖ ≤ ‖x‖
        buf = as_bytes(idx.to(torch.int32), scale, z)
    else:
        buf = torch.empty(0, dtype=torch.uint8)
    ex.codec_seconds += time.perf_counter() - t0
    started = ex.coll.allgather_bytes(buf, f"hvdquant.lgc.{r.name}.lead")
    ex.record(r.stage, r.n, started.nbytes)

    def finish() -> torch.Tensor:
        lead = split_bytes(raise_if_poisoned(started.wait(), r.name)[leader], leader_layout(cfg, r.k))
        idx = lead["idx"].long()
        if cfg.form == "ps":
            mean_v, own = ps_form(ex, r, idx, lead, leader)
        else:
            mean_v, own = ring_form(ex, r, idx, lead["scale"])
        out = torch.zeros(r.n, dtype=torch.float32)
        out[idx] = mean_v
        rebuilt = torch.zeros(r.n, dtype=torch.float64)
        rebuilt[idx] = own.double()
        ex.residuals[r.name] = r.c - rebuilt
        return ex.output(out)

    return finish


def ps_form(ex: LGCHost, r: Round, idx: torch.Tensor, lead: dict[str, torch.Tensor], leader: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter-server form: (mean of every rank's rebuilt values, this rank's own)."""
    ae, chunk = ex.training.ae, ex.cfg.chunk
    t0 = time.perf_counter()
    with torch.no_grad():
        base = from_chunks(ae.decode(lead["z"].view(latent_shape(ex.cfg, r.k))), lead["scale"], r.k)
    ki = ex.cfg.innovations(r.k)
    if ex.coll.rank != leader:
        beta, j, vals = innovation(r.c32[idx], base, chunk, ki)
        buf = as_bytes(j.to(torch.int32), vals, beta)
    else:
        buf = torch.empty(0, dtype=torch.uint8)
    ex.codec_seconds += time.perf_counter() - t0
    parts = ex.gather(r, buf, "innovation")
    total = torch.zeros(r.k, dtype=torch.float32)
    own = base
    layout = [("j", torch.int32, ki), ("val", torch.float32, ki), ("beta", torch.float32, -(-r.k // chunk))]
    for p, part in enumerate(parts):
        vp = base
        if p != leader:
            g = split_bytes(part, layout)
            vp = rebuild(base, g["beta"], g["j"].long(), g["val"], chunk)
        if p == ex.coll.rank:
            own = vp
        total += vp
    return total / ex.coll.size, own


def ring_form(ex: LGCHost, r: Round, idx: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring form: (decoded mean latent, this rank's own reconstruction)."""
    ae = ex.training.ae
    t0 = time.perf_counter()
    x, _ = to_chunks(r.c32[idx], ex.cfg.chunk, scale)
    with torch.no_grad():
        z = ae.encode(x)
        d = ae.decode(z)
        alpha = least_squares_gain(x, d)
        z = z * alpha.view(-1, 1, 1)  # D linear: D(α·z) = α·D(z)
        own = from_chunks(d * alpha.unsqueeze(1), scale, r.k)
    ex.codec_seconds += time.perf_counter() - t0
    zsum = torch.zeros_like(z)
    for part in ex.gather(r, as_bytes(z), "latent"):
        zsum += part.clone().view(torch.float32).view(z.shape)
    with torch.no_grad():
        mean_v = from_chunks(ae.decode(zsum / ex.coll.size), scale, r.k)
    return mean_v, own
