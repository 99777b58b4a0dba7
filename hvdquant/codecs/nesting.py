"""Adaptive nesting's decisions (docs/ALGORITHMS.md §2, "Adaptive nesting").

Per tensor name: whether its nested senders send coset symbols at the next step, and with which
nesting ratio ρ. The decision is taken after every step from what every receiver decoded (the
price B(ρ) of every candidate ratio against B_DQSG, the same senders' DQSG(s₁) bytes), so every
rank holds the same :class:`NestingPolicy` without a collective. It is state, not configuration:
it lives in a :class:`~hvdquant.codecs.state.CodecState` (payload path) or in the transport that
runs the exchange (stock nested sum, coset ring), and is checkpointed there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: the per-name tables of a policy, in checkpoint order, and the type of their values
TABLES: tuple[tuple[str, type], ...] = (("nesting", bool), ("streak", int), ("reversals", int),
                                        ("evidence", int), ("ratios", int))


def candidate_ratios(s1: int, s2: int) -> tuple[int, ...]:
    """The ratios adaptive nesting chooses from: s₁/s₂ and the powers of 2 below 2s₁ + 1 (a coset
    index of 2s₁ + 1 or more values would be the DQSG(s₁) symbol itself). Smaller ρ sends fewer
    bits per coordinate (log2 ρ), larger ρ fails less often (a coordinate resolves iff |K − Y| < ρ/2)."""
    rhos = {s1 // s2} | {1 << b for b in range(1, 8) if (1 << b) <= 2 * s1}
    return tuple(sorted(rhos))


@dataclass
class NestingPolicy:
    """Adaptive nesting's per-name decisions and the evidence behind them.

    ``nesting[name]``: whether the name's nested senders send cosets at the next step (default off);
    ``ratios[name]``: the ratio ρ they use (default: the codec's s₁/s₂); while off, ``streak`` and
    ``evidence`` count the consecutive paying steps and the nested buckets they were measured on;
    ``reversals`` how many times nesting was switched off again."""

    nesting: dict[str, bool] = field(default_factory=dict)
    streak: dict[str, int] = field(default_factory=dict)
    reversals: dict[str, int] = field(default_factory=dict)
    evidence: dict[str, int] = field(default_factory=dict)
    ratios: dict[str, int] = field(default_factory=dict)

    #: nesting stays on (or turns on) only where it is expected to send at most this fraction of the
    #: nested senders' DQSG(s₁) bytes
    ADAPTIVE_MARGIN = 0.95
    #: paying steps in a row before nesting that is off switches on (doubled at each switch-off): one
    #: lucky step of a tensor near break-even otherwise switches on and the next step can cost up to
    #: twice its bytes
    CONFIRM_STEPS = 2
    #: nested buckets a run of paying steps must have been measured on before nesting switches on:
    #: a tensor of one or two buckets (a small first layer) otherwise switches on whenever a probe of
    #: those few buckets pays by chance, and a wrong switch-on costs up to twice a step's bytes
    MIN_EVIDENCE_BUCKETS = 16

    def is_on(self, name: str | None) -> bool:
        """Whether tensor ``name``'s nested senders send cosets at its next step."""
        return self.nesting.get(name, False) if name is not None else False

    def ratio(self, name: str | None, default: int) -> int:
        """The nesting ratio ρ of tensor ``name`` (``default``, s₁/s₂, until one was chosen)."""
        return self.ratios.get(name, default) if name is not None else default

    def observe(self, name: str, pays: bool, buckets: int | None = None) -> None:
        """The rule, after a step of tensor ``name`` whose nesting would have paid (or paid) iff
        ``pays``, measured on ``buckets`` nested buckets (default: enough on its own): nesting that
        did not pay is switched off at once; nesting that is off is switched on after
        ``CONFIRM_STEPS``·2^r consecutive steps that would have paid, r being the number of times it
        was switched off before (a tensor whose outcome keeps changing stops oscillating), and once
        those steps were measured on at least ``MIN_EVIDENCE_BUCKETS`` buckets together. The same
        rule serves the payload path, the stock nested sum and the coset ring."""
        if self.nesting.get(name, False):
            if not pays:
                self.nesting[name] = False
                self.reversals[name] = self.reversals.get(name, 0) + 1
                self.streak[name] = self.evidence[name] = 0
            return
        seen = self.MIN_EVIDENCE_BUCKETS if buckets is None else buckets
        self.streak[name] = self.streak.get(name, 0) + 1 if pays else 0
        self.evidence[name] = self.evidence.get(name, 0) + seen if pays else 0
        if (self.streak[name] >= self.CONFIRM_STEPS * 2 ** self.reversals.get(name, 0)
                and self.evidence[name] >= self.MIN_EVIDENCE_BUCKETS):
            self.nesting[name] = True
            self.streak[name] = self.evidence[name] = 0

    def choose(self, name: str, cost: Mapping[int, int], plain: int, buckets: int | None = None) -> None:
        """The decision for tensor ``name`` from this step's price ``cost[ρ]`` = B(ρ) of every
        candidate ratio against ``plain`` = B_DQSG: the cheapest ρ* (equal bytes: the larger, which
        fails less) is kept for the next step, and the step pays iff B(ρ*) ≤ ADAPTIVE_MARGIN · B_DQSG
        (:meth:`observe` with ``buckets``)."""
        best = min(cost, key=lambda r: (cost[r], -r))
        pays = cost[best] <= self.ADAPTIVE_MARGIN * plain
        if pays:
            self.ratios[name] = best
        self.observe(name, pays, buckets)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Copies of the per-name tables (a checkpoint resumes with them)."""
        return {table: dict(getattr(self, table)) for table, _ in TABLES}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. A missing table loads empty (checkpoints from before a rule
        was added); anything else malformed — an unknown table, a non-string name, a value of the
        wrong type — raises ValueError before anything is changed."""
        if not isinstance(state, Mapping):
            raise ValueError(f"nesting state must be a dict, got {type(state).__name__}")
        unknown = set(state) - {table for table, _ in TABLES}
        if unknown:
            raise ValueError(f"nesting state has unknown table(s) {sorted(unknown)}")
        loaded = {}
        for table, kind in TABLES:
            values = state.get(table, {})
            if not isinstance(values, Mapping):
                raise ValueError(f"nesting state '{table}' must be a dict, got {type(values).__name__}")
            for name, value in values.items():
                # bool is an int: an int table refuses it, the bool table takes only bools
                wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
                if not isinstance(name, str) or wrong:
                    raise ValueError(f"nesting state '{table}' maps names to {kind.__name__}, got "
                                     f"{name!r}: {value!r}")
            loaded[table] = dict(values)
        for table, values in loaded.items():
            setattr(self, table, values)
