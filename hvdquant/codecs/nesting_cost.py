"""Adaptive nesting's prices on the payload path (docs/ALGORITHMS.md §2, "Adaptive nesting").

After a step of tensor ``name`` every receiver holds, per nested-role sender p (ranks ⌈rP⌉ … P−1),
what decoding p met: its exact DQSG(s₁) indices k_p (n coordinates in buckets of d), its steps Δ_p,
its dither key and the side information y_p its payload was decoded against. Each candidate ratio
ρ is priced on those senders,

    B(ρ) = Σ_p B_p(ρ),   B_p(ρ) = 8·⌈n/d⌉ + C(n, ρ) + 2·W_p(ρ) + S(R_p(ρ))

(8 bytes per bucket: Δ_b and the checksum; C(n, ρ): the packed cosets, :func:`sizes.coset_bytes`;
W_p: syndrome words of 2 bytes; S(R): the DQSG(s₁) symbol bytes of the R coordinates resent
whole), against B_DQSG, the DQSG(s₁) bytes of the same senders. For the ratio in use while
nesting is on, B_p is what p really handed over (its payload and its recovery replies); for every
other ρ it is a probe: k_p's residues mod ρ resolved against y_p
(:meth:`CosetResolver.probe_resolve`). The probe holds the true indices, so it counts the wrong
coordinates w of each failed bucket; a locating stage of 2t syndromes corrects exactly the buckets
with w ≤ t, so a bucket is priced at the syndromes it would be sent and, past the last stage,
resent whole. :meth:`NestingPolicy.choose` then keeps the cheapest ρ and applies the rule. Every
rank decodes every payload alike, so every rank prices and decides alike, without a collective.

A fusion group is priced at once: per nested-role sender and candidate ratio, one resolve and one
checksum launch over the group's tensors end to end (each tensor probed or not), and, where buckets
fail and locating is on, one count of the wrong coordinates per bucket; prices are then summed and
decisions taken per tensor on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hvdquant.codecs.base import Codec, layout_bytes
from hvdquant.codecs.coset_resolver import covered
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.kernels import ops, sizes
from hvdquant.kernels.segments import Segments, by_segment


@dataclass(frozen=True)
class SenderPass:
    """What decoding met of one nested-role sender p over a fusion group, for pricing: its exact
    DQSG(s₁) indices k_p (int32), its steps Δ_p and the side information y_p its payloads met,
    each the group's tensors end to end, and the group's segments with p's keys."""

    k: torch.Tensor
    delta: torch.Tensor
    side: torch.Tensor
    segments: Segments

    @functools.cached_property
    def checksums(self) -> torch.Tensor:
        """The checksums of k over all the group's buckets (one launch, shared by every ratio probed)."""
        return ops.bucket_checksum_segments(self.k, self.segments)


