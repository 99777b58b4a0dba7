"""Step counters and dither keys: the one place a (seed, step, tensor, sender) key is made.

A dither stream is keyed by the agreed seed, the step, the tensor's name and the sender's rank
(docs/ALGORITHMS.md §8). The step counts exchanges *per tensor name*, so keys never depend on the
order in which gradient hooks fire; the counters travel in checkpoints so a resumed run continues
the same streams.
"""

from __future__ import annotations

from hvdquant.kernels import DitherKey, tensor_id

STEP_MODULUS = 1 << 32  # the key's step word is 32 bits wide


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


def dither_key(seed: int, step: int, name: str, sender: int) -> DitherKey:
    """The key of ``sender``'s dither stream for tensor ``name`` at ``step``."""
    return DitherKey(seed, step % STEP_MODULUS, tensor_id(name), sender)
