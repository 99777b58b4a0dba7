"""The two ways a payload exchange aggregates a fused group (docs/ALGORITHMS.md §3).

- :class:`AllgatherReduction` (``"allgather"``): every rank gathers every rank's group buffer and
  aggregates each tensor's payloads with the codec (paper-faithful NDQSG, QSGD-Elias, 1-bit SGD); a
  codec's second round (NDQSG recovery) runs per tensor when its group is finished. Wire cost per
  rank ≈ b·n·(P−1) bits.
- :class:`ScatterReduceAllgather` (``"scatter_reduce"``): each tensor is split into P
  bucket-aligned chunks; chunk c of every tensor of the group goes to rank c in one all-to-all; its
  owner aggregates the P payloads, re-encodes the mean with the codec, **decodes its own
  re-encoding**, and one allgather of the group's re-encodings gives every rank the same bits. Two
  quantizations per coordinate; wire cost ≈ 2b·n·(P−1)/P bits.

Uncompressed tensors travel in the same buffers as float32 bytes, summed in rank order.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hvdquant.codecs.base import Codec, Encoded, Recover, TensorContext, all_finite
from hvdquant.codecs.feedback import ErrorFeedback
from hvdquant.codecs.state import CodecState
from hvdquant.stats import CommStats, DecodeStats
from hvdquant.transports.collectives import (
    Collectives,
    Parts,
    Started,
    chunk_bounds,
    poisoned,
    raise_if_poisoned,
    rank_order_sum,
)
from hvdquant.transports.fusion import Group, Item, buffer_of, group_buffer, split
from hvdquant.transports.session import dither_key


class PayloadHost(Protocol):
    """What a reduction uses of the exchange that runs it (:class:`~hvdquant.transports.payload.PayloadExchange`)."""

    codec: Codec
    coll: Collectives
    codec_state: CodecState
    stats: CommStats
    decode: DecodeStats

    def outputs(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def record_payload(self, enc: Encoded, coordinates: int) -> None: ...

Results = dict[str, torch.Tensor | str]  # per tensor name: the output, or the error every rank raises


def innermost(codec: Codec) -> Codec:
    """The codec under error feedback (itself where there is none)."""
    return codec.codec if isinstance(codec, ErrorFeedback) else codec


class Reduction:
    """One reducer's rules for the exchange ``ex`` it serves (whose codec, collectives, codec state
    and counters it uses): how a tensor is cut into destination chunks, the codec's context of a
    chunk, what this rank encodes of a tensor, how a group's first round is sent and how a group's
    received buffers become results."""

    name: str

    def __init__(self, ex: PayloadHost) -> None:
        self.ex = ex

    def chunks(self, n: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def context(self, item: Item, c: int, sender: int, phase: str = "") -> TensorContext:
        """The codec's context of chunk ``c`` of ``item`` as sent by ``sender``."""
        raise NotImplementedError

    def parts(self, item: Item, flat: torch.Tensor) -> list[tuple[torch.Tensor, TensorContext]]:
        """What this rank encodes of ``item`` (gradient ``flat``): every chunk with its codec context
        (the exchange encodes a whole buffer's chunks in one group call); FloatingPointError where
        the reducer must refuse a non-finite gradient before any chunk is encoded."""
        raise NotImplementedError

    def send(self, group: Group, tag: str) -> Started[Parts]:
        """Start the group's first round."""
        raise NotImplementedError

    def finish(self, group: Group) -> Results:
        """Wait for the group's first round, run what follows, and return every tensor's result."""
        raise NotImplementedError


