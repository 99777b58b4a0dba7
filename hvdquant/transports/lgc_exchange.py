"""The exchange protocol of learned gradient compression over Horovod (hvdquant.codecs.lgc).

Every collective is an allgather of bytes (exact), and every sum runs in rank order, so all ranks
end bit-identical. Second rounds run inside the callables that ``hvdquant.DistributedOptimizer``
invokes in sorted parameter-name order.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch

from hvdquant.codecs.base import all_finite, flat32, split_bytes
from hvdquant.codecs.lgc import LGC, ChunkAutoencoder, from_chunks, innovation, least_squares_gain, rebuild, to_chunks
from hvdquant.kernels import ops
from hvdquant.stats import CommStats
from hvdquant.transports.horovod_payload import allgather_bytes, check_finite_output


def _hvd():
    import horovod.torch as hvd

    return hvd


def _bytes(*tensors: torch.Tensor) -> torch.Tensor:
    parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


class LGCExchange:
    """State of one optimizer's LGC: the autoencoder, residuals, stage statistics."""

    def __init__(self, cfg: LGC, average: bool, stats: CommStats) -> None:
        self.cfg, self.average, self.stats = cfg, average, stats
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.ae = ChunkAutoencoder(cfg)
        self.opt = torch.optim.Adam(self.ae.parameters(), lr=cfg.lr)
        self.frozen = False
        self.residuals: dict[str, torch.Tensor] = {}
        self.stage_bytes = {"warmup": 0, "train": 0, "compress": 0}
        self.stage_coordinates = {"warmup": 0, "train": 0, "compress": 0}
        self.ae_updates = 0
        self.train_loss: list[float] = []
        self.codec_seconds = 0.0

    def state_dict(self) -> dict:
        """What a resumed run needs to continue bit for bit: the autoencoder and its Adam state (rank
        0's trained weights before the switch, the broadcast ones after), whether it is frozen, this
        rank's float64 residuals and the training record. Copies, so later steps do not change it."""
        return copy.deepcopy({"ae": self.ae.state_dict(), "adam": self.opt.state_dict(), "frozen": self.frozen,
                              "residuals": self.residuals, "ae_updates": self.ae_updates,
                              "train_loss": self.train_loss})

    def load_state_dict(self, state: dict) -> None:
        state = copy.deepcopy(state)
        self.ae.load_state_dict(state["ae"])
        self.opt.load_state_dict(state["adam"])
        self.frozen, self.residuals = bool(state["frozen"]), state["residuals"]
        self.ae_updates, self.train_loss = int(state["ae_updates"]), list(state["train_loss"])
        self.ae.eval()

    @property
    def ae_parameters(self) -> int:
        return sum(p.numel() for p in self.ae.parameters())

    def _record(self, name: str, stage: str, n: int, *tensors: torch.Tensor) -> None:
        self.stats.record(name, n, *tensors)
        self.stage_bytes[stage] += sum(t.numel() * t.element_size() for t in tensors)
        self.stage_coordinates[stage] += n

    def _layout_leader(self, k: int) -> list:
        m = -(-k // self.cfg.chunk)
        zlen = m * self.cfg.latent_channels * (self.cfg.chunk // 16)
        return [("idx", torch.int32, k), ("scale", torch.float32, m), ("z", torch.float32, zlen)]

    def _latent_shape(self, k: int) -> tuple[int, int, int]:
        return (-(-k // self.cfg.chunk), self.cfg.latent_channels, self.cfg.chunk // 16)

    def _output(self, out: torch.Tensor, ranks: int, shape, dtype) -> torch.Tensor:
        out = out if self.average else out * ranks
        check_finite_output(out)
        return out.reshape(shape).to(dtype)

    def start(self, name: str, tensor: torch.Tensor, seed: int, step: int) -> Callable[[], torch.Tensor]:
        hvd = _hvd()
        rank, ranks = hvd.rank(), hvd.size()
        shape, dtype = tuple(tensor.shape), tensor.dtype
        flat = flat32(tensor)
        if not all_finite(flat):
            wait, _ = allgather_bytes(None, f"hvdquant.lgc.{name}")
            return wait
        c = flat.double() + self.residuals.get(name, torch.zeros(flat.numel(), dtype=torch.float64))
        c32 = c.float()
        n, k = c32.numel(), self.cfg.k(c32.numel())
        stage = self.cfg.stage(step)
        leader = step % ranks
        if stage == "compress" and not self.frozen:
            raise RuntimeError(f"LGC: '{name}' reached the compression stage but the autoencoder was never "
                               "trained and broadcast (step counters restored without the LGC state?)")
        if stage != "compress":
            return self._topk_round(name, c, c32, n, k, stage, step, rank, ranks, shape, dtype)
        t0 = time.perf_counter()
        if rank == leader:
            idx = ops.topk_indices(c32, k)
            x, scale = to_chunks(c32[idx], self.cfg.chunk)
            z = torch.empty(0)
            if self.cfg.form == "ps":
                with torch.no_grad():
                    z = self.ae.encode(x)
                    scale = scale * least_squares_gain(x, self.ae.decode(z))  # ‖x − α·D(z)‖ ≤ ‖x‖
            buf = _bytes(idx.to(torch.int32), scale, z)
        else:
            buf = torch.empty(0, dtype=torch.uint8)
        self.codec_seconds += time.perf_counter() - t0
        wait, size = allgather_bytes(buf, f"hvdquant.lgc.{name}.lead")
        self._record(name, stage, n, buf, size)

        def finish() -> torch.Tensor:
            parts = wait()
            lead = parts[leader]
            layout = self._layout_leader(k)
            if self.cfg.form == "ring":
                layout = layout[:2]
            f = split_bytes(lead, layout)
            idx = f["idx"].long()
            if self.cfg.form == "ps":
                mean_v, own = self._ps(name, c32, idx, f, k, rank, ranks, leader, stage)
            else:
                mean_v, own = self._ring(name, c32, idx, f["scale"], k, ranks, stage)
            out = torch.zeros(n, dtype=torch.float32)
            out[idx] = mean_v
            rebuilt = torch.zeros(n, dtype=torch.float64)
            rebuilt[idx] = own.double()
            self.residuals[name] = c - rebuilt
            return self._output(out, ranks, shape, dtype)

        return finish

    def _topk_round(self, name, c, c32, n, k, stage, step, rank, ranks, shape, dtype):
        idx = ops.topk_indices(c32, k)
        vals = c32[idx]
        buf = _bytes(idx.to(torch.int32), vals)
        wait, size = allgather_bytes(buf, f"hvdquant.lgc.{name}.topk")
        self._record(name, stage, n, buf, size)
        sent = torch.zeros(n, dtype=torch.float64)
        sent[idx] = vals.double()
        self.residuals[name] = c - sent

        def finish() -> torch.Tensor:
            parts = wait()
            out = torch.zeros(n, dtype=torch.float32)
            chunks = []
            for buf_p in parts:
                f = split_bytes(buf_p, [("idx", torch.int32, k), ("vals", torch.float32, k)])
                out[f["idx"].long()] += f["vals"]
                chunks.append(to_chunks(f["vals"], self.cfg.chunk)[0])
            if stage == "train" and not self.frozen:
                if rank == 0:
                    self._train(torch.cat(chunks))
                if step == self.cfg.warmup_steps + self.cfg.train_steps - 1:
                    self._freeze()
            return self._output(out / ranks, ranks, shape, dtype)

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
        hvd = _hvd()
        for i, p in enumerate(self.ae.parameters()):
            p.data.copy_(hvd.broadcast(p.data, root_rank=0, name=f"hvdquant.lgc.ae.{i}"))
        self.frozen = True
        self.ae.eval()

    def _ps(self, name, c32, idx, f, k, rank, ranks, leader, stage):
        t0 = time.perf_counter()
        with torch.no_grad():
            base = from_chunks(self.ae.decode(f["z"].view(self._latent_shape(k))), f["scale"], k)
        ki, chunk = self.cfg.innovations(k), self.cfg.chunk
        if rank != leader:
            beta, j, vals = innovation(c32[idx], base, chunk, ki)
            buf = _bytes(j.to(torch.int32), vals, beta)
        else:
            buf = torch.empty(0, dtype=torch.uint8)
        self.codec_seconds += time.perf_counter() - t0
        wait, size = allgather_bytes(buf, f"hvdquant.lgc.{name}.innovation")
        self._record(name, stage, 0, buf, size)
        parts = wait()
        total = torch.zeros(k, dtype=torch.float32)
        own = base
        layout = [("j", torch.int32, ki), ("val", torch.float32, ki), ("beta", torch.float32, -(-k // chunk))]
        for p in range(ranks):
            vp = base
            if p != leader:
                g = split_bytes(parts[p], layout)
                vp = rebuild(base, g["beta"], g["j"].long(), g["val"], chunk)
            if p == rank:
                own = vp
            total += vp
        return total / ranks, own

    def _ring(self, name, c32, idx, scale, k, ranks, stage):
        t0 = time.perf_counter()
        x, _ = to_chunks(c32[idx], self.cfg.chunk, scale)
        with torch.no_grad():
            z = self.ae.encode(x)
            d = self.ae.decode(z)
            alpha = least_squares_gain(x, d)
            z = z * alpha.view(-1, 1, 1)  # D linear: D(α·z) = α·D(z)
            own = from_chunks(d * alpha.unsqueeze(1), scale, k)
        self.codec_seconds += time.perf_counter() - t0
        zbuf = _bytes(z)
        wait, size = allgather_bytes(zbuf, f"hvdquant.lgc.{name}.latent")
        self._record(name, stage, 0, zbuf, size)
        parts = wait()
        zsum = torch.zeros_like(z)
        for buf_p in parts:
            zsum += buf_p.clone().view(torch.float32).view(z.shape)
        with torch.no_grad():
            mean_v = from_chunks(self.ae.decode(zsum / ranks), scale, k)
        return mean_v, own
