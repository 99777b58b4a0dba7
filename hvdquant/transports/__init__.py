"""Transports: how payloads travel between ranks, written once against :class:`Collectives`."""

from .collectives import Collectives, HorovodCollectives, MPICollectives, Started
from .exchange import Exchange, make_exchange
from .fused import FusedBuffer, Segment
from .session import Session
from .summable import SumFieldLayout

__all__ = ["Collectives", "Exchange", "FusedBuffer", "HorovodCollectives", "MPICollectives", "Segment", "Session",
           "Started", "SumFieldLayout", "make_exchange"]
