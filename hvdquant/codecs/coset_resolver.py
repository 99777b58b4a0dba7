"""The coset resolver (docs/ALGORITHMS.md §2–3): an index sum from its residues mod ρ.

A sender that nests sends, per coordinate, only the coset (k + ⌊ρ/2⌋) mod ρ of its DQSG(s₁) index
k, and per bucket one checksum Σ_j w_j·k_j mod 2^32 (w_j: odd hashed weights of the position j).
The receiver resolves K̂ = the member of the coset nearest y/Δ + u (y: side information, u: the
dither), which is exact iff |g − y + eΔ| < ρΔ/2; a bucket whose K̂ misses the checksum has failed.
The same resolver serves a single sender (payload path) and a sum of P senders (stock nested sum,
coset ring: residues of Σ_p k_p, summed checksums, the summed dithers), and adaptive nesting's
probe (what nesting at ratio ρ would have cost, from exact indices the receiver already holds).
Failed buckets are repaired from recovered true values (:meth:`CosetResolver.patch`) or from
syndromes that locate up to t wrong coordinates (:meth:`CosetResolver.correct`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hvdquant.codecs.syndromes import bucket_blocks, bucket_checks, locate_errors
from hvdquant.kernels import DitherKey, ops, sizes
from hvdquant.kernels.segments import Segments
from hvdquant.stats import DecodeStats


@dataclass(frozen=True)
class Repair:
    """One tensor's failed buckets for :meth:`CosetResolver.correct_group`: where its indices start
    in the group's and how many there are, the failed ``buckets``, their ``syndromes`` so far (per
    bucket), the sender's ``checksums`` of every bucket and the nesting ratio ``rho``."""

    start: int
    length: int
    buckets: list[int]
    syndromes: dict[int, torch.Tensor]
    checksums: torch.Tensor
    rho: int


