"""NDQSG's multi-sender decoder on the payload path (docs/ALGORITHMS.md §2).

Every receiver holds the payloads of senders p = 0 … P−1 and decodes them in rank order. A DQSG
sender's payload decodes alone, ĝ_p = Δ(k_p − u_p). A nested sender's side information is the
running mean y_p = (Σ_{q<p} ĝ_q)·fl(1/p) of what was decoded before it, and its indices resolve to
K̂ = the member of k's coset nearest y_p/Δ + u_p (:meth:`CosetResolver.resolve`); a bucket whose K̂
misses the sender's checksum has failed. A failed bucket its syndromes explain is corrected
(:meth:`CosetResolver.correct`); the others become the sender's recovery requests — the next
stage of syndromes, or the bucket whole (:meth:`RecoveryProtocol.next_requests`) — which the
transport's ``recover`` collective answers. Every rank finds the same failures, so every rank
takes part in each round. Decoding then restarts with what the rounds brought (recovered buckets
patched exact) until a pass has no failed bucket: ĝ_p is then DQSG(s₁)'s reconstruction for every
sender, and the result is the mean (1/P)·Σ_p ĝ_p. Under adaptive nesting that last pass is priced
(:class:`~hvdquant.codecs.nesting_cost.NestingCost`) and decides the tensor's next step.
"""

from __future__ import annotations

import torch

from hvdquant.codecs.base import Codec, Encoded, Recover, TensorContext
from hvdquant.codecs.nesting_cost import Met, NestingCost
from hvdquant.codecs.recovery import Request
from hvdquant.kernels import DitherKey, ops
from hvdquant.stats import DecodeStats


class RankOrderDecoder:
    """One :meth:`NDQSG.aggregate` call: the payloads of one tensor from every sender, decoded by
    the frozen ``codec`` (an NDQSG), and what recovery rounds brought so far."""

    def __init__(self, codec: Codec, payloads: list[Encoded], ctx: TensorContext) -> None:
        self.codec, self.payloads, self.ctx = codec, payloads, ctx
        self.ranks, self.n = len(payloads), payloads[0].n
        self.device = next(iter(payloads[0].fields.values())).device
        self.fine, self.resolver, self.protocol = codec.fine, codec.resolver, codec.recovery
        self.policy = codec.policy(ctx)
        #: sender -> recovered (buckets, true indices), patched into every later pass
        self.known: dict[int, list[tuple[list[int], torch.Tensor]]] = {}
        #: sender -> bucket -> the syndromes it sent so far
        self.syndromes: dict[int, dict[int, torch.Tensor]] = {}
        self.replied = [0] * self.ranks  # recovery bytes each sender handed over
        self.stats = DecodeStats()
        self.rho = codec.ratio(ctx.name, self.policy)
        #: adaptive: per nested-role sender, what decoding it met (the last pass, once nothing
        #: fails, holds the exact indices), for pricing every candidate ratio
        self.met: dict[int, Met] = {}

    def run(self, recover: Recover | None) -> tuple[torch.Tensor, DecodeStats]:
        """Passes and recovery rounds until no bucket fails; the mean, this call's decode stats."""
        while True:
            total, failed, resolved = self.decode_pass()
            if not failed:
                if self.policy is not None:
                    NestingCost(self.codec).decide(self.ctx.name, self.policy, self.ranks, self.n, self.met,
                                                   self.replied)
                return total / self.ranks, self.stats
            if recover is None:
                raise RuntimeError(f"NDQSG decoding failed in {sum(map(len, failed.values()))} bucket(s) of "
                                   f"'{self.ctx.name}' and no recovery round is available")
            self.stats.recovery_rounds += 1
            self.take(recover(failed), failed, resolved)

    def decode_pass(self) -> tuple[torch.Tensor, dict[int, list[Request]], dict[int, torch.Tensor]]:
        """Σ_p ĝ_p in rank order with what recovery brought so far; per sender still failing, its
        next requests and its resolved indices K̂ (a whole bucket's reply is patched into them)."""
        fine, n = self.fine, self.n
        total = torch.zeros(n, dtype=torch.float32, device=self.device)
        failed: dict[int, list[Request]] = {}
        resolved: dict[int, torch.Tensor] = {}
        for p, enc in enumerate(self.payloads):
            pctx = self.ctx.sender(p)
            key = fine.keyed(pctx.key, pctx.ranks)
            if "cosets" not in enc.fields:
                if self.codec.adaptive and p >= self.codec.dqsg_senders(self.ranks):
                    k = ops.unpack_symbols(enc.fields["symbols"], fine.symbols, n).to(torch.int32) - fine.levels
                    self.met[p] = (k, enc.fields["delta"], key, total * (1.0 / p))
                total += fine.decode(enc, pctx)
                continue
            # the mean so far, as a product by fl(1/p): a framework's division by a scalar may be a
            # reciprocal multiply on a GPU and a true division on a CPU (other side bits, other K̂)
            side = total * (1.0 / p)
            kout, bad = self.resolve(p, enc, key, side)
            if bad:
                failed[p], resolved[p] = self.protocol.next_requests(bad, self.syndromes.get(p, {})), kout
            self.met[p] = (kout, enc.fields["delta"], key, side)
            total += fine.decode_sum(kout, enc.fields["delta"], key)
        return total, failed, resolved

    def resolve(self, p: int, enc: Encoded, key: DitherKey, side: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Nested sender p's K̂ against ``side``, its recovered buckets kept exact and the failed
        buckets its syndromes explain corrected; K̂ and the buckets still failed."""
        resolver, checksum = self.resolver, enc.fields["checksum"]
        kout, bad = resolver.resolve(self.codec.residues(enc, self.rho), enc.fields["delta"], side, key, 1,
                                     checksum, self.rho)
        done: set[int] = set()
        for buckets, truth in self.known.get(p, ()):
            resolver.patch(kout, buckets, truth, DecodeStats())  # counted when first recovered
            done.update(buckets)
        bad = [b for b in bad if b not in done]
        if bad and self.syndromes.get(p):
            fixed, truth = resolver.correct(kout, bad, self.syndromes[p], checksum, self.rho)
            if fixed:
                resolver.patch(kout, fixed, truth, self.stats)
                self.known.setdefault(p, []).append((fixed, truth))
                bad = [b for b in bad if b not in set(fixed)]
        return kout, bad

    def take(self, replies: dict[int, torch.Tensor], failed: dict[int, list[Request]],
             resolved: dict[int, torch.Tensor]) -> None:
        """A recovery round's ``replies`` to the requests ``failed``: syndromes kept per bucket,
        whole buckets patched into the sender's ``resolved`` indices and kept for later passes."""
        for p, requests in failed.items():
            self.replied[p] += replies[p].numel()
            reply = self.protocol.parse(replies[p], self.n, requests)
            mine = self.syndromes.setdefault(p, {})
            for b, s in reply.syndromes:
                mine[b] = s if b not in mine else torch.cat([mine[b], s])
            if reply.whole:
                self.resolver.patch(resolved[p], reply.whole, reply.truth, self.stats)
                self.known.setdefault(p, []).append((reply.whole, reply.truth))
