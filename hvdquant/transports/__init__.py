"""Transports: how payloads travel between ranks, written once against :class:`Collectives`."""

from .collectives import Collectives, HorovodCollectives, MPICollectives, Started
from .exchange import Exchange, make_exchange
from .summable import SumFieldLayout

__all__ = ["Collectives", "Exchange", "HorovodCollectives", "MPICollectives", "Started", "SumFieldLayout",
           "make_exchange"]
