"""NDQSG's multi-sender decoder on the payload path (docs/ALGORITHMS.md §2), over a fusion group.

Every receiver holds the payloads of senders p = 0 … P−1 and decodes them in rank order. A DQSG
sender's payload decodes alone, ĝ_p = Δ(k_p − u_p). A nested sender's side information is the
running mean y_p = (Σ_{q<p} ĝ_q)·fl(1/p) of what was decoded before it, and its indices resolve to
K̂ = the member of k's coset nearest y_p/Δ + u_p (:meth:`CosetResolver.resolve`); a bucket whose K̂
misses the sender's checksum has failed. A failed bucket its syndromes explain is corrected
(:meth:`CosetResolver.correct`); the others become the sender's recovery requests — the next
stage of syndromes, or the bucket whole (:meth:`RecoveryProtocol.next_requests`) — which the
transport's ``recover`` collective of that tensor answers. Every rank finds the same failures, so
every rank takes part in each round. Decoding then restarts with what the rounds brought (recovered
buckets patched exact) until a pass has no failed bucket: ĝ_p is then DQSG(s₁)'s reconstruction
for every sender, and the result is the mean (1/P)·Σ_p ĝ_p. Under adaptive nesting that last pass
is priced (:class:`~hvdquant.codecs.nesting_cost.NestingCost`) and decides each tensor's next step.

The decoder takes a whole fusion group (one tensor is a group of one): a pass keeps the group's
running sum end to end, and per sender its DQSG payloads decode in one launch, its nested payloads'
cosets unpack in one launch per ratio in use, resolve in one, their checksums in one and their
reconstructions in one; only a tensor with failed buckets goes through the host. A round calls the
failing tensors' ``recover`` collectives in tensor order and the pass repeats for the whole group
(tensors already exact decode to the same bits again).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from hvdquant.codecs.base import Codec, Encoded, Recover, TensorContext
from hvdquant.codecs.coset_resolver import Repair
from hvdquant.codecs.nesting_cost import NestingCost, SenderPass
from hvdquant.codecs.recovery import Request
from hvdquant.kernels import ops
from hvdquant.kernels.segments import Segments, by_segment
from hvdquant.stats import DecodeStats

#: per tensor of the group, per sender: its recovery requests (a pass's failures)
Failures = dict[int, dict[int, list[Request]]]


class RankOrderDecoder:
    """One :meth:`NDQSG.aggregate_group` call: ``payloads[i][p]``, tensor i's payload from sender p,
    decoded by the frozen ``codec`` (an NDQSG) with contexts ``ctxs``, and what recovery rounds
    brought so far."""

    def __init__(self, codec: Codec, payloads: Sequence[list[Encoded]], ctxs: Sequence[TensorContext]) -> None:
        self.codec, self.payloads, self.ctxs = codec, payloads, ctxs
        self.ranks = len(payloads[0])
        self.lengths = [p[0].n for p in payloads]
        self.starts = list(itertools.accumulate(self.lengths, initial=0))[:-1]  # each tensor's start in the group
        self.device = next(iter(payloads[0][0].fields.values())).device
        self.fine, self.resolver, self.protocol = codec.fine, codec.resolver, codec.recovery
        self.policies = [codec.policy(c) for c in ctxs]
        self.ratios = [codec.ratio(c.name, policy) for c, policy in zip(ctxs, self.policies)]
        tensors = range(len(ctxs))
        #: (tensor, sender) -> recovered (buckets, true indices), patched into every later pass
        self.known: dict[tuple[int, int], list[tuple[list[int], torch.Tensor]]] = {}
        #: (tensor, sender) -> bucket -> the syndromes it sent so far
        self.syndromes: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        self.replied = [[0] * self.ranks for _ in tensors]  # recovery bytes each sender handed over, per tensor
        self.stats = [DecodeStats() for _ in tensors]
        #: adaptive: per nested-role sender, what decoding it met over the group (the last pass, once
        #: nothing fails, holds the exact indices), for pricing every candidate ratio
        self.met: dict[int, SenderPass] = {}

    def run(self, recovers: Sequence[Recover | None]) -> tuple[torch.Tensor, list[DecodeStats]]:
        """Passes and recovery rounds until no bucket fails; the group's means end to end, and per
        tensor its decode stats."""
        while True:
            total, failed, resolved = self.decode_pass()
            if not failed:
                if any(policy is not None for policy in self.policies):
                    NestingCost(self.codec).decide([c.name for c in self.ctxs], self.policies, self.ranks, self.lengths,
                                                   self.met, self.replied)
                return total / self.ranks, self.stats
            for i in sorted(failed):
                if recovers[i] is None:
                    raise RuntimeError(f"NDQSG decoding failed in {sum(map(len, failed[i].values()))} bucket(s) of "
                                       f"'{self.ctxs[i].name}' and no recovery round is available")
            for i in sorted(failed):
                self.stats[i].recovery_rounds += 1
                self.take(i, recovers[i](failed[i]), failed[i], resolved[i])

    def decode_pass(self) -> tuple[torch.Tensor, Failures, dict[int, dict[int, torch.Tensor]]]:
        """Σ_p ĝ_p of every tensor, end to end, in rank order with what recovery brought so far; per
        tensor and sender still failing, its next requests and its resolved indices K̂ (a whole
        bucket's reply is patched into them)."""
        total = torch.zeros(sum(self.lengths), dtype=torch.float32, device=self.device)
        failed: Failures = {}
        resolved: dict[int, dict[int, torch.Tensor]] = {}
        for p in range(self.ranks):
            encs = [payloads[p] for payloads in self.payloads]
            ctxs = [c.sender(p) for c in self.ctxs]
            segs = self.fine.segments(ctxs, self.lengths)
            nests = ["cosets" in e.fields for e in encs]
            plain = [i for i, nested in enumerate(nests) if not nested]
            # the mean so far, as a product by fl(1/p): a framework's division by a scalar may be a
            # reciprocal multiply on a GPU and a true division on a CPU (other side bits, other K̂)
            side = total * (1.0 / p) if p else None
            delta = torch.cat([e.fields["delta"] for e in encs])
            kout = None
            if plain:
                self._add(total, plain, self.fine.decode_flat([encs[i] for i in plain], [ctxs[i] for i in plain]))
            if len(plain) < len(encs):
                kout = self._resolve(p, encs, segs, nests, side, delta, failed, resolved)
                decoded = ops.dqsg_decode_segments(kout, delta, segs, 0)
                nested = [i for i, n in enumerate(nests) if n]
                self._add(total, nested, decoded if not plain else
                          torch.cat([part for part, n in zip(decoded.split(self.lengths), nests) if n]))
            if self.codec.adaptive and p >= self.codec.dqsg_senders(self.ranks):
                self.met[p] = SenderPass(self._exact(plain, encs, segs, kout), delta, side, segs)
        return total, failed, resolved

    def _add(self, total: torch.Tensor, members: list[int], decoded: torch.Tensor) -> None:
        """total += the ``members``' decoded payloads (``decoded``: theirs end to end)."""
        if len(members) == len(self.lengths):
            total += decoded
            return
        for i, part in zip(members, decoded.split([self.lengths[i] for i in members])):
            self.part(total, i).add_(part)

    def part(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Tensor i's part of a buffer of the group's tensors end to end (a view)."""
        return flat[self.starts[i]:self.starts[i] + self.lengths[i]]

    def _exact(self, plain: list[int], encs: list[Encoded], segs: Segments, kout: torch.Tensor | None
               ) -> torch.Tensor:
        """A sender's DQSG(s₁) indices over the group, end to end: its nested payloads' resolved ones
        (``kout``), its DQSG payloads' unpacked (one launch)."""
        if not plain:
            return kout
        fine = self.fine
        group = segs.subset(plain)
        k = ops.unpack_symbols_segments(torch.cat([encs[i].fields["symbols"] for i in plain]), group,
                                        fine.symbols).to(torch.int32).sub_(fine.levels)
        if kout is None:
            return k
        exact = kout.clone()
        for i, part in zip(plain, k.split(list(group.lengths))):
            self.part(exact, i).copy_(part)
        return exact

    def _resolve(self, p: int, encs: list[Encoded], segs: Segments, nests: list[bool], side: torch.Tensor,
                 delta: torch.Tensor, failed: Failures, resolved: dict[int, dict[int, torch.Tensor]]) -> torch.Tensor:
        """Sender p's nested payloads resolved against ``side`` (one launch for the group, its DQSG
        payloads' parts left 0), their recovered buckets kept exact and the failed buckets their
        syndromes explain corrected; K̂ of the group end to end. Tensors still failing join
        ``failed`` and ``resolved``."""
        ratios = tuple(r if n else 0 for r, n in zip(self.ratios, nests))
        residues = self._residues(encs, segs, ratios)
        kout = ops.nested_decode_segments(residues, delta, segs, ratios, side, 1)
        chosen = tuple(nests)
        sent = torch.cat([e.fields["checksum"] for e, n in zip(encs, nests) if n]).to(torch.int64) & 0xFFFFFFFF
        wrong = torch.nonzero(ops.bucket_checksum_segments(kout, segs, chosen) != sent).flatten().tolist()
        bad_by_tensor = by_segment(wrong, [nb if n else 0 for nb, n in zip(segs.buckets, nests)])
        still = {i: self._patch_known(i, p, self.part(kout, i), bad)
                 for i, (nested, bad) in enumerate(zip(nests, bad_by_tensor)) if nested}
        self._correct(p, kout, encs, still)
        for i, bad in still.items():
            if bad:
                failed.setdefault(i, {})[p] = self.protocol.next_requests(bad, self.syndromes.get((i, p), {}))
                resolved.setdefault(i, {})[p] = self.part(kout, i)
        return kout

    def _residues(self, encs: list[Encoded], segs: Segments, ratios: tuple[int, ...]) -> torch.Tensor:
        """The group's cosets unpacked, end to end (one launch per ratio in use; 0 where a tensor
        sent DQSG(s₁))."""
        classes = sorted({r for r in ratios if r})
        if len(classes) == 1 and all(ratios):
            return ops.unpack_cosets_segments(torch.cat([e.fields["cosets"] for e in encs]), segs, classes[0])
        residues = torch.zeros(segs.elements, dtype=torch.uint8, device=self.device)
        for rho in classes:
            members = [i for i, r in enumerate(ratios) if r == rho]
            group = segs.subset(members)
            unpacked = ops.unpack_cosets_segments(torch.cat([encs[i].fields["cosets"] for i in members]), group, rho)
            for i, part in zip(members, unpacked.split(list(group.lengths))):
                self.part(residues, i).copy_(part)
        return residues

    def _patch_known(self, i: int, p: int, kout: torch.Tensor, bad: list[int]) -> list[int]:
        """Tensor i's sender p: the buckets recovered in earlier rounds patched exact into its
        ``kout``; its failed buckets ``bad`` less those."""
        done: set[int] = set()
        for buckets, truth in self.known.get((i, p), ()):
            self.resolver.patch(kout, buckets, truth, DecodeStats())  # counted when first recovered
            done.update(buckets)
        return [b for b in bad if b not in done]

    def _correct(self, p: int, kout: torch.Tensor, encs: list[Encoded], still: dict[int, list[int]]) -> None:
        """Sender p's failed buckets ``still`` (per tensor) that their syndromes explain, corrected in
        one pass for the group (:meth:`CosetResolver.correct_group`), patched into ``kout`` (the
        group's K̂ end to end) and kept for later passes; ``still`` left with the buckets that fail."""
        tensors = [i for i, bad in still.items() if bad and self.syndromes.get((i, p))]
        if not tensors:
            return
        repairs = [Repair(self.starts[i], self.lengths[i], still[i], self.syndromes[(i, p)], encs[i].fields["checksum"],
                          self.ratios[i]) for i in tensors]
        for i, (fixed, truth) in zip(tensors, self.resolver.correct_group(kout, repairs)):
            if fixed:
                self.resolver.patch(self.part(kout, i), fixed, truth, self.stats[i])
                self.known.setdefault((i, p), []).append((fixed, truth))
                still[i] = [b for b in still[i] if b not in set(fixed)]

    def take(self, i: int, replies: dict[int, torch.Tensor], failed: dict[int, list[Request]],
             resolved: dict[int, torch.Tensor]) -> None:
        """A recovery round's ``replies`` to tensor i's requests ``failed``: syndromes kept per
        bucket, whole buckets patched into the sender's ``resolved`` indices and kept for later passes."""
        for p, requests in failed.items():
            self.replied[i][p] += replies[p].numel()
            reply = self.protocol.parse(replies[p], self.lengths[i], requests)
            mine = self.syndromes.setdefault((i, p), {})
            for b, s in reply.syndromes:
                mine[b] = s if b not in mine else torch.cat([mine[b], s])
            if reply.whole:
                self.resolver.patch(resolved[p], reply.whole, reply.truth, self.stats[i])
                self.known.setdefault((i, p), []).append((reply.whole, reply.truth))
