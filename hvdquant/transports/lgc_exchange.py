"""The exchange protocol of learned gradient compression (:mod:`hvdquant.codecs.lgc`, docs/ALGORITHMS.md §6).

Every collective is an allgather of bytes (exact), and every sum runs in rank order, so all ranks
end bit-identical. Second rounds run inside the callables the adapter invokes in sorted
tensor-name order. Written against :class:`~hvdquant.transports.collectives.Collectives`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hvdquant.codecs.base import all_finite, as_bytes, split_bytes
from hvdquant.codecs.lgc import LGC, ChunkAutoencoder, from_chunks, innovation, least_squares_gain, rebuild, to_chunks
from hvdquant.kernels import ops
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import Collectives, check_finite_output, raise_if_poisoned
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.payload import check_kind, rank_order_sum, statistics

STAGES = ("warmup", "train", "compress")


@dataclass(frozen=True)
class _Round:
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


class LGCExchange:
    """State of one optimizer's LGC: the autoencoder, residuals, stage statistics."""

    kind = "lgc"
    reducer = "allgather"

    def __init__(self, cfg: LGC, average: bool, collectives: Collectives) -> None:
        self.cfg, self.average, self.coll = cfg, average, collectives
        self.stats = CommStats()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.ae = ChunkAutoencoder(cfg)
        self.opt = torch.optim.Adam(self.ae.parameters(), lr=cfg.lr)
        self.frozen = False
        self.residuals: dict[str, torch.Tensor] = {}
        self.stage_stats = {stage: CommStats() for stage in STAGES}
        self.ae_updates = 0
        self.train_loss: list[float] = []
        self.codec_seconds = 0.0

    def config(self) -> dict:
        # decoding gives the same bits on every rank only with the same torch thread count everywhere
        return {"codec": self.cfg.config(), "reducer": self.reducer, "average": self.average,
                "torch_threads": torch.get_num_threads()}

    def statistics(self) -> dict:
        return {**statistics(self.stats, CommStats(), 0.0, DecodeStats()),  # no symbols, no nested decoding
                "lgc_stage_bits_per_coordinate": {stage: st.bits_per_coordinate
                                                  for stage, st in self.stage_stats.items() if st.coordinates},
                "lgc_autoencoder_parameters": sum(p.numel() for p in self.ae.parameters()),
                "lgc_autoencoder_updates": self.ae_updates, "lgc_frozen": self.frozen,
                "lgc_codec_seconds": self.codec_seconds,
                "lgc_last_train_loss": self.train_loss[-1] if self.train_loss else None}

    def state_dict(self) -> dict:
        """What a resumed run needs to continue bit for bit: the autoencoder and its Adam state (rank
        0's trained weights before the switch, the broadcast ones after), whether it is frozen, this
        rank's float64 residuals and the training record. Copies, so later steps do not change it."""
        return copy.deepcopy({"kind": self.kind, "ae": self.ae.state_dict(), "adam": self.opt.state_dict(),
                              "frozen": self.frozen, "residuals": self.residuals, "ae_updates": self.ae_updates,
                              "train_loss": self.train_loss})

    def load_state_dict(self, state: dict) -> None:
        check_kind(self.kind, state)
        state = copy.deepcopy(state)
        self.ae.load_state_dict(state["ae"])
        self.opt.load_state_dict(state["adam"])
        self.frozen, self.residuals = bool(state["frozen"]), state["residuals"]
        self.ae_updates, self.train_loss = int(state["ae_updates"]), list(state["train_loss"])
        self.ae.eval()

    def _record(self, stage: str, coordinates: int, handed: int) -> None:
        self.stats.record(coordinates, handed)
        self.stage_stats[stage].record(coordinates, handed)

    def _gather(self, r: _Round, buf: torch.Tensor, part: str, coordinates: int = 0) -> list[torch.Tensor]:
        """Allgather this rank's ``buf`` (counted) and wait for every rank's."""
        started = self.coll.allgather_bytes(buf, f"hvdquant.lgc.{r.name}.{part}")
        self._record(r.stage, coordinates, started.nbytes)
        return raise_if_poisoned(started.wait(), r.name)

    def _layout_leader(self, k: int) -> list:
        m = -(-k // self.cfg.chunk)
        zlen = m * self.cfg.latent_channels * (self.cfg.chunk // 16)
        layout = [("idx", torch.int32, k), ("scale", torch.float32, m), ("z", torch.float32, zlen)]
        return layout if self.cfg.form == "ps" else layout[:2]

    def _latent_shape(self, k: int) -> tuple[int, int, int]:
        return (-(-k // self.cfg.chunk), self.cfg.latent_channels, self.cfg.chunk // 16)

    def _output(self, mean: torch.Tensor) -> torch.Tensor:
        out = mean if self.average else mean * self.coll.size
        check_finite_output(out)
        return out

    def start(self, buffer: FusedBuffer) -> Callable[[], torch.Tensor]:
        """Start every segment's exchange; the finisher finishes them in segment order. LGC runs on
        the host (its autoencoder and top-k selection are CPU torch): a CUDA buffer is copied to host
        memory and the result back to its device."""
        flat = buffer.flat.detach().cpu() if buffer.flat.is_cuda else buffer.flat
        finishers = [(s, self._start(s.name, flat[s.offset:s.end], s.key.step) if s.compressed
                      else self._start_raw(s.name, flat[s.offset:s.end])) for s in buffer.segments]

        def finish() -> torch.Tensor:
            out = torch.empty(buffer.numel, dtype=torch.float32)
            for s, f in finishers:
                out[s.offset:s.end] = f()
            return out.to(buffer.device)

        return finish

    def _start(self, name: str, flat: torch.Tensor, step: int) -> Callable[[], torch.Tensor]:
        if not all_finite(flat):
            poisoned = self.coll.allgather_bytes(None, f"hvdquant.lgc.{name}")
            return lambda: raise_if_poisoned(poisoned.wait(), name)
        c = flat.double() + self.residuals.get(name, torch.zeros(flat.numel(), dtype=torch.float64))
        c32 = c.float()
        r = _Round(name, step, self.cfg.stage(step), c, c32, self.cfg.k(c32.numel()))
        if r.stage == "compress" and not self.frozen:
            raise RuntimeError(f"LGC: '{name}' reached the compression stage but the autoencoder was never "
                               "trained and broadcast (step counters restored without the LGC state?)")
        return self._topk_round(r) if r.stage != "compress" else self._compress_round(r)

    def _start_raw(self, name: str, flat: torch.Tensor) -> Callable[[], torch.Tensor]:
        """An uncompressed tensor: allgathered and summed in rank order."""
        started = self.coll.allgather_bytes(flat.view(torch.uint8) if all_finite(flat) else None,
                                            f"hvdquant.lgc.{name}.raw")
        self.stats.record(flat.numel(), started.nbytes)

        def finish() -> torch.Tensor:
            total = rank_order_sum(raise_if_poisoned(started.wait(), name))
            return total / self.coll.size if self.average else total

        return finish

    # ------------------------------------------------------------------ warm-up and training: top-k
    def _topk_round(self, r: _Round) -> Callable[[], torch.Tensor]:
        idx = ops.topk_indices(r.c32, r.k)
        vals = r.c32[idx]
        started = self.coll.allgather_bytes(as_bytes(idx.to(torch.int32), vals), f"hvdquant.lgc.{r.name}.topk")
        self._record(r.stage, r.n, started.nbytes)
        sent = torch.zeros(r.n, dtype=torch.float64)
        sent[idx] = vals.double()
        self.residuals[r.name] = r.c - sent

        def finish() -> torch.Tensor:
            out = torch.zeros(r.n, dtype=torch.float32)
            chunks = []
            for buf_p in raise_if_poisoned(started.wait(), r.name):
                f = split_bytes(buf_p, [("idx", torch.int32, r.k), ("vals", torch.float32, r.k)])
                out[f["idx"].long()] += f["vals"]
                chunks.append(to_chunks(f["vals"], self.cfg.chunk)[0])
            if r.stage == "train" and not self.frozen:
                if self.coll.rank == 0:
                    self._train(torch.cat(chunks))
                if r.step == self.cfg.warmup_steps + self.cfg.train_steps - 1:
                    self._freeze()
            return self._output(out / self.coll.size)

        return finish

    def _train(self, x: torch.Tensor, iterations: int = 16) -> None:
        """Rank 0: a few Adam steps on the normalized chunks of every rank's top-k values."""
        self.ae.train()
        with torch.enable_grad():
            for _ in range(iterations):
                self.opt.zero_grad()
                loss = torch.nn.functional.mse_loss(self.ae.decode(self.ae.encode(x)), x)
                loss.backward()
                self.opt.step()
                self.ae_updates += 1
        self.train_loss.append(float(loss.detach()))
        self.ae.eval()

    def _freeze(self) -> None:
        """Stage switch: rank 0's weights to every rank, bit for bit (a collective, same order on all)."""
        for i, p in enumerate(self.ae.parameters()):
            p.data.copy_(self.coll.broadcast(p.data, 0, f"hvdquant.lgc.ae.{i}"))
        self.frozen = True
        self.ae.eval()

    # ------------------------------------------------------------------ compression: the autoencoder
    def _compress_round(self, r: _Round) -> Callable[[], torch.Tensor]:
        leader = r.step % self.coll.size
        t0 = time.perf_counter()
        if self.coll.rank == leader:
            idx = ops.topk_indices(r.c32, r.k)
            x, scale = to_chunks(r.c32[idx], self.cfg.chunk)
            z = torch.empty(0)
            if self.cfg.form == "ps":
                with torch.no_grad():
                    z = self.ae.encode(x)
                    scale = scale * least_squares_gain(x, self.ae.decode(z))  # ‖x − α·D(z)‖ ≤ ‖x‖
            buf = as_bytes(idx.to(torch.int32), scale, z)
        else:
            buf = torch.empty(0, dtype=torch.uint8)
        self.codec_seconds += time.perf_counter() - t0
        started = self.coll.allgather_bytes(buf, f"hvdquant.lgc.{r.name}.lead")
        self._record(r.stage, r.n, started.nbytes)

        def finish() -> torch.Tensor:
            lead = split_bytes(raise_if_poisoned(started.wait(), r.name)[leader], self._layout_leader(r.k))
            idx = lead["idx"].long()
            if self.cfg.form == "ps":
                mean_v, own = self._ps(r, idx, lead, leader)
            else:
                mean_v, own = self._ring(r, idx, lead["scale"])
            out = torch.zeros(r.n, dtype=torch.float32)
            out[idx] = mean_v
            rebuilt = torch.zeros(r.n, dtype=torch.float64)
            rebuilt[idx] = own.double()
            self.residuals[r.name] = r.c - rebuilt
            return self._output(out)

        return finish

    def _ps(self, r: _Round, idx: torch.Tensor, lead: dict[str, torch.Tensor], leader: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameter-server form: (mean of every rank's rebuilt values, this rank's own)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            base = from_chunks(self.ae.decode(lead["z"].view(self._latent_shape(r.k))), lead["scale"], r.k)
        ki, chunk = self.cfg.innovations(r.k), self.cfg.chunk
        if self.coll.rank != leader:
            beta, j, vals = innovation(r.c32[idx], base, chunk, ki)
            buf = as_bytes(j.to(torch.int32), vals, beta)
        else:
            buf = torch.empty(0, dtype=torch.uint8)
        self.codec_seconds += time.perf_counter() - t0
        parts = self._gather(r, buf, "innovation")
        total = torch.zeros(r.k, dtype=torch.float32)
        own = base
        layout = [("j", torch.int32, ki), ("val", torch.float32, ki), ("beta", torch.float32, -(-r.k // chunk))]
        for p, part in enumerate(parts):
            vp = base
            if p != leader:
                g = split_bytes(part, layout)
                vp = rebuild(base, g["beta"], g["j"].long(), g["val"], chunk)
            if p == self.coll.rank:
                own = vp
            total += vp
        return total / self.coll.size, own

    def _ring(self, r: _Round, idx: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ring form: (decoded mean latent, this rank's own reconstruction)."""
        t0 = time.perf_counter()
        x, _ = to_chunks(r.c32[idx], self.cfg.chunk, scale)
        with torch.no_grad():
            z = self.ae.encode(x)
            d = self.ae.decode(z)
            alpha = least_squares_gain(x, d)
            z = z * alpha.view(-1, 1, 1)  # D linear: D(α·z) = α·D(z)
            own = from_chunks(d * alpha.unsqueeze(1), scale, r.k)
        self.codec_seconds += time.perf_counter() - t0
        zsum = torch.zeros_like(z)
        for part in self._gather(r, as_bytes(z), "latent"):
            zsum += part.clone().view(torch.float32).view(z.shape)
        with torch.no_grad():
            mean_v = from_chunks(self.ae.decode(zsum / self.coll.size), scale, r.k)
        return mean_v, own
