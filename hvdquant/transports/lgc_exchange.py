"""The exchange protocol of learned gradient compression (:mod:`hvdquant.codecs.lgc`, docs/ALGORITHMS.md §6).

:class:`LGCExchange` holds one optimizer's LGC state and starts each tensor's round by stage: the
top-k rounds of warm-up and training and the compression rounds in parameter-server or ring form
(:mod:`~hvdquant.transports.lgc_rounds`), the autoencoder and its training
(:mod:`~hvdquant.transports.lgc_training`). Every collective is an allgather of bytes (exact), and
every sum runs in rank order, so all ranks end bit-identical. Second rounds run inside the
callables the adapter invokes in sorted tensor-name order. Written against
:class:`~hvdquant.transports.collectives.Collectives`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from hvdquant.codecs.base import all_finite
from hvdquant.codecs.lgc import LGC
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import Collectives, check_finite_output, raise_if_poisoned, rank_order_sum
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.lgc_rounds import Round, compress_round, topk_round
from hvdquant.transports.lgc_training import AutoencoderTraining
from hvdquant.transports.payload import check_kind, statistics

STAGES = ("warmup", "train", "compress")


class LGCExchange:
    """State of one optimizer's LGC: the autoencoder and its training (``training``), this rank's
    float64 ``residuals`` per tensor, the bytes handed per stage (``stage_stats``) and the seconds
    spent in the autoencoder while compressing (``codec_seconds``)."""

    kind = "lgc"
    reducer = "allgather"

    def __init__(self, cfg: LGC, average: bool, collectives: Collectives) -> None:
        self.cfg, self.average, self.coll = cfg, average, collectives
        self.stats = CommStats()
        self.training = AutoencoderTraining(cfg)
        self.residuals: dict[str, torch.Tensor] = {}
        self.stage_stats = {stage: CommStats() for stage in STAGES}
        self.codec_seconds = 0.0

    def config(self) -> dict:
        # decoding gives the same bits on every rank only with the same torch thread count everywhere
        return {"codec": self.cfg.config(), "reducer": self.reducer, "average": self.average,
                "torch_threads": torch.get_num_threads()}

    def statistics(self) -> dict:
        t = self.training
        return {**statistics(self.stats, CommStats(), 0.0, DecodeStats()),  # no symbols, no nested decoding
                "lgc_stage_bits_per_coordinate": {stage: st.bits_per_coordinate
                                                  for stage, st in self.stage_stats.items() if st.coordinates},
                "lgc_autoencoder_parameters": t.parameters,
                "lgc_autoencoder_updates": t.updates, "lgc_frozen": t.frozen,
                "lgc_codec_seconds": self.codec_seconds,
                "lgc_last_train_loss": t.train_loss[-1] if t.train_loss else None}

    def state_dict(self) -> dict:
        """What a resumed run needs to continue bit for bit: the autoencoder and its Adam state (rank
        0's trained weights before the switch, the broadcast ones after), whether it is frozen, this
        rank's float64 residuals and the training record. Copies, so later steps do not change it."""
        t = self.training
        return copy.deepcopy({"kind": self.kind, "ae": t.ae.state_dict(), "adam": t.opt.state_dict(),
                              "frozen": t.frozen, "residuals": self.residuals, "ae_updates": t.updates,
                              "train_loss": t.train_loss})

    def load_state_dict(self, state: dict) -> None:
        check_kind(self.kind, state)
        state = copy.deepcopy(state)
        self.training.load_state_dict(state)
        self.residuals = state["residuals"]

    def record(self, stage: str, coordinates: int, handed: int) -> None:
        """Count bytes handed to the collectives, in total and for ``stage``."""
        self.stats.record(coordinates, handed)
        self.stage_stats[stage].record(coordinates, handed)

    def gather(self, r: Round, buf: torch.Tensor, part: str, coordinates: int = 0) -> list[torch.Tensor]:
        """Allgather this rank's ``buf`` (counted) and wait for every rank's."""
        started = self.coll.allgather_bytes(buf, f"hvdquant.lgc.{r.name}.{part}")
        self.record(r.stage, coordinates, started.nbytes)
        return raise_if_poisoned(started.wait(), r.name)

    def output(self, mean: torch.Tensor) -> torch.Tensor:
        """The mean over ranks as this exchange returns it (the sum where not ``average``), checked finite."""
        out = mean if self.average else mean * self.coll.size
        check_finite_output([out])
        return out

    def start(self, buffer: FusedBuffer) -> Callable[[], torch.Tensor]:
        """Start every segment's exchange; the finisher finishes them in segment order. LGC runs on
        the host (its autoencoder and top-k selection are CPU torch): a CUDA buffer is copied to host
        memory and the result back to its device."""
        flat = buffer.flat.detach().cpu() if buffer.flat.is_cuda else buffer.flat
        finishers = [self._start(s.name, flat[s.offset:s.end], s.key.step) if s.compressed
                     else self._start_raw(s.name, flat[s.offset:s.end]) for s in buffer.segments]

        def finish() -> torch.Tensor:
            return buffer.join([f() for f in finishers])

        return finish

    def send(self) -> None:
        """Nothing to send early: ``start`` starts each tensor's first round, and its later stages
        depend on the earlier ones' results (they run at the finisher)."""

    def _start(self, name: str, flat: torch.Tensor, step: int) -> Callable[[], torch.Tensor]:
        if not all_finite(flat):
            poisoned = self.coll.allgather_bytes(None, f"hvdquant.lgc.{name}")
            return lambda: raise_if_poisoned(poisoned.wait(), name)
        c = flat.double() + self.residuals.get(name, torch.zeros(flat.numel(), dtype=torch.float64))
        c32 = c.float()
        r = Round(name, step, self.cfg.stage(step), c, c32, self.cfg.k(c32.numel()))
        if r.stage == "compress" and not self.training.frozen:
            raise RuntimeError(f"LGC: '{name}' reached the compression stage but the autoencoder was never "
                               "trained and broadcast (step counters restored without the LGC state?)")
        return topk_round(self, r) if r.stage != "compress" else compress_round(self, r)

    def _start_raw(self, name: str, flat: torch.Tensor) -> Callable[[], torch.Tensor]:
        """An uncompressed tensor: allgathered and summed in rank order."""
        started = self.coll.allgather_bytes(flat.view(torch.uint8) if all_finite(flat) else None,
                                            f"hvdquant.lgc.{name}.raw")
        self.stats.record(flat.numel(), started.nbytes)

        def finish() -> torch.Tensor:
            total = rank_order_sum(raise_if_poisoned(started.wait(), name))
            return total / self.coll.size if self.average else total

        return finish
