"""First-step agreement between ranks: one configuration check and one dither seed."""

from __future__ import annotations

from typing import Any

import torch

from hvdquant.transports.collectives import Collectives

MASK64 = (1 << 64) - 1


def check_seed(seed: object) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MASK64):
        raise ValueError(f"seed must be an int in [0, 2^64) or None, got {seed!r}")


def agree(collectives: Collectives, config: dict[str, Any], seed: int | None, name: str) -> int:
    """Allgather every rank's ``config`` and seed proposal (``seed``, or its ``torch.initial_seed()``);
    raise on every rank, naming the rank and the fields, if any configuration differs from rank
    0's; else return rank 0's proposal, the seed every rank then uses. hvdquant's version is part of
    every configuration: payload formats may change between versions."""
    from hvdquant import __version__

    config = {"hvdquant_version": __version__, **config}
    proposal = seed if seed is not None else torch.initial_seed() & MASK64
    everyone = collectives.allgather_object((config, proposal), name)
    ref = everyone[0][0]
    for rank, (other, _) in enumerate(everyone):
        diff = {k: (ref.get(k), other.get(k)) for k in ref.keys() | other.keys() if ref.get(k) != other.get(k)}
        if diff:
            detail = "; ".join(f"{k}: rank 0 has {a!r}, rank {rank} has {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"hvdquant configuration differs between ranks ({detail})")
    return int(everyone[0][1])
