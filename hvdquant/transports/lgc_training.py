"""The autoencoder of learned gradient compression and its training (docs/ALGORITHMS.md §6).

Rank 0 trains the autoencoder during the training stage on every rank's top-k values; the last
training exchange broadcasts its weights to every rank (:meth:`AutoencoderTraining.freeze`), after
which every rank holds the same frozen autoencoder for the compression stage.
"""

from __future__ import annotations

import torch

from hvdquant.codecs.lgc import LGC, ChunkAutoencoder
from hvdquant.transports.collectives import Collectives


class AutoencoderTraining:
    """One optimizer's autoencoder ``ae`` (made from seed 0, alike on every rank), its Adam optimizer
    ``opt``, whether it is ``frozen`` (broadcast and no longer trained), the number of Adam steps
    taken (``updates``) and the loss after each training call (``train_loss``)."""

    def __init__(self, cfg: LGC) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.ae = ChunkAutoencoder(cfg)
        self.opt = torch.optim.Adam(self.ae.parameters(), lr=cfg.lr)
        self.frozen = False
        self.updates = 0
        self.train_loss: list[float] = []

    @property
    def parameters(self) -> int:
        """How many weights the autoencoder has."""
        return sum(p.numel() for p in self.ae.parameters())

    def train(self, x: torch.Tensor, iterations: int = 16) -> None:
        """Rank 0: a few Adam steps on the normalized chunks of every rank's top-k values."""
        self.ae.train()
        with torch.enable_grad():
            for _ in range(iterations):
                self.opt.zero_grad()
                loss = torch.nn.functional.mse_loss(self.ae.decode(self.ae.encode(x)), x)
                loss.backward()
                self.opt.step()
                self.updates += 1
        self.train_loss.append(float(loss.detach()))
        self.ae.eval()

    def freeze(self, coll: Collectives) -> None:
        """Stage switch: rank 0's weights to every rank, bit for bit (a collective, same order on all)."""
        for i, p in enumerate(self.ae.parameters()):
            p.data.copy_(coll.broadcast(p.data, 0, f"hvdquant.lgc.ae.{i}"))
        self.frozen = True
        self.ae.eval()

    def load_state_dict(self, state: dict) -> None:
        """Restore the training part of an LGC checkpoint (keys ``ae``, ``adam``, ``frozen``,
        ``ae_updates``, ``train_loss``; the caller passes a copy)."""
        self.ae.load_state_dict(state["ae"])
        self.opt.load_state_dict(state["adam"])
        self.frozen = bool(state["frozen"])
        self.updates, self.train_loss = int(state["ae_updates"]), list(state["train_loss"])
        self.ae.eval()
