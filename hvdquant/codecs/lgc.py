"""Learned gradient compression (docs/ALGORITHMS.md §6): the configuration and the autoencoder.

The paper's body was not available; the choices made here, and why:

- **What is learned.** The values of the top-k coordinates (k = ⌈ratio·n⌉), cut into chunks of
  ``chunk`` (64) values, each chunk divided by its max |value| (one float32 scale per chunk, sent),
  so one small model serves every tensor and every scale.
- **The autoencoder.** A lightweight 1-D convolutional encoder, four stride-2 convolutions down to
  ``latent_channels`` (4) channels (docs/ALGORITHMS.md's reading of "lightweight"): 64 values → 4×4 = 16
  latent floats, a 4× reduction of the values; the decoder mirrors it with transposed convolutions.
  Chunk length 64 ≥ 31 as docs/ALGORITHMS.md requires.
- **Stages** (per tensor, counted in exchanges): warm-up (``warmup_steps``: top-k with error
  feedback, allgathered); autoencoder training (``train_steps``: the same exchange, and rank 0
  trains the autoencoder with Adam on the normalized chunks of *every* rank's top-k values, which
  it has after the allgather); compression (afterwards: the frozen encoder). At the switch rank 0
  broadcasts the weights, so every rank holds the same bits; the switch step is fixed by the
  configuration, hence deterministic.
- **Parameter-server form** (``form="ps"``): a leader rotating with the step sends its top-k
  indices, chunk scales and latent code; every other rank sends only an "innovation": the
  ⌈innovation_ratio·k⌉ largest entries of its own values at the leader's indices minus the decoded
  leader values. Every rank rebuilds rank p's values as decoded leader values + p's innovation
  (the leader's are the decoded values) and averages in rank order. Both messages are made
  non-expansive, as in the ring form: the leader folds the least-squares gain α of its decoded
  chunks into the chunk scales it sends (no extra bytes), and every other rank scales the decoded
  leader values by its own per-chunk gain β before taking the difference, sending β (one float per
  chunk) with its innovation (:func:`innovation`, :func:`rebuild`). Without them error feedback
  diverged on the FC model within 60 steps of the switch (residuals ×1000), because a rank's values
  at the leader's indices need not resemble the leader's.
- **Ring form** (``form="ring"``): the leader fixes the index set and chunk scales; every rank
  encodes its own values at those indices with those scales; the latents are summed (gathered and
  summed in rank order: exact, unlike a float allreduce whose order may vary) and the decoder maps
  the mean latent to the average values. The paper assumes a near-linear decoder; here the ring
  form's decoder *is* linear (transposed convolutions, no activations, no bias: D), so
  D(mean_p z_p) = mean_p D(z_p) and every rank's error feedback (c_p − D(z_p)) accounts exactly
  for what the average missed, as in PowerSGD. A first version with the nonlinear decoder diverged
  on the main job's CNN a few dozen steps after the stage switch: D(mean z) was not the mean of
  what the residuals assumed had been sent. Each rank also scales its latent per chunk by the
  least-squares gain α = max(0, ⟨x, D(z)⟩ / ⟨D(z), D(z)⟩), so ‖x − α·D(z)‖ ≤ ‖x‖ (the compressor
  never adds energy, which error feedback needs) at no extra bytes: D is linear, so the sum of
  α_p·z_p still decodes to the mean of the α_p·D(z_p).
- **Error feedback** throughout: each rank keeps what its own reconstruction missed.

Every rank must run torch with the same number of threads (convolutions may sum in a different
order otherwise); :func:`hvdquant.DistributedOptimizer` checks it at the first exchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hvdquant.kernels import ops

FORMS = ("ps", "ring")


@dataclass(frozen=True)
class LGC:
    ratio: float = 0.01
    innovation_ratio: float = 0.1
    warmup_steps: int = 50
    train_steps: int = 50
    form: str = "ps"
    chunk: int = 64
    latent_channels: int = 4
    hidden_channels: int = 8
    lr: float = 5e-3

    scheme = "lgc"

    def __post_init__(self) -> None:
        for name in ("ratio", "innovation_ratio", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"LGC {name}={v!r} must be a number in (0, 1]")
        for name, lo in (("warmup_steps", 0), ("train_steps", 1), ("latent_channels", 1), ("hidden_channels", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"LGC {name}={v!r} must be an int >= {lo}")
        if self.form not in FORMS:
            raise ValueError(f"LGC form={self.form!r} must be one of {FORMS}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 32 or self.chunk % 16:
            raise ValueError(f"LGC chunk={self.chunk!r} must be a multiple of 16, at least 32")

    def config(self) -> dict:
        from dataclasses import asdict

        return {"scheme": self.scheme, **asdict(self)}

    def stage(self, step: int) -> str:
        """"warmup", "train" or "compress" for a tensor's ``step``-th exchange."""
        if step < self.warmup_steps:
            return "warmup"
        return "train" if step < self.warmup_steps + self.train_steps else "compress"

    def k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n)))

    def innovations(self, k: int) -> int:
        return min(k, max(1, math.ceil(self.innovation_ratio * k)))


