"""Fusion of queued payloads into groups, and the group buffer's format (docs/ALGORITHMS.md §3).

A payload exchange queues one :class:`Item` per tensor as its gradient hook fires; the first
finisher flushes the queue: :meth:`FusionQueue.flush` sorts the items by name and cuts them into
:class:`Group` s of at most ``threshold`` gradient bytes (like Horovod's fusion buffer), so every
rank builds the same groups whatever order its hooks fired in. A group's buffer from one rank
(:func:`group_buffer`) is a header of int64 sizes, one per item (−1 where that rank's gradient was
not finite), followed by the payloads; :func:`split` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hvdquant.codecs.base import Encoded
from hvdquant.transports.collectives import Parts, Started, raise_if_poisoned

SIZE = torch.empty(0, dtype=torch.int64).element_size()


@dataclass
class Item:
    """One queued tensor. ``sent``: what this rank sends of it, per destination chunk (allgather: one
    chunk, the whole tensor) the uint8 pieces that follow each other in the group buffer (a
    payload's fields), or None where its gradient was not finite."""

    name: str
    shape: tuple[int, ...]
    raw: bool
    seed: int
    step: int
    chunks: list[tuple[int, int]]
    sent: list[list[torch.Tensor]] | None
    device: torch.device = torch.device("cpu")  # the gradient's: payloads, buffers and results live there
    encodings: list[Encoded] = field(default_factory=list)  # this rank's payloads (recovery rounds)
    source: torch.Tensor | None = None  # a compressed item's flat gradient until its group encodes it
    group: Group | None = None

    @property
    def numel(self) -> int:
        return self.chunks[-1][1]


@dataclass
class Group:
    """Tensors that travel together: ``started``, the group's first round; ``results`` (per name: the
    output, or the error every rank raises) once the group is finished."""

    items: list[Item]
    started: Started[Parts] | None = None
    results: dict[str, torch.Tensor | str] | None = None

    def received(self, ranks: int) -> list[list[torch.Tensor | None]]:
        """Wait for the first round: per item, every rank's part (None where that rank sent none)."""
        per_rank = [split(buf, len(self.items)) for buf in raise_if_poisoned(self.started.wait(), "group")]
        return [[per_rank[p][i] for p in range(ranks)] for i in range(len(self.items))]


class FusionQueue:
    """The items queued since the last flush, and ``threshold``: the most gradient bytes of a group
    (one group holds at least one item, however large)."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._items: list[Item] = []

    def add(self, items: list[Item]) -> None:
        self._items += items

    def flush(self) -> list[Group]:
        """Empty the queue into groups: the items sorted by name, cut where a group would exceed the
        threshold; each item learns its group."""
        items, self._items = sorted(self._items, key=lambda it: it.name), []
        groups, size = [], 0
        for item in items:
            nbytes = 4 * item.numel
            if not groups or (size + nbytes > self.threshold and groups[-1].items):
                groups.append(Group([]))
                size = 0
            groups[-1].items.append(item)
            item.group = groups[-1]
            size += nbytes
        return groups


def header(sizes: list[int], device: torch.device) -> torch.Tensor:
    """The int64 ``sizes`` as the bytes that open a group buffer."""
    return torch.tensor(sizes, dtype=torch.int64, device=device).view(torch.uint8)


def buffer_of(pieces: list[list[torch.Tensor] | None], device: torch.device) -> torch.Tensor:
    """A group buffer from each item's uint8 pieces (None: nothing sent, size −1): the header of
    sizes, then every piece, in one concatenation."""
    sizes = [-1 if item is None else sum(piece.numel() for piece in item) for item in pieces]
    return torch.cat([header(sizes, device), *(piece for item in pieces if item is not None for piece in item)])


def group_buffer(items: list[Item], c: int) -> torch.Tensor:
    """This rank's buffer of chunk ``c`` of every item: header of sizes, then the payloads."""
    return buffer_of([None if item.sent is None else item.sent[c] for item in items], items[0].device)


def split(buf: torch.Tensor, count: int) -> list[torch.Tensor | None]:
    """A group buffer (header of ``count`` sizes, then the payloads) as one entry per tensor."""
    if not count:
        return []
    sizes = buf[:count * SIZE].clone().view(torch.int64).tolist()
    body = torch.split(buf[count * SIZE:], [max(s, 0) for s in sizes])
    return [None if s < 0 else part for s, part in zip(sizes, body)]
