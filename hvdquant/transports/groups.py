"""Rank-agreed groups of compressed tensors, so that the summable exchange can send a group's
fields while backward still runs.

The first step records the order in which this rank's gradient hooks started each compressed
tensor. At its first exchange every rank takes **rank 0's** order (one allgather of the names) and
cuts it into consecutive groups of at least ``threshold`` gradient bytes (float32: 4 bytes per
coordinate). From the next step on, a group is launched as soon as all of its members were started,
in whatever order this rank's hooks fired: the groups depend only on rank 0's first step, so every
rank packs the same tensors into the same rounds. Tensors outside the plan (a parameter that had
no gradient at the first step) and the members of a group that did not complete are sent together
at the exchange's first finisher, as without a plan.

A group's rounds are named after a checksum of its members' names: a rank whose membership
differed would start differently named collectives (Horovod reports the stall) instead of summing
the fields of other tensors.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterable, Sequence

GROUP_THRESHOLD = 1 << 20  # gradient bytes per group (1 MiB: DDP's first bucket)


def group_tag(names: Iterable[str]) -> str:
    """The name of a group's rounds: a checksum of its sorted member names."""
    return f"{zlib.crc32(chr(0).join(sorted(names)).encode()):08x}"


class GroupPlan:
    """Groups of tensor names, in rank 0's first-step order; ``groups[i]`` is a tuple of names."""

    def __init__(self, groups: Sequence[tuple[str, ...]]) -> None:
        self.groups = list(groups)
        self._index = {name: i for i, members in enumerate(self.groups) for name in members}

    @classmethod
    def from_order(cls, order: Sequence[tuple[str, int]], threshold: int) -> GroupPlan:
        """Consecutive (name, coordinates) pairs cut into groups that close once they hold at least
        ``threshold`` gradient bytes (4 per coordinate); the last group may hold fewer."""
        if threshold <= 0:
            raise ValueError(f"group threshold must be positive, got {threshold}")
        groups: list[tuple[str, ...]] = []
        members: list[str] = []
        size = 0
        for name, n in order:
            members.append(name)
            size += 4 * n
            if size >= threshold:
                groups.append(tuple(members))
                members, size = [], 0
        if members:
            groups.append(tuple(members))
        return cls(groups)

    def completed(self, names: Iterable[str], started: Collection[str]) -> list[tuple[str, ...]]:
        """The groups of ``names`` whose members are all in ``started``, each once, in plan order."""
        hit = sorted({self._index[n] for n in names if n in self._index})
        return [self.groups[i] for i in hit if all(m in started for m in self.groups[i])]
