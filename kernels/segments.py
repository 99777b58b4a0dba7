"""Several tensors laid end to end, for one kernel launch over all of them (:mod:`.arith.segments`).

:class:`Segments` describes one rank's tensors of one exchange: their lengths, their dither keys
(one seed, sender and dither family for all; each its own step and tensor id) and the bucket size
that cuts each tensor on its own. Their elements, buckets and summable words lie end to end in flat
buffers; :meth:`Segments.table` gives a segmented kernel the rows it looks its blocks up in.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .arith.segments import COLUMNS
from .key import DitherKey
from .sizes import integer, num_buckets


@dataclass(frozen=True)
class Segments:
    """Tensors of ``lengths`` elements with dither ``keys``, cut into buckets of ``bucket``."""

    lengths: tuple[int, ...]
    keys: tuple[DitherKey, ...]
    bucket: int

    def __post_init__(self) -> None:
        if len(self.lengths) != len(self.keys) or not self.lengths:
            raise ValueError(f"segments need one key per length, at least one: got {len(self.lengths)} lengths "
                             f"and {len(self.keys)} keys")
        for n in self.lengths:
            integer("segment length", n, 0, 1 << 40)
        integer("bucket", self.bucket, 1, 1 << 31)
        first = self.keys[0]
        for k in self.keys:
            if (k.seed, k.sender, k.ranks) != (first.seed, first.sender, first.ranks):
                raise ValueError("the segments of one launch share the seed, sender and dither family of their keys")

    @property
    def key(self) -> DitherKey:
        """The first segment's key: its seed, sender and dither family are every segment's."""
        return self.keys[0]

    @cached_property
    def elements(self) -> int:
        return sum(self.lengths)

    @cached_property
    def buckets(self) -> list[int]:
        return [num_buckets(n, self.bucket) for n in self.lengths]

    def bucket_lengths(self) -> np.ndarray:
        """Each bucket's elements (int64), the segments' buckets end to end: ``bucket``, but a
        segment's last bucket holds what is left of it."""
        out = np.full(sum(self.buckets), self.bucket, dtype=np.int64)
        ends = np.cumsum(self.buckets)
        filled = [i for i, nb in enumerate(self.buckets) if nb]
        out[ends[filled] - 1] = [self.lengths[i] - (self.buckets[i] - 1) * self.bucket for i in filled]
        return out

    def subset(self, members: list[int]) -> Segments:
        """The segments ``members`` (indices, in that order) on their own."""
        return Segments(tuple(self.lengths[i] for i in members), tuple(self.keys[i] for i in members), self.bucket)

    def words(self, per_word: int) -> list[int]:
        """Each segment's summable words at ``per_word`` fields a word."""
        return [-(-n // per_word) for n in self.lengths]

    def offsets(self, sizes: list[int]) -> list[int]:
        """Where each segment's part of ``sizes`` starts in a flat buffer (and, last, the total)."""
        return [0, *np.cumsum(sizes).tolist()]

    def table(self, unit: str, per: int, per_word: int = 1, shares: Shares | None = None) -> np.ndarray:
        """The rows of a segmented launch (columns :data:`.arith.segments.COLUMNS`): blocks of ``per``
        ``unit`` ("elements" or "buckets") each; element, bucket and word ranges; step and tensor id;
        the two parameters of ``shares``. The word ranges count summable words of ``per_word``
        fields; ``shares`` gives any of the units, bucket and word counts per segment instead."""
        shares = shares or Shares()
        shares.check(len(self.lengths))
        counts = shares.units or (self.lengths if unit == "elements" else self.buckets)
        blocks = [-(-c // per) for c in counts]
        w = self.offsets(list(shares.words or self.words(per_word)))
        e, b = self.offsets(list(self.lengths)), self.offsets(list(shares.buckets or self.buckets))
        rows = np.zeros((len(counts), len(COLUMNS)), dtype=np.int64)
        rows[:, 0] = self.offsets(blocks)[:-1]
        rows[:, 1] = counts
        rows[:, 2], rows[:, 3] = e[:-1], e[1:]
        rows[:, 4], rows[:, 5] = b[:-1], b[1:]
        rows[:, 6], rows[:, 7] = w[:-1], w[1:]
        rows[:, 8] = [k.step for k in self.keys]
        rows[:, 9] = [k.tensor_id for k in self.keys]
        if shares.args:
            rows[:, 10:12] = shares.args
        return rows


@dataclass(frozen=True)
class Shares:
    """What a segmented launch gives per segment where :class:`Segments`' defaults do not fit (each
    a tuple with one entry per segment): ``units``, what the segment's blocks count (instead of its
    elements or buckets); ``buckets`` and ``words``, the lengths of its parts of a per-bucket and a
    per-word buffer (a packed payload's bytes, a tensor's columns); ``args``, two integer parameters
    of its own (the table's last two columns: a tensor's column count, its lanes)."""

    units: tuple[int, ...] | None = None
    buckets: tuple[int, ...] | None = None
    words: tuple[int, ...] | None = None
    args: tuple[tuple[int, int], ...] | None = None

    def check(self, segments: int) -> None:
        for name in ("units", "buckets", "words", "args"):
            given = getattr(self, name)
            if given is not None and len(given) != segments:
                raise ValueError(f"{len(given)} {name} for {segments} segments")


def by_segment(flat: list[int], counts: list[int]) -> list[list[int]]:
    """Indices into the segments' parts end to end (``counts`` per segment: its buckets, say) as each
    segment's own indices."""
    starts = np.cumsum([0, *counts]).tolist()
    out: list[list[int]] = [[] for _ in counts]
    for b in flat:
        s = bisect.bisect_right(starts, b) - 1  # the last segment starting at or before b: not an empty one
        out[s].append(b - starts[s])
    return out
