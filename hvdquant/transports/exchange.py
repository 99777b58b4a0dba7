"""The :class:`Exchange` protocol and the one factory that builds an exchange for a codec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from hvdquant.codecs.base import Codec
from hvdquant.codecs.lgc import LGC
from hvdquant.stats import CommStats
from hvdquant.transports.collectives import Collectives
from hvdquant.transports.lgc_exchange import LGCExchange
from hvdquant.transports.payload import FUSION_THRESHOLD, REDUCERS, PayloadExchange


class Exchange(Protocol):
    """How an adapter moves one tensor's gradient: ``start`` encodes and starts the collectives
    (called in the framework's gradient hook) and returns a callable that finishes the exchange
    and returns the averaged (or summed) gradient; adapters run those callables in sorted
    tensor-name order. ``stats`` counts the bytes handed to the collectives."""

    kind: str
    reducer: str
    average: bool
    stats: CommStats

    def start(self, name: str, tensor: torch.Tensor, seed: int, step: int) -> Callable[[], torch.Tensor]: ...

    def start_raw(self, name: str, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The same for a tensor sent uncompressed (small ones), summed in rank order."""
        ...

    def config(self) -> dict:
        """What every rank must agree on at the first step."""
        ...

    def statistics(self) -> dict:
        """Measured bits per coordinate and the scheme's own counters."""
        ...

    def state_dict(self) -> dict:
        """This rank's state that a checkpoint must carry (error-feedback residuals, …)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; refuses a checkpoint of another kind before changing anything."""
        ...


def make_exchange(codec: Codec | LGC, reducer: str, average: bool, collectives: Collectives,
                  fusion_threshold: int = FUSION_THRESHOLD) -> Exchange:
    """The exchange for ``codec`` over ``reducer`` ("allgather" or "scatter_reduce"); payloads are
    fused into groups of at most ``fusion_threshold`` gradient bytes (LGC runs its own protocol,
    tensor by tensor)."""
    if reducer not in REDUCERS:
        raise ValueError(f"reducer={reducer!r} must be one of {REDUCERS}")
    if isinstance(codec, LGC):  # a staged protocol of its own
        if reducer != "allgather":
            raise ValueError("LGC runs its own protocol: use reducer='allgather' (its form= picks "
                             "parameter-server or ring)")
        return LGCExchange(codec, average, collectives)
    if isinstance(codec, Codec):
        return PayloadExchange(codec, reducer, average, collectives, fusion_threshold)
    raise TypeError(f"codec must be an hvdquant codec (hvdquant.DQSG(...), ...), got {type(codec).__name__}")
