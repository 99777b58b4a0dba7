"""Statistics shared by every layer: bytes handed to collectives, and what a decoder had to recover."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def nbytes(*tensors: torch.Tensor) -> int:
    """Bytes the tensors occupy: what a collective is handed when they are passed to it."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class CommStats:
    """Running totals of gradient coordinates exchanged and bytes handed to collectives.

    ``bits_per_coordinate`` = 8 · bytes handed / coordinates: what the collectives were actually
    given (payload words, sentinels, scales, size words and recovery rounds included), not a formula.
    A second round over coordinates already counted records its bytes with ``coordinates=0``.
    """

    coordinates: int = 0
    bytes_handed: int = 0
    calls: int = 0

    def record(self, coordinates: int, handed: int) -> None:
        self.coordinates += coordinates
        self.bytes_handed += handed
        self.calls += 1

    @property
    def bits_per_coordinate(self) -> float:
        return 8.0 * self.bytes_handed / self.coordinates if self.coordinates else float("nan")


@dataclass
class DecodeStats:
    """What nested (coset) decoding saw: buckets whose checksum failed, coordinates that had resolved
    to the wrong coset member, the second rounds run to recover them and the bytes those rounds
    handed to the collectives. One type for every decoder (payload path, stock path, coset ring)."""

    failed_buckets: int = 0
    failed_coordinates: int = 0
    recovery_rounds: int = 0
    recovery_bytes: int = 0

    def add(self, other: DecodeStats) -> None:
        self.failed_buckets += other.failed_buckets
        self.failed_coordinates += other.failed_coordinates
        self.recovery_rounds += other.recovery_rounds
        self.recovery_bytes += other.recovery_bytes


class TorchOperations(TorchDispatchMode):
    """Counts, in ``count``, the torch operations run inside it that compute (views and aliases
    left out): on a GPU each is a kernel launch or a copy. With hvdquant's own kernel launches
    (``hvdquant.kernels.ops.launches``), what a step costs in launches. Python runs for every
    operation while it counts: time steps outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))