class AllgatherReduction(Reduction):
    """Every rank's payloads of whole tensors to every rank; each rank aggregates them all."""

    name = "allgather"

    def chunks(self, n: int) -> list[tuple[int, int]]:
        return [(0, n)]

    def context(self, item: Item, c: int, sender: int, phase: str = "") -> TensorContext:
        return TensorContext(item.name, item.shape, dither_key(item.seed, item.step, item.name, sender),
                             self.ex.coll.size, self.ex.codec_state)

    def parts(self, item: Item, flat: torch.Tensor) -> list[tuple[torch.Tensor, TensorContext]]:
        return [(flat.view(item.shape), self.context(item, 0, self.ex.coll.rank))]

    def send(self, group: Group, tag: str) -> Started[Parts]:
        return self.ex.coll.allgather_bytes(group_buffer(group.items, 0), tag)

    def finish(self, group: Group) -> Results:
        """Every tensor's result from every rank's part of it: raw ones summed in rank order, the
        compressed ones aggregated by the codec as one group (its recovery rounds on demand)."""
        ex, results, means = self.ex, {}, {}
        live, received, ctxs, recovers = [], [], [], []
        for item, parts in zip(group.items, group.received(ex.coll.size)):
            error = poisoned(parts, item.name)
            if error is not None:
                results[item.name] = error
            elif item.raw:
                means[item.name] = rank_order_sum(parts) / ex.coll.size
            else:
                ctx = self.context(item, 0, ex.coll.rank)
                live.append(item)
                ctxs.append(ctx)
                received.append(parts)
                recovers.append(self._recover(item, ctx))
        payloads = by_sender(ex.codec, received, [item.numel for item in live], ctxs)
        for item, (mean, st) in zip(live, ex.codec.aggregate_group(payloads, ctxs, recovers)):
            ex.decode.add(st)
            means[item.name] = mean
        results.update(ex.outputs(means))
        return results

    def _recover(self, item: Item, ctx: TensorContext) -> Recover:
        """``item``'s second round: this rank's recovery reply where asked, every asked rank's reply."""
        ex, rank = self.ex, self.ex.coll.rank
        enc = item.encodings[0]

        def recover(failed: dict[int, list[int]]) -> dict[int, torch.Tensor]:
            mine = (ex.codec.recovery_payload(enc, ctx, failed[rank]) if rank in failed
                    else torch.empty(0, dtype=torch.uint8, device=item.device))
            round_ = ex.coll.allgather_bytes(mine, f"hvdquant.{item.name}.recovery")
            ex.stats.record(0, round_.nbytes)  # recovery traffic is on the wire too
            ex.decode.recovery_bytes += round_.nbytes
            got = raise_if_poisoned(round_.wait(), item.name)
            return {p: got[p] for p in failed}

        return recover


