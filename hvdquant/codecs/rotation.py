"""The shared random rotation a codec applies before quantizing (docs/ALGORITHMS.md §10).

``Rotation("hadamard", d)`` rotates each bucket of d coordinates by the randomized Hadamard
transform whose signs every rank draws from (seed, step, tensor) of the dither key; ``"none"`` is
the identity. DQSG and NDQSG hold one and quantize ``rotate(g)``; a reconstruction, or a mean of
several (the rotation is linear and shared), goes back through ``unrotate`` once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hvdquant.kernels import DitherKey, ops

ROTATIONS = ("none", "hadamard")


@dataclass(frozen=True)
class Rotation:
    kind: str
    bucket_size: int

    def __post_init__(self) -> None:
        if self.kind not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.kind!r}")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def rotate(self, g: torch.Tensor, key: DitherKey) -> torch.Tensor:
        """R g as a rotated copy (``g``: flat float32, unchanged), or ``g`` itself without rotation."""
        return ops.hadamard_rotate(g, self.bucket_size, key) if self.active else g

    def unrotate(self, x: torch.Tensor, key: DitherKey) -> torch.Tensor:
        """R⁻¹ x in place (``x``: flat float32, owned by the caller); ``x`` unchanged without rotation."""
        return ops.hadamard_rotate(x, self.bucket_size, key, inverse=True, out=x) if self.active else x
