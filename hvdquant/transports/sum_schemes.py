"""What the summable-allreduce exchange's rounds carry, and how their sums decode: the schemes.

:class:`DQSGSum` sums DQSG indices in summable fields and decodes Σ_p ĝ_p once;
:class:`~hvdquant.transports.nested_sum.NestedSum` sums nested coset indices and checksums,
resolves them with side information and recovers failed buckets (docs/ALGORITHMS.md §3). A
scheme's ``send(host, batch, tag)`` packs and starts its first round through the host exchange
(:class:`~hvdquant.transports.summed.SummedExchange`; what it gets:
:mod:`~hvdquant.transports.sum_batch`) and returns a function that waits for it and decodes;
:func:`scheme_for` picks the scheme of a summable codec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hvdquant.codecs.base import counts_entropy
from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.ndqsg import NDQSG
from hvdquant.kernels import ops
from hvdquant.transports.nested_sum import NestedSum
from hvdquant.transports.sum_batch import Batch, SumHost
from hvdquant.transports.summable import SumFieldLayout, SumMessage


@dataclass(frozen=True)
class DQSGSum:
    """DQSG(s) indices in summable fields: Σ_p k_p decoded once, with the sum of every sender's
    dither (P streams under the independent dither, one under the stratified dither)."""

    levels: int = 1
    bucket_size: int = 512
    dither: str = "stratified"
    rotation: str = "none"

    @property
    def fine(self) -> DQSG:
        return DQSG(self.levels, self.bucket_size, self.dither, self.rotation)

    def config(self) -> dict[str, Any]:
        return {"scheme": "dqsg", **asdict(self.fine)}

    def state_dict(self) -> dict[str, Any]:
        """DQSG keeps nothing between steps."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""

    def send(self, ex: SumHost, batch: Batch, tag: str) -> Callable[[], dict[str, torch.Tensor]]:
        """Quantize every tensor of the batch straight into its summable fields (one fused pass over
        all of them) and start one SUM allreduce; the returned function waits for it, decodes
        Σ_p ĝ_p of every tensor straight from the reduced words (one pass) and rotates the sums back
        (one pass: the rotation is linear and shared)."""
        codec, ranks, segs = ex.codec, ex.coll.size, batch.segments
        layout = SumFieldLayout.for_levels(codec.levels, ranks)

        def write(words: torch.Tensor) -> None:
            _, counts = ops.dqsg_encode_fields_segments(batch.source, batch.delta, segs, codec.levels, layout.radix,
                                                        layout.per_word, out=words)
            ex.entropy_bits += sum(n * counts_entropy(c) for n, c in zip(segs.lengths, counts)) + \
                32.0 * batch.delta.numel()

        message = SumMessage(ranks, tuple((layout, n) for n in segs.lengths))
        started = ex.start_sum(message, write, batch.source.device, segs.elements, f"hvdquant.sum.{tag}")

        def decode() -> dict[str, torch.Tensor]:
            reduced = started.wait()
            _, factor = message.split(reduced)
            first = batch.summed
            total = ops.dqsg_decode_fields_segments(reduced[:-1], factor, layout.radix, layout.per_word,
                                                    layout.offset * ranks, batch.delta, first, senders=ranks)
            if codec.rotator.active:
                ops.hadamard_rotate_segments(total, first, inverse=True, out=total)
            return dict(zip((q.item.name for q in batch.rounds), total.split(list(segs.lengths))))

        return decode


def scheme_for(codec: object) -> DQSGSum | NestedSum:
    """The summable scheme of a codec that declares its payloads summable (``codec.summable``):
    :class:`NestedSum` for NDQSG, :class:`DQSGSum` for DQSG; other codecs' payloads cannot be summed
    (a TypeError says so)."""
    if getattr(codec, "summable", False):
        if isinstance(codec, NDQSG):
            if codec.rotation != "none":
                raise TypeError("NDQSG(rotation=...) runs on the payload paths only: the summable path's side "
                                "information is the previous step's sum in gradient coordinates; use "
                                "reducer='allgather', or DQSG(rotation='hadamard') on the allreduce")
            return NestedSum(codec.levels, codec.bucket_size, codec.adaptive)
        if isinstance(codec, DQSG):
            if codec.coding != "fixed":
                raise TypeError(f"DQSG(coding={codec.coding!r}) payloads are entropy coded and cannot be summed by an "
                                "allreduce: use reducer='allgather' or 'scatter_reduce' (summable fields stay "
                                "fixed-rate)")
            return DQSGSum(codec.levels, codec.bucket_size, codec.dither, codec.rotation)
    raise TypeError(f"{type(codec).__name__} payloads cannot be summed by an allreduce: use reducer='allgather' "
                    "or 'scatter_reduce'")
