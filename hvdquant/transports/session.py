"""One job's shared state: the configuration and dither seed agreed once, per-name step counters,
the dither keys made from them, and the checkpoint of all of it with the exchange's own state.

Every adapter (Horovod compression, ``hvdquant.DistributedOptimizer``, the DDP hook) and the
coset ring holds one :class:`Session` over one exchange. A dither stream is keyed by (agreed seed,
step, tensor name, sender) (docs/ALGORITHMS.md §8): the step counts exchanges *per tensor name*,
so keys never depend on the order in which gradient hooks fire, and the counters travel in
checkpoints so a resumed run continues the same streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hvdquant.kernels import DitherKey, tensor_id
from hvdquant.transports.collectives import Collectives
from hvdquant.transports.fused import FusedBuffer, compressible
from hvdquant.version import __version__

MASK64 = (1 << 64) - 1
STEP_MODULUS = 1 << 32  # the key's step word is 32 bits wide


def check_seed(seed: object) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MASK64):
        raise ValueError(f"seed must be an int in [0, 2^64) or None, got {seed!r}")


def dither_key(seed: int, step: int, name: str, sender: int) -> DitherKey:
    """The key of ``sender``'s dither stream for tensor ``name`` at ``step``."""
    return DitherKey(seed, step % STEP_MODULUS, tensor_id(name), sender)


class StepCounter:
    """Exchanges started per tensor name."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def next(self, name: str) -> int:
        """This exchange's step for ``name`` (0, 1, 2, …), counting it."""
        step = self.counts.get(name, 0)
        self.counts[name] = step + 1
        return step

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = {str(k): int(v) for k, v in state.items()}


def _fields(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested configuration as dotted fields ({"codec": {"levels": 1}} -> {"codec.levels": 1}), so
    that a difference names the field itself."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def agree(collectives: Collectives, config: dict[str, Any], seed: int | None, name: str) -> int:
    """Allgather every rank's ``config`` and seed proposal (``seed``, or its ``torch.initial_seed()``);
    raise on every rank, naming the rank and the fields, if any configuration differs from rank
    0's; else return rank 0's proposal, the seed every rank then uses. hvdquant's version is part of
    every configuration: payload formats may change between versions."""
    config = _fields({"hvdquant_version": __version__, **config})
    proposal = seed if seed is not None else torch.initial_seed() & MASK64
    everyone = collectives.allgather_object((config, proposal), name)
    ref = everyone[0][0]
    for rank, (other, _) in enumerate(everyone):
        diff = {k: (ref.get(k), other.get(k)) for k in ref.keys() | other.keys() if ref.get(k) != other.get(k)}
        if diff:
            detail = "; ".join(f"{k}: rank 0 has {a!r}, rank {rank} has {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"hvdquant configuration differs between ranks ({detail})")
    return int(everyone[0][1])


class Session:
    """The state of one job's exchange. ``exchange``: any exchange (it owns its policy state:
    residuals, nesting decisions, side information); ``seed``: the dither seed, default rank 0's
    ``torch.initial_seed()``; ``tag`` names the agreement collective."""

    def __init__(self, exchange: Any, seed: int | None, tag: str) -> None:
        check_seed(seed)
        self.exchange, self.seed, self.tag = exchange, seed, tag
        self.steps = StepCounter()
        self.agreed_seed: int | None = None
        self.restored_seed: int | None = None  # from a checkpoint: resumes the same dither streams

    @property
    def coll(self) -> Collectives:
        return self.exchange.coll

    def agree(self, fields: Callable[[], dict[str, Any]] | None = None) -> int:
        """At the first call, agree with the other ranks on the exchange's configuration, the
        adapter's ``fields()`` (called only then: the hooks call this at every step), the restored
        state and the seed (a difference raises on every rank, naming the rank and the field);
        returns the agreed seed."""
        if self.agreed_seed is None:
            config = {**self.exchange.config(), **(fields() if fields is not None else {}), "seed": self.seed,
                      "restored_seed": self.restored_seed, "steps": sorted(self.steps.counts.items())}
            proposal = self.restored_seed if self.restored_seed is not None else self.seed
            self.agreed_seed = agree(self.coll, config, proposal, f"{self.tag}.config")
        return self.agreed_seed

    def buffer(self, named: Sequence[tuple[str, torch.Tensor]], min_numel: int | None,
               flat: torch.Tensor | None = None) -> FusedBuffer:
        """The fused buffer of ``named`` tensors (laid over ``flat`` where they already lie in it end
        to end: :meth:`FusedBuffer.of`): compressed ones (:func:`compressible`) get their next step
        and this rank's key. Agree first (:meth:`agree`)."""
        if self.agreed_seed is None:
            raise RuntimeError("Session.buffer before Session.agree: the dither seed is not agreed yet")
        rank = self.coll.rank
        return FusedBuffer.of([
            (name, t, dither_key(self.agreed_seed, self.steps.next(name), name, rank)
             if compressible(t, min_numel) else None) for name, t in named], flat)

    def state_dict(self) -> dict[str, Any]:
        """Steps, the agreed seed and the exchange's state."""
        return {"version": __version__, "steps": self.steps.state_dict(), "seed": self.agreed_seed,
                "exchange": self.exchange.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (agreed again at the next step: every rank must restore alike).
        Refuses a checkpoint of another version or exchange before changing anything."""
        if state.get("version") != __version__:
            raise ValueError(f"checkpoint was written by hvdquant {state.get('version', 'before 0.4.0')!r}; this is "
                             f"{__version__} (payload formats and state changed: restart from the model's weights)")
        self.exchange.load_state_dict(state["exchange"])
        self.steps.load_state_dict(state["steps"])
        self.restored_seed, self.agreed_seed = state["seed"], None
