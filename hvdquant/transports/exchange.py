"""The one exchange contract, and the one place that picks an exchange for a codec.

An exchange moves fused buffers (:class:`~hvdquant.transports.fused.FusedBuffer`): ``start(buffer)``
runs in the framework's gradient hook (it encodes and starts what it can without waiting on other
ranks) and returns a finisher; the finisher returns the flat float32 result in the buffer's layout,
the mean over ranks (``average``) or the sum. An exchange may hold several started buffers and send
them together at the first finisher called (fusion across hooks); every rank starts the same
buffers between two finishes, so every rank builds the same rounds whatever order the hooks fired
in. Uncompressed segments are summed in rank order (exact and reproducible). A non-finite gradient
on any rank makes every rank raise ``FloatingPointError`` from the finisher.

``send()`` starts the rounds of what was started since the last call, so that they travel while the
framework computes the next gradients, and waits only on rounds started at earlier calls: the order
of the rounds depends on the calls alone, never on timing, which collectives matched by order
(torch.distributed) require. The DDP hook calls it after each bucket's ``start`` and calls the
finishers, in start order, in the step's last hook.

Transports: :class:`~hvdquant.transports.summed.SummedExchange` (summable allreduce: DQSG and NDQSG
indices in float64 fields), :class:`~hvdquant.transports.payload.PayloadExchange` (any codec's
payloads over allgather or scatter-reduce-allgather), :class:`~hvdquant.transports.lgc_exchange.LGCExchange`
(learned compression's staged protocol) and :class:`~hvdquant.transports.ring.CosetRing` (the mpi4py
reference ring of coset indices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from hvdquant.codecs.base import Codec
from hvdquant.codecs.lgc import LGC
from hvdquant.stats import CommStats
from hvdquant.transports.collectives import Collectives
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.lgc_exchange import LGCExchange
from hvdquant.transports.payload import FUSION_THRESHOLD, PayloadExchange
from hvdquant.transports.sum_schemes import scheme_for
from hvdquant.transports.summed import SummedExchange

Finisher = Callable[[], torch.Tensor]
#: reducer names users pass: the summable allreduce, and the payload reducers
REDUCERS = ("allreduce", "allgather", "scatter_reduce")


class Exchange(Protocol):
    """What every transport implements (see the module docstring). ``coll``: the collectives it runs
    on; ``stats``: the bytes it handed to them."""

    kind: str
    average: bool
    coll: Collectives
    stats: CommStats

    def start(self, buffer: FusedBuffer) -> Finisher: ...

    def send(self) -> None:
        """Start the rounds of what was started since the last call (see the module docstring)."""
        ...

    def config(self) -> dict:
        """What every rank must agree on at the first step."""
        ...

    def statistics(self) -> dict:
        """Measured bits per coordinate (bytes handed to the collectives) and the scheme's counters."""
        ...

    def state_dict(self) -> dict:
        """This rank's state a checkpoint must carry (residuals, nesting decisions, side information)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; refuses a checkpoint of another kind before changing anything."""
        ...


def make_exchange(codec: Codec | LGC, reducer: str, average: bool, collectives: Collectives,
                  fusion_threshold: int = FUSION_THRESHOLD, group_threshold: int | None = None) -> Exchange:
    """The exchange for ``codec`` over ``reducer``: "allreduce" (summable codecs: DQSG, NDQSG),
    "allgather" or "scatter_reduce" (any codec; LGC runs its own protocol on "allgather").
    Payloads are fused into groups of at most ``fusion_threshold`` gradient bytes. On "allreduce",
    ``group_threshold`` sends rank-agreed groups of at least that many gradient bytes while the
    hooks run (collectives matched by name only: :class:`~hvdquant.transports.summed.SummedExchange`).
    ``collectives`` may be a callable returning them (made at first use, after the framework is
    initialised)."""
    if reducer not in REDUCERS:
        raise ValueError(f"reducer={reducer!r} must be one of {REDUCERS}")
    if isinstance(codec, LGC):  # a staged protocol of its own
        if reducer != "allgather":
            raise ValueError("LGC runs its own protocol: use reducer='allgather' (its form= picks "
                             "parameter-server or ring)")
        return LGCExchange(codec, average, collectives)
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be an hvdquant codec (hvdquant.DQSG(...), ...), got {type(codec).__name__}")
    if reducer == "allreduce":
        return SummedExchange(scheme_for(codec), average, collectives, group_threshold)
    return PayloadExchange(codec, reducer, average, collectives, fusion_threshold)
