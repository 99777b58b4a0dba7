"""What the summable-allreduce exchange hands its schemes (:mod:`~hvdquant.transports.sum_schemes`,
:mod:`~hvdquant.transports.nested_sum`): a group's compressed tensors once their steps are agreed
(:class:`Batch`), and the part of the exchange a scheme uses (:class:`SumHost`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hvdquant.codecs.dqsg import DQSG
from hvdquant.kernels import DitherKey
from hvdquant.kernels.segments import Segments
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import Collectives, Started
from hvdquant.transports.summable import SumMessage


@dataclass(frozen=True)
class Pending:
    """One compressed tensor: name, step, this rank's key and what is quantized (the flat float32
    gradient until its group is launched; then its view of the group's source, rotated if the
    codec rotates)."""

    name: str
    step: int
    key: DitherKey
    source: torch.Tensor


@dataclass(frozen=True)
class Quantized:
    """One tensor of a round after its step is agreed: Δ_b and this rank's dither key."""

    item: Pending
    delta: torch.Tensor
    key: DitherKey


@dataclass(frozen=True)
class Batch:
    """A group's tensors once their steps are agreed (sorted by name), also as flat buffers end to
    end: the source, the steps Δ_b, and the segments keyed by each tensor's dither key, for kernels
    that take every tensor in one launch (:mod:`hvdquant.kernels.ops_segments`)."""

    rounds: list[Quantized]
    source: torch.Tensor
    delta: torch.Tensor
    segments: Segments

    @property
    def summed(self) -> Segments:
        """The segments keyed from sender 0: the keys of sums over every sender."""
        segs = self.segments
        return Segments(segs.lengths, tuple(k.for_sender(0) for k in segs.keys), segs.bucket)


class SumHost(Protocol):
    """What a scheme uses of its exchange: the codec and collectives, the statistics it adds to,
    and the SUM rounds."""

    codec: DQSG
    coll: Collectives
    entropy_bits: float
    stats: CommStats
    decode_stats: DecodeStats

    def start_sum(self, message: SumMessage, values: list, device: torch.device, coordinates: int,
                  name: str) -> Started[torch.Tensor]: ...

    def sum_fields(self, message: SumMessage, values: list[torch.Tensor], device: torch.device, coordinates: int,
                   name: str) -> list[torch.Tensor]: ...
