"""Keys of the counter-based dither generator.

A dither is a pure function of (seed, step, tensor id, sender rank, element index): Philox-4x32-10
with key = the 64-bit seed and counter = (element index // 4, step, tensor id, sender). Any rank,
on any device, regenerates any sender's dither for any step and tensor without communication.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

_U32 = 0xFFFFFFFF
MAX_ELEMENTS = 4 * (1 << 32)  # the block counter is 32 bits wide, 4 dithers per block


def tensor_id(name: str) -> int:
    """A stable 32-bit id for a tensor name (CRC-32 of its UTF-8 bytes): equal on every rank."""
    return zlib.crc32(name.encode("utf-8")) & _U32


@dataclass(frozen=True)
class DitherKey:
    """Which dither stream: the global ``seed`` (64 bits), the ``step`` (32 bits), the tensor
    (``tensor_id``, 32 bits; see :func:`tensor_id`) and the ``sender`` rank (32 bits)."""

    seed: int
    step: int
    tensor_id: int
    sender: int

    def __post_init__(self) -> None:
        for field, bits in (("seed", 64), ("step", 32), ("tensor_id", 32), ("sender", 32)):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"DitherKey.{field} must be an integer, got {type(value).__name__}")
            if not 0 <= int(value) < (1 << bits):
                raise ValueError(f"DitherKey.{field}={value} is outside [0, 2^{bits})")

    def for_sender(self, sender: int) -> DitherKey:
        return DitherKey(self.seed, self.step, self.tensor_id, sender)

    def words(self) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64, np.uint64]:
        """(step, tensor_id, sender, key0, key1) as the uint64 words the kernels take."""
        seed = int(self.seed)
        return (
            np.uint64(self.step),
            np.uint64(self.tensor_id),
            np.uint64(self.sender),
            np.uint64(seed & _U32),
            np.uint64(seed >> 32),
        )
