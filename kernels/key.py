"""Keys of the counter-based dither generator.

A dither is a pure function of (seed, step, tensor id, sender rank, element index): Philox-4x32-10
with key = the 64-bit seed and counter = (element index // 4, step, tensor id, sender). Any rank,
on any device, regenerates any sender's dither for any step and tensor without communication.
A key with ``ranks`` = P > 0 names the stratified dither among P ranks instead (docs/ALGORITHMS.md
§9), built from streams every rank shares; ``ranks`` = 0 is the independent dither.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

_U32 = 0xFFFFFFFF
MAX_ELEMENTS = 4 * (1 << 32)  # the block counter is 32 bits wide, 4 dithers per block
MAX_STRATIFIED_RANKS = 1 << 16  # GF(2^m) strata, m <= 16 (kernels/arith/strata.py)


def tensor_id(name: str) -> int:
    """A stable 32-bit id for a tensor name (CRC-32 of its UTF-8 bytes): equal on every rank."""
    return zlib.crc32(name.encode("utf-8")) & _U32


@dataclass(frozen=True)
class DitherKey:
    """Which dither stream: the global ``seed`` (64 bits), the ``step`` (32 bits), the tensor
    (``tensor_id``, 32 bits; see :func:`tensor_id`), the ``sender`` rank (32 bits) and the dither
    family: ``ranks`` = 0 independent, ``ranks`` = P stratified among P ranks (sender < P)."""

    seed: int
    step: int
    tensor_id: int
    sender: int
    ranks: int = 0

    def __post_init__(self) -> None:
        for field, bits in (("seed", 64), ("step", 32), ("tensor_id", 32), ("sender", 32)):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"DitherKey.{field} must be an integer, got {type(value).__name__}")
            if not 0 <= int(value) < (1 << bits):
                raise ValueError(f"DitherKey.{field}={value} is outside [0, 2^{bits})")
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, (int, np.integer)):
            raise TypeError(f"DitherKey.ranks must be an integer, got {type(self.ranks).__name__}")
        if not 0 <= int(self.ranks) <= MAX_STRATIFIED_RANKS:
            raise ValueError(f"DitherKey.ranks={self.ranks} is outside [0, {MAX_STRATIFIED_RANKS}] "
                             "(0: independent dither; P: stratified among P ranks)")
        if self.ranks and int(self.sender) >= int(self.ranks):
            raise ValueError(f"DitherKey.sender={self.sender} is not a rank of the {self.ranks} that share a "
                             "stratified dither")

    def for_sender(self, sender: int) -> DitherKey:
        return DitherKey(self.seed, self.step, self.tensor_id, sender, self.ranks)

    def stratified(self, ranks: int) -> DitherKey:
        """This sender's key under the stratified dither among ``ranks`` ranks."""
        return DitherKey(self.seed, self.step, self.tensor_id, self.sender, ranks)

    def words(self) -> tuple[np.uint64, np.uint64, np.uint64, np.int64, np.uint64, np.uint64]:
        """(step, tensor_id, sender, ranks, key0, key1) as the words the kernels take."""
        seed = int(self.seed)
        return (
            np.uint64(self.step),
            np.uint64(self.tensor_id),
            np.uint64(self.sender),
            np.int64(self.ranks),
            np.uint64(seed & _U32),
            np.uint64(seed >> 32),
        )