def bucket_coordinates(buckets: list[int], bucket_size: int, n: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Coordinates of the given buckets, bucket by bucket in the order given (the last may be short)."""
    if not buckets:
        return torch.empty(0, dtype=torch.int64, device=device)
    idx = (torch.tensor(buckets, dtype=torch.int64, device=device)[:, None] * bucket_size
           + torch.arange(min(bucket_size, n), dtype=torch.int64, device=device)[None, :]).reshape(-1)
    return idx[idx < n]


def covered(buckets: list[int], bucket_size: int, n: int) -> int:
    """How many coordinates :func:`bucket_coordinates` gives (the last bucket may be short), without
    building them."""
    return sum(min(bucket_size, n - b * bucket_size) for b in buckets)


@dataclass(frozen=True)
class CosetResolver:
    """Resolving, checking and repairing index sums of DQSG(``levels``) indices (s₁) in buckets of
    ``bucket_size``; the nesting ratio ρ is an argument of each call (adaptive nesting picks it
    per tensor)."""

    bucket_size: int
    levels: int

    def resolve(self, residues: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
                senders: int, checksums: torch.Tensor, rho: int) -> tuple[torch.Tensor, list[int]]:
        """Resolve an index sum from its residues mod ``rho``.

        ``residues``: (Σ_p k_p + senders·⌊ρ/2⌋) mod ρ for the ``senders`` senders key.sender, … ;
        ``side``: an estimate of Σ_p g_p, bit-identical on every rank. Each coordinate takes the
        member of its coset nearest side/Δ + Σ_p u_p. Returns the resolved sums K̂ (int32) and the
        buckets whose checksum Σ_j w_j·K̂_j mod 2^32 differs from ``checksums`` (the senders'
        checksums summed mod 2^32): exactly the buckets where some coordinate resolved wrongly,
        up to checksum collisions."""
        kout = torch.empty(residues.numel(), dtype=torch.int32, device=residues.device)
        ops.nested_decode(residues, delta, self.bucket_size, rho, side.contiguous(), key, senders=senders, kout=kout)
        sent = checksums.to(torch.int64) & 0xFFFFFFFF
        bad = torch.nonzero(ops.bucket_checksum(kout, self.bucket_size) != sent).flatten().tolist()
        return kout, bad

    def probe_resolve(self, ksum: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
                      senders: int, rho: int) -> tuple[torch.Tensor, list[int]]:
        """:meth:`resolve` of the residues mod ``rho`` of the exact index sums ``ksum`` (int32) of
        ``senders`` senders, against ``side``: what nesting at ρ would have resolved (a group of one
        for :meth:`probe_group`)."""
        segments = Segments((ksum.numel(),), (key,), self.bucket_size)
        kout, wrong = self.probe_group(ksum, delta, side.contiguous(), segments, senders, rho, [True],
                                       ops.bucket_checksum(ksum, self.bucket_size))
        return kout, torch.nonzero(wrong).flatten().tolist()

    def probe(self, ksum: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
              senders: int, rho: int) -> list[int]:
        """The buckets that would fail if ``ksum`` had been sent nested at ``rho`` (adaptive
        nesting's probe: what nesting would have cost, from data the receiver already holds)."""
        return self.probe_resolve(ksum, delta, side, key, senders, rho)[1]

    def probe_group(self, ksum: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, segments: Segments,
                    senders: int, rho: int, probed: Sequence[bool], truth: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`probe_resolve` of every ``probed`` tensor (one flag per segment) of a group laid end
        to end (``segments``, keyed from the first of the ``senders`` senders) at ratio ``rho``: one
        resolve and one checksum launch. ``truth``: the checksums of ``ksum`` over all the group's
        buckets (one launch, shared by every ratio probed). Returns the resolved sums K̂ (0 outside
        the probed tensors) and which of the group's buckets would fail (a bool per bucket, False
        outside the probed tensors). The resolver takes the residues of ksum + senders·⌊ρ/2⌋ mod ρ."""
        kout = ops.nested_decode_segments(ksum + senders * (rho // 2), delta, segments,
                                          tuple(rho if p else 0 for p in probed), side, senders)
        inside = torch.repeat_interleave(torch.tensor([bool(p) for p in probed]),
                                         torch.tensor(segments.buckets, dtype=torch.int64)).to(truth.device)
        return kout, (ops.bucket_checksum_segments(kout, segments) != truth) & inside

    def patch(self, kout: torch.Tensor, buckets: list[int], truth: torch.Tensor, stats: DecodeStats) -> None:
        """Write the recovered true index sums ``truth`` of failed ``buckets`` (their coordinates in
        the order given) into ``kout``, counting the buckets and the coordinates that had been wrong."""
        idx = bucket_coordinates(buckets, self.bucket_size, kout.numel(), kout.device)
        if truth.numel() != idx.numel():
            raise ValueError(f"recovery gave {truth.numel()} values; {len(buckets)} failed bucket(s) hold "
                             f"{idx.numel()} coordinates")
        truth = truth.to(device=kout.device, dtype=torch.int32)
        stats.failed_buckets += len(buckets)
        stats.failed_coordinates += int((kout[idx] != truth).sum())
        kout[idx] = truth

    def decode_sum(self, residues: torch.Tensor, delta: torch.Tensor, side: torch.Tensor | None, key: DitherKey,
                   senders: int, checksums: torch.Tensor, rho: int, *,
                   recover: Callable[[torch.Tensor], torch.Tensor], stats: DecodeStats) -> torch.Tensor:
        """Σ_p k_p over ``senders`` senders, exact: resolved with side information, failed buckets
        replaced by ``recover(coordinates)`` (a collective giving the true index sums there; every
        rank finds the same failures, so every rank takes part). Without side information every
        bucket is recovered (not counted as a failure)."""
        n, device = residues.numel(), residues.device
        if side is None:
            kout = torch.empty(n, dtype=torch.int32, device=device)
            bad = list(range(sizes.num_buckets(n, self.bucket_size)))
        else:
            kout, bad = self.resolve(residues, delta, side, key, senders, checksums, rho)
        if bad:
            stats.recovery_rounds += 1
            truth = recover(bucket_coordinates(bad, self.bucket_size, n, device))
            self.patch(kout, bad, truth, DecodeStats() if side is None else stats)
        return kout

    def correct(self, kout: torch.Tensor, buckets: list[int], syndromes: dict[int, torch.Tensor],
                checksums: torch.Tensor, rho: int, senders: int = 1) -> tuple[list[int], torch.Tensor]:
        """Failed ``buckets`` of the resolved indices ``kout`` that their ``syndromes`` (per bucket:
        the first 2t power sums mod LOCATE_PRIME of the true indices) explain by at most t wrong
        coordinates. Returns those buckets and their corrected indices (coordinates in the order of
        :func:`bucket_coordinates`). A correction is accepted only if the corrected bucket reproduces
        all its syndromes and its checksum, each change is a nonzero multiple of ρ and every index
        lies in [−s₁·senders, s₁·senders]; any other bucket stays failed. One tensor: a group of one
        (:meth:`correct_group`)."""
        return self.correct_group(kout, [Repair(0, kout.numel(), buckets, syndromes, checksums, rho)], senders)[0]

    def correct_group(self, k: torch.Tensor, repairs: list[Repair], senders: int = 1
                      ) -> list[tuple[list[int], torch.Tensor]]:
        """:meth:`correct` of several tensors' failed buckets at once (``k``: their resolved indices
        end to end; each :class:`Repair` says where its tensor lies and what it holds): one
        Berlekamp–Massey pass for every bucket with as many syndromes, whichever its tensor."""
        d = self.bucket_size
        by_len: dict[int, list[tuple[int, int]]] = {}
        for t, r in enumerate(repairs):
            for b in r.buckets:
                if b in r.syndromes:
                    by_len.setdefault(r.syndromes[b].numel(), []).append((t, b))
        sent = torch.cat([r.checksums for r in repairs]).to(torch.int64) & 0xFFFFFFFF if repairs else None
        first_check = list(itertools.accumulate((r.checksums.numel() for r in repairs), initial=0))
        fixed: list[list[int]] = [[] for _ in repairs]
        truths: list[list[torch.Tensor]] = [[] for _ in repairs]  # per tensor, its corrected rows' true indices
        for _, rows in sorted(by_len.items()):
            start = torch.tensor([repairs[t].start + b * d for t, b in rows], dtype=torch.int64, device=k.device)
            end = torch.tensor([repairs[t].start + min((b + 1) * d, repairs[t].length) for t, b in rows],
                               dtype=torch.int64, device=k.device)
            blocks, mask = bucket_blocks(k, start, end, d)
            s = torch.stack([repairs[t].syndromes[b] for t, b in rows]).to(blocks.device)
            rho = torch.tensor([repairs[t].rho for t, _ in rows], dtype=torch.int64, device=blocks.device)
            corrected, ok = locate_errors(blocks, mask, s, rho, self.levels * senders)
            checks = torch.tensor([first_check[t] + b for t, b in rows], dtype=torch.int64, device=sent.device)
            ok &= bucket_checks(corrected) == sent[checks].to(blocks.device)
            keep = torch.nonzero(ok).flatten().tolist()
            found = corrected[keep][mask[keep]].split(mask[keep].sum(1).tolist()) if keep else []
            for j, truth in zip(keep, found):
                t, b = rows[j]
                fixed[t].append(b)
                truths[t].append(truth)
        out = []
        for t, r in enumerate(repairs):
            truth = torch.cat(truths[t]) if truths[t] else torch.empty(0, dtype=torch.int64, device=k.device)
            assert truth.numel() == bucket_coordinates(fixed[t], d, r.length).numel()
            out.append((fixed[t], truth.to(torch.int32)))
        return out
