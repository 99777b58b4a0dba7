"""What a codec keeps between steps, owned by whoever runs the exchange.

Codecs are frozen and pure: a stateful one reads and writes the :class:`CodecState` handed to it in
:attr:`TensorContext.state <hvdquant.codecs.base.TensorContext.state>`. The transport owns one
state per job and passes it in every context it builds, so its checkpoint holds everything the
codecs carry across steps:

- error feedback's residuals r (per tensor name, float64): c = g + r, r ← c − ĝ
  (:class:`~hvdquant.codecs.feedback.ErrorFeedback`);
- adaptive nesting's decisions (:class:`~hvdquant.codecs.nesting.NestingPolicy`,
  :class:`~hvdquant.codecs.ndqsg.NDQSG` with ``adaptive=True``).

A stateful codec called without a state raises (:func:`require_state`) rather than starting from
a fresh one that would silently forget the residuals or the decisions at every call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hvdquant.codecs.nesting import NestingPolicy


@dataclass
class CodecState:
    """Per-job, per-tensor-name codec state: ``residuals`` (error feedback) and ``nesting``
    (adaptive nesting's decisions)."""

    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    nesting: NestingPolicy = field(default_factory=NestingPolicy)

    def state_dict(self) -> dict[str, Any]:
        """Copies: later steps do not change a checkpoint taken now."""
        return {"residuals": {name: r.clone() for name, r in self.residuals.items()},
                "nesting": self.nesting.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; malformed input (missing or unknown keys, a residual that is
        not a 1-D floating-point tensor) raises ValueError before anything is changed."""
        if not isinstance(state, Mapping) or set(state) != {"residuals", "nesting"}:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"codec state must be a dict with keys ['nesting', 'residuals'], got {got}")
        residuals = state["residuals"]
        if not isinstance(residuals, Mapping):
            raise ValueError(f"codec state 'residuals' must be a dict, got {type(residuals).__name__}")
        for name, r in residuals.items():
            if not isinstance(name, str) or not isinstance(r, torch.Tensor) or not r.is_floating_point() \
                    or r.dim() != 1:
                raise ValueError(f"codec state 'residuals' maps names to 1-D float tensors, got {name!r}: "
                                 f"{type(r).__name__}")
        nesting = NestingPolicy()
        nesting.load_state_dict(state["nesting"])
        self.residuals = {name: r.clone().double() for name, r in residuals.items()}
        self.nesting = nesting


def require_state(state: CodecState | None, owner: str, what: str) -> CodecState:
    """``state``, or a ValueError naming the stateful ``owner`` and ``what`` it keeps there."""
    if state is None:
        raise ValueError(f"{owner} keeps {what} between steps in TensorContext.state: pass the CodecState "
                         "the exchange owns (a fresh one per call would silently forget it)")
    return state
