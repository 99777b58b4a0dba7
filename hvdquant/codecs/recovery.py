"""NDQSG's recovery protocol (docs/ALGORITHMS.md §2): what a nested sender is asked for its failed
buckets, what it replies, and how the reply is read.

Every rank decodes every payload alike, so every rank finds the same failed buckets and derives
the same requests; requests never travel, only the replies do. A failed bucket b is asked first
for the next stage of its power-sum syndromes Σ_j k_j·(j+1)^m mod 65521 (a
:class:`SyndromeRequest`; stage i brings the syndromes m ∈ [2t_{i−1}, 2t_i), 2 bytes each), which
locate and correct up to t_i wrong coordinates; once the stages are spent, the bucket is resent
whole (a :class:`WholeBucket`: its DQSG(s₁) symbols). A reply is the requested syndromes as
little-endian 2-byte words, in the order requested, then the packed symbols of the whole buckets
in the order requested (present, possibly empty, whenever no syndrome was requested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hvdquant.codecs.coset_resolver import bucket_coordinates
from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.requests import Request, SyndromeRequest, WholeBucket
from hvdquant.codecs.syndromes import LOCATE_PRIME, bucket_syndromes, syndrome_bytes, syndrome_words
from hvdquant.kernels import ops, sizes


def locate_stages(fine: DQSG, errors: tuple[int, ...]) -> tuple[int, ...]:
    """Cumulative syndrome counts 2t of the locating stages that correct up to t ∈ ``errors`` wrong
    coordinates of a bucket of DQSG(s₁) = ``fine`` symbols, each t capped so that a bucket's 2t
    syndromes of 2 bytes cost at most half its symbols, a stage kept only if it adds syndromes.
    Locators j+1 must be distinct mod the prime: none for bucket_size ≥ 65521."""
    if fine.bucket_size >= LOCATE_PRIME:
        return ()
    whole = sizes.symbol_bytes(fine.bucket_size, fine.symbols)
    out: list[int] = []
    for t in errors:
        t = min(t, whole // 8, fine.bucket_size)
        if t >= 1 and (not out or 2 * t > out[-1]):
            out.append(2 * t)
    return tuple(out)


@dataclass(frozen=True)
class Reply:
    """A parsed reply: (bucket, syndromes) per syndrome request, the whole buckets and their true
    indices (int32, coordinates in the order of :func:`bucket_coordinates`)."""

    syndromes: list[tuple[int, torch.Tensor]]
    whole: list[int]
    truth: torch.Tensor


@dataclass(frozen=True)
class RecoveryProtocol:
    """Requests, replies and their bytes for a codec sending DQSG(s₁) = ``fine`` symbols, with
    locating stages ``stages`` (cumulative syndrome counts 2t; empty: failed buckets are resent
    whole at once)."""

    fine: DQSG
    stages: tuple[int, ...]

    def next_requests(self, bad: list[int], have: dict[int, torch.Tensor]) -> list[Request]:
        """What to ask a sender for its still-failed buckets ``bad``, given the syndromes ``have``
        it sent so far (per bucket): each bucket's next stage of syndromes, or the bucket whole when
        the stages are spent; syndrome requests first, by stage then bucket, then whole buckets."""
        syn: list[SyndromeRequest] = []
        whole: list[Request] = []
        for b in bad:
            got = have[b].numel() if b in have else 0
            stage = sum(1 for c in self.stages if c <= got)
            if stage < len(self.stages):
                syn.append(SyndromeRequest(b, stage))
            else:
                whole.append(WholeBucket(b))
        return [*sorted(syn, key=lambda r: (r.stage, r.bucket)), *whole]

    def _split(self, requests: list[Request], n: int) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Syndrome requests as (bucket, first, end) syndrome ranges, and the whole buckets; refuses
        a request this codec cannot answer."""
        nb = sizes.num_buckets(n, self.fine.bucket_size)
        syn, whole = [], []
        for r in requests:
            if not isinstance(r, (SyndromeRequest, WholeBucket)):
                raise TypeError(f"a recovery request is a SyndromeRequest or a WholeBucket, got {r!r}")
            if not 0 <= r.bucket < nb:
                raise ValueError(f"recovery request {r} names no bucket of {n} coordinates ({nb} buckets)")
            if isinstance(r, WholeBucket):
                whole.append(r.bucket)
            elif not 0 <= r.stage < len(self.stages):
                raise ValueError(f"recovery request {r} names no syndrome stage of this codec ({self.stages})")
            else:
                syn.append((r.bucket, self.stages[r.stage - 1] if r.stage else 0, self.stages[r.stage]))
        return syn, whole

    def reply(self, symbols: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """A sender's reply from its DQSG(s₁) ``symbols`` (k + s₁, all n coordinates)."""
        fine, n = self.fine, symbols.numel()
        syn, whole = self._split(requests, n)
        parts = []
        if syn:
            k = symbols.to(torch.int64) - fine.levels
            rows: list[torch.Tensor | None] = [None] * len(syn)
            for lo, hi in sorted({(lo, hi) for _, lo, hi in syn}):  # one pass per stage
                sel = [i for i, r in enumerate(syn) if r[1:] == (lo, hi)]
                got = bucket_syndromes(k, [syn[i][0] for i in sel], fine.bucket_size, lo, hi)
                for i, row in zip(sel, got):
                    rows[i] = row
            parts.append(syndrome_bytes(torch.cat(rows)))
        if whole or not syn:
            idx = bucket_coordinates(whole, fine.bucket_size, n, symbols.device)
            parts.append(ops.pack_symbols(symbols[idx].contiguous(), fine.symbols))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def parse(self, buf: torch.Tensor, n: int, requests: list[Request]) -> Reply:
        """Read a reply to ``requests`` for n coordinates; a reply of the wrong size raises ValueError."""
        fine = self.fine
        syn, whole = self._split(requests, n)
        words = sum(hi - lo for _, lo, hi in syn)
        count = bucket_coordinates(whole, fine.bucket_size, n).numel()
        need = 2 * words + (sizes.symbol_bytes(count, fine.symbols) if whole or not syn else 0)
        if need != buf.numel():
            raise ValueError(f"recovery payload has {buf.numel()} bytes; the request ({len(syn)} syndrome "
                             f"stage(s), {len(whole)} whole bucket(s)) needs {need}")
        values = syndrome_words(buf[:2 * words])
        got, at = [], 0
        for b, lo, hi in syn:
            got.append((b, values[at:at + hi - lo]))
            at += hi - lo
        truth = ops.unpack_symbols(buf[2 * words:], fine.symbols, count).to(torch.int32) - fine.levels
        return Reply(got, whole, truth)
