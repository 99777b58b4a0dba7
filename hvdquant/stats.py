"""Communication statistics measured from the tensors handed to collectives."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CommStats:
    """Running totals of gradient coordinates compressed and bytes handed to collectives.

    ``bits_per_coordinate`` = 8 · bytes handed / coordinates: what the collectives were actually
    given (payload words, sentinels and scales included), not a formula.
    """

    coordinates: int = 0
    bytes_handed: int = 0
    calls: int = 0
    per_tensor: dict[str, list[int]] = field(default_factory=dict)

    def record(self, name: str, coordinates: int, *tensors: torch.Tensor) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.coordinates += coordinates
        self.bytes_handed += nbytes
        self.calls += 1
        entry = self.per_tensor.setdefault(name, [0, 0])
        entry[0] += coordinates
        entry[1] += nbytes

    @property
    def bits_per_coordinate(self) -> float:
        return 8.0 * self.bytes_handed / self.coordinates if self.coordinates else float("nan")

    def reset(self) -> None:
        self.coordinates = self.bytes_handed = self.calls = 0
        self.per_tensor.clear()

    def as_dict(self) -> dict:
        return {
            "coordinates": self.coordinates,
            "bytes_handed": self.bytes_handed,
            "calls": self.calls,
            "bits_per_coordinate": self.bits_per_coordinate,
        }