class ChunkAutoencoder(nn.Module):
    """Four stride-2 Conv1d (1 → hidden → hidden → hidden → latent channels) and their mirror; the
    mirror is linear (no activations, no bias) in the ring form, whose latents are summed."""

    def __init__(self, cfg: LGC) -> None:
        super().__init__()
        h, z = cfg.hidden_channels, cfg.latent_channels
        conv = {"kernel_size": 4, "stride": 2, "padding": 1}
        self.encoder = nn.Sequential(nn.Conv1d(1, h, **conv), nn.ReLU(), nn.Conv1d(h, h, **conv), nn.ReLU(),
                                     nn.Conv1d(h, h, **conv), nn.ReLU(), nn.Conv1d(h, z, **conv))
        linear = cfg.form == "ring"
        widths = [(z, h), (h, h), (h, h), (h, 1)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(widths):
            layers.append(nn.ConvTranspose1d(a, b, bias=not linear, **conv))
            if not linear and i < len(widths) - 1:
                layers.append(nn.ReLU())
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.unsqueeze(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).squeeze(1)


def _rows(v: torch.Tensor, chunk: int) -> torch.Tensor:
    """v (k values) as zero-padded rows of ``chunk``."""
    m = -(-v.numel() // chunk)
    x = torch.zeros(m * chunk, dtype=v.dtype)
    x[: v.numel()] = v
    return x.view(m, chunk)


def to_chunks(v: torch.Tensor, chunk: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v (k values) → (normalized chunks (m, chunk), per-chunk scales (m,)); zero-padded at the end.
    With ``scale`` given (the leader's, in the ring form) those scales are used instead, and values
    beyond them are clipped to [−1, 1], the range the autoencoder was trained on: outside it the
    decoder extrapolates, and error feedback fed those errors back until training diverged (seen in
    the main job's CNN). What is clipped stays in the sender's residual."""
    x = _rows(v.to(torch.float32), chunk)
    if scale is None:
        scale = x.abs().amax(1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / safe.unsqueeze(1)).clamp_(-1.0, 1.0), scale


def least_squares_gain(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per row, α = max(0, ⟨x, d⟩ / ⟨d, d⟩) (0 where d = 0): the α ≥ 0 minimizing ‖x − α·d‖, so that
    ‖x − α·d‖ ≤ ‖x‖."""
    dd = (d * d).sum(1)
    xd = (x * d).sum(1)
    return torch.where(dd > 0, xd / torch.where(dd > 0, dd, torch.ones_like(dd)), torch.zeros_like(dd)).clamp_(min=0)


def from_chunks(x: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    return (x * scale.unsqueeze(1)).reshape(-1)[:k]


def innovation(values: torch.Tensor, base: torch.Tensor, chunk: int, ki: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A non-leader's message in the parameter-server form, for its ``values`` at the leader's indices
    and the decoded leader values ``base``: per chunk the gain β = max(0, ⟨v, b⟩ / ⟨b, b⟩) (one float
    per chunk), then the ``ki`` largest entries of v − β·b and their positions: (β, j, v[j] − β·b[j]).
    With β, ‖v − rebuild(...)‖ ≤ ‖v − β·b‖ ≤ ‖v‖: the message never adds energy, whatever the leader
    sent (with β = 1, a rank whose values disagree with the leader's kept ‖v − b‖ in its residual,
    and error feedback grew it until training diverged)."""
    b = _rows(base, chunk)
    beta = least_squares_gain(_rows(values, chunk), b)
    diff = values - from_chunks(b, beta, values.numel())
    j = ops.topk_indices(diff.contiguous(), ki)  # ties to the lower index: every rank agrees
    return beta, j, diff[j]


def rebuild(base: torch.Tensor, beta: torch.Tensor, j: torch.Tensor, vals: torch.Tensor, chunk: int) -> torch.Tensor:
    """β·base per chunk with the innovation added at ``j``: a non-leader's values as every rank sees them."""
    v = from_chunks(_rows(base, chunk), beta, base.numel())  # a new tensor: safe to add into
    v[j] += vals
    return v