@dataclass(frozen=True)
class NestingCost:
    """The prices B_p(ρ) and the decisions of adaptive nesting for the frozen ``codec`` (an NDQSG)."""

    codec: Codec

    def nested_bytes(self, n: int, recovered: int, syndromes: int = 0, rho: int | None = None) -> int:
        """B_p: bytes a nested sender hands over for n coordinates with ratio ``rho`` (default
        s₁/s₂), ``recovered`` of them resent as DQSG(s₁), ``syndromes`` syndrome words (2 bytes
        each) sent to locate wrong coordinates."""
        codec = self.codec
        nb = sizes.num_buckets(n, codec.bucket_size)
        return 8 * nb + sizes.coset_bytes(n, rho or codec.nesting_ratio) + 2 * syndromes + (
            sizes.symbol_bytes(recovered, codec.fine.symbols) if recovered else 0)

    def probe(self, met: SenderPass, rho: int, probed: Sequence[bool]) -> list[int | None]:
        """B_probe(ρ) of each ``probed`` tensor (None for the others): the bytes one sender's exact
        indices cost sent nested with ratio ``rho`` against its side information. Each failed
        bucket's wrong coordinates w decide the locating stages it gets (those before the first 2t
        with w ≤ t) and whether it is then resent whole (Reed–Solomon decoding,
        :mod:`~hvdquant.codecs.syndromes`); the group's probe is :meth:`CosetResolver.probe_group`."""
        codec, segs = self.codec, met.segments
        d, stages = codec.bucket_size, codec.locate_stages()
        kout, wrong = codec.resolver.probe_group(met.k, met.delta, met.side, segs, 1, rho, probed, met.checksums)
        flat = torch.nonzero(wrong).flatten().tolist()
        bad = by_segment(flat, segs.buckets)
        counts = self._wrong_per_bucket(kout, met.k, segs, bad) if flat and stages else [[] for _ in bad]
        prices: list[int | None] = []
        for n, c, failed, w in zip(segs.lengths, probed, bad, counts):
            if not c:
                prices.append(None)
                continue
            words, sent = 0, 0
            for total in stages:  # cumulative syndrome counts 2t
                words += (total - sent) * sum(1 for x in w if x > sent // 2)  # buckets still failing get this stage
                sent = total
            whole = [b for b, x in zip(failed, w) if x > sent // 2] if stages else failed
            prices.append(self.nested_bytes(n, covered(whole, d, n), words, rho))
        return prices

    @staticmethod
    def _wrong_per_bucket(kout: torch.Tensor, k: torch.Tensor, segs: Segments, bad: list[list[int]]
                          ) -> list[list[int]]:
        """Per tensor, the wrong coordinates of each of its ``bad`` buckets (one count for the group)."""
        d = segs.bucket
        sizes_ = np.concatenate([np.minimum(d, n - d * np.arange(nb)) for n, nb in zip(segs.lengths, segs.buckets)]
                                or [np.zeros(0, dtype=np.int64)])
        ids = torch.repeat_interleave(torch.arange(len(sizes_), device=k.device),
                                      torch.from_numpy(sizes_.astype(np.int64)).to(k.device))
        per_bucket = torch.zeros(len(sizes_), dtype=torch.int64, device=k.device).index_add_(
            0, ids, (kout != k).to(torch.int64))
        starts = segs.offsets(list(segs.buckets))
        where = [starts[i] + b for i, buckets in enumerate(bad) for b in buckets]
        flat = per_bucket[torch.tensor(where, dtype=torch.int64, device=k.device)].tolist()
        out, pos = [], 0
        for buckets in bad:
            out.append(flat[pos:pos + len(buckets)])
            pos += len(buckets)
        return out

    def decide(self, names: Sequence[str], policies: Sequence[NestingPolicy | None], ranks: int,
               lengths: Sequence[int], met: dict[int, SenderPass], replied: Sequence[Sequence[int]]) -> None:
        """Nesting and ratio of every tensor ``names[i]`` (``lengths[i]`` coordinates) with a
        ``policies[i]`` at its next step: B(ρ)
        for every candidate ratio from this step's nested-role senders ``met`` (``replied[i][p]``:
        the recovery bytes sender p handed over for tensor i) against B_DQSG
        (:meth:`NestingPolicy.choose`)."""
        codec = self.codec
        senders = ranks - codec.dqsg_senders(ranks)
        if not senders:
            return
        on = [p is not None and p.is_on(name) for name, p in zip(names, policies)]
        current = [codec.ratio(name, p) if p is not None else 0 for name, p in zip(names, policies)]
        cost: list[dict[int, int]] = [{} for _ in names]
        for rho in codec.candidate_ratios():
            probed = [p is not None and not (rho == r and o) for p, r, o in zip(policies, current, on)]
            for i, (p, n) in enumerate(zip(policies, lengths)):
                if p is not None and not probed[i]:
                    cost[i][rho] = sum(self.nested_bytes(n, 0, 0, rho) + replied[i][s] for s in met)
            if any(probed):
                prices = [self.probe(m, rho, probed) for m in met.values()]
                for i in (i for i, pr in enumerate(probed) if pr):
                    cost[i][rho] = sum(price[i] for price in prices)
        for name, policy, n, c in zip(names, policies, lengths, cost):
            if policy is not None:
                plain = senders * layout_bytes(codec.fine.layout(n))
                policy.choose(name, c, plain, buckets=senders * sizes.num_buckets(n, codec.bucket_size))