class ScatterReduceAllgather(Reduction):
    """Chunk c of every tensor to its owner, rank c, which aggregates and re-encodes it; then every
    owner's re-encodings to every rank."""

    name = "scatter_reduce"

    def chunks(self, n: int) -> list[tuple[int, int]]:
        # P contiguous ranges cut at bucket boundaries where the codec has buckets
        return chunk_bounds(n, self.ex.coll.size, getattr(innermost(self.ex.codec), "bucket_size", 1))

    def context(self, item: Item, c: int, sender: int, phase: str = "") -> TensorContext:
        lo, hi = item.chunks[c]
        cname = f"{item.name}#{c}{phase}"
        return TensorContext(cname, (hi - lo,), dither_key(item.seed, item.step, cname, sender), self.ex.coll.size,
                             self.ex.codec_state)

    def parts(self, item: Item, flat: torch.Tensor) -> list[tuple[torch.Tensor, TensorContext]]:
        if not all_finite(flat):  # checked first: no chunk's encoding may change the codec state
            raise FloatingPointError(f"non-finite gradient in '{item.name}'")
        return [(flat[lo:hi], self.context(item, c, self.ex.coll.rank)) for c, (lo, hi) in enumerate(item.chunks)]

    def send(self, group: Group, tag: str) -> Started[Parts]:
        bufs = [group_buffer(group.items, c) for c in range(self.ex.coll.size)]
        return self.ex.coll.alltoall_bytes(bufs, f"{tag}.scatter")

    def finish(self, group: Group) -> Results:
        results: Results = {}
        live, received = [], []
        for item, parts in zip(group.items, group.received(self.ex.coll.size)):
            error = poisoned(parts, item.name)
            if error is not None:
                results[item.name] = error
                continue
            live.append(item)
            received.append(parts)
        mine = buffer_of(self._reduced(live, received), group.items[0].device)
        gathered = self.ex.coll.allgather_bytes(mine, f"hvdquant.{live[0].name if live else 'none'}.gather")
        self.ex.stats.record(0, gathered.nbytes)
        owned = [split(buf, len(live)) for buf in raise_if_poisoned(gathered.wait(), "group")]
        results.update(self._assembled(live, owned))
        return results

    def _reduced(self, items: list[Item], received: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """This rank's chunk of every item, aggregated over every rank's part, as byte pieces: the
        rank-order float32 sum (raw), or the codec's re-encoding of the mean (counted as payload);
        the compressed items aggregated and re-encoded as one group."""
        ex, rank = self.ex, self.ex.coll.rank
        out: dict[str, list[torch.Tensor]] = {item.name: [rank_order_sum(parts).view(torch.uint8)]
                                              for item, parts in zip(items, received) if item.raw}
        coded = [(item, parts) for item, parts in zip(items, received) if not item.raw]
        ctxs = [self.context(item, rank, 0) for item, _ in coded]
        payloads = by_sender(ex.codec, [parts for _, parts in coded],
                             [item.chunks[rank][1] - item.chunks[rank][0] for item, _ in coded], ctxs)
        aggregated = ex.codec.aggregate_group(payloads, ctxs, [None] * len(coded))
        for _, st in aggregated:
            ex.decode.add(st)
        second = innermost(ex.codec)  # no error feedback on the re-encoding
        rencs = second.encode_group([mean for mean, _ in aggregated],
                                    [self.context(item, rank, rank, "@reduced") for item, _ in coded])
        for (item, _), renc in zip(coded, rencs):
            if renc is None:
                raise FloatingPointError(f"the mean of '{item.name}' is not finite (overflow in the aggregation)")
            ex.record_payload(renc, 0)  # these coordinates were counted when scattered
            out[item.name] = renc.byte_views()
        return [out[item.name] for item in items]

    def _assembled(self, items: list[Item], owned: list[list[torch.Tensor]]) -> Results:
        """Every item's result from every owner's chunks (rank c owns chunk c; ``owned[c][i]``: item
        i's): the re-encodings decoded, owner by owner as one group, or the rank-order sums divided
        by P (raw)."""
        second, ranks = innermost(self.ex.codec), self.ex.coll.size
        results = [torch.empty(item.numel, dtype=torch.float32, device=item.device) for item in items]
        for c in range(ranks):
            bufs, ns, ctxs, where = [], [], [], []
            for i, item in enumerate(items):
                clo, chi = item.chunks[c]
                if item.raw:
                    results[i][clo:chi] = owned[c][i].clone().view(torch.float32)
                    continue
                bufs.append(owned[c][i])
                ns.append(chi - clo)
                ctxs.append(self.context(item, c, c, "@reduced"))
                where.append(i)
            for i, decoded in zip(where, second.decode_group(second.from_bytes_group(bufs, ns, ctxs), ctxs)):
                clo, chi = items[i].chunks[c]
                results[i][clo:chi] = decoded
        return self.ex.outputs({item.name: r if not item.raw else r / ranks for item, r in zip(items, results)})


def by_sender(codec: Codec, received: list[list[torch.Tensor]], ns: list[int], ctxs: list[TensorContext]
              ) -> list[list[Encoded]]:
    """Every tensor's payload from every sender (``received[i][p]``: tensor i's bytes from sender p;
    ``ns[i]`` coordinates, this rank's context ``ctxs[i]``), parsed with one copy for all
    (:meth:`Codec.from_bytes_group`): ``payloads[i][p]``."""
    ranks = len(received[0]) if received else 0
    flat = codec.from_bytes_group([parts[p] for parts in received for p in range(ranks)],
                                  [n for n in ns for _ in range(ranks)],
                                  [ctx.sender(p) for ctx in ctxs for p in range(ranks)])
    return [flat[i * ranks:(i + 1) * ranks] for i in range(len(received))]


REDUCTIONS: dict[str, type[Reduction]] = {r.name: r for r in (AllgatherReduction, ScatterReduceAllgather)}
