"""Decoding a fused group of payloads end to end, for codecs with segmented kernels.

The payload exchange hands a codec a whole fusion group at once (:meth:`Codec.encode_group`,
:meth:`Codec.decode_group`, :meth:`Codec.aggregate_group`). A codec whose kernels run over a
segment table (:mod:`hvdquant.kernels.ops_segments`) decodes one sender's payloads of every tensor
of the group end to end in a constant number of launches; :class:`GroupDecoding` turns that into
the group methods, with the bits of the single-tensor methods: a mean is summed sender by sender
in sender order from zeros (:func:`~hvdquant.codecs.base.mean_in_sender_order`), as
:meth:`Codec.aggregate` sums tensor by tensor, and finished once (a shared rotation turned back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hvdquant.codecs.base import Encoded, Recover, TensorContext, mean_in_sender_order, shared_keys
from hvdquant.stats import DecodeStats


class GroupDecoding:
    """Mixin before :class:`~hvdquant.codecs.base.Codec`: the group decoder, reconstruction and
    aggregation from the codec's :meth:`decode_flat` and :meth:`finish_flat`."""

    def grouped(self, ctxs: Sequence[TensorContext]) -> bool:
        """Whether a group of these contexts runs the segmented kernels: several tensors whose keys
        share seed, sender and family (one exchange's group always does). Codecs narrow it."""
        return len(ctxs) > 1 and shared_keys(ctxs)

    def aggregates_by_sender(self, ranks: int) -> bool:
        """Whether :meth:`aggregate` sums decoded senders one by one among ``ranks`` senders (a codec
        with a faster joint decoder for some ``ranks`` says no there)."""
        return True

    def decode_flat(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext], sender: int | None = None
                    ) -> torch.Tensor:
        """Every payload decoded (by sender ``sender``'s keys where given), end to end, not finished."""
        raise NotImplementedError

    def finish_flat(self, flat: torch.Tensor, ctxs: Sequence[TensorContext], lengths: list[int]
                    ) -> list[torch.Tensor]:
        """A decoded group (or the mean of several) as one tensor each: split, by default."""
        return list(flat.split(lengths))

    def decode_group(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext]) -> list[torch.Tensor]:
        """:meth:`decode` of every payload with the same bits, in a constant number of launches."""
        if not self.grouped(ctxs):
            return super().decode_group(encs, ctxs)  # type: ignore[misc]
        return self.finish_flat(self.decode_flat(encs, ctxs), ctxs, [e.n for e in encs])

    def reconstruction_group(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext]) -> list[torch.Tensor]:
        """What every receiver takes the payloads for: their decodes."""
        return self.decode_group(encs, ctxs)

    def aggregate_group(self, payloads: Sequence[list[Encoded]], ctxs: Sequence[TensorContext],
                        recovers: Sequence[Recover | None]) -> list[tuple[torch.Tensor, DecodeStats]]:
        """:meth:`aggregate` of every tensor with the same bits: one group decode per sender, summed
        in sender order, finished once."""
        if not self.grouped(ctxs) or not self.aggregates_by_sender(len(payloads[0])):
            return super().aggregate_group(payloads, ctxs, recovers)  # type: ignore[misc]
        mean = mean_in_sender_order(payloads, lambda encs, p: self.decode_flat(encs, ctxs, sender=p))
        return [(m, DecodeStats()) for m in self.finish_flat(mean, ctxs, [p[0].n for p in payloads])]
