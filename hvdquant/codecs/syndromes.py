"""Locating wrong indices in a failed nested bucket (docs/ALGORITHMS.md §2).

A nested decode that resolves some coordinates of a bucket to the wrong coset member leaves an
error vector e (each nonzero entry a multiple of ρ) on a few coordinates. The sender's power sums
of its true indices, S_m = Σ_j k_j·(j+1)^m mod p (p = 65521, m < 2t), against the receiver's sums
of its resolved indices, are the syndromes of e in a Reed–Solomon code over GF(p) with locators
j+1: up to t wrong coordinates are found (Berlekamp–Massey for the locator polynomial, a Chien
search over the bucket's locators for its roots, Forney's formula for the values). Whole-tensor
torch integer arithmetic; NDQSG decides what to accept (:meth:`hvdquant.NDQSG.correct`).
"""

from __future__ import annotations

import functools

import torch

from hvdquant.kernels import ops

#: the prime of the locating syndromes: they fit 2 bytes, and the locators j+1 (j < bucket_size) are
#: distinct and nonzero mod it for bucket_size < LOCATE_PRIME
LOCATE_PRIME = 65521


def bucket_blocks(k: torch.Tensor, start: torch.Tensor, end: torch.Tensor, bucket_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The buckets k[start_r:end_r] as rows of ``bucket_size`` (int64, a short bucket padded with
    zeros) and the mask of real coordinates (``start``, ``end``: int64 per row, on k's device)."""
    idx = start[:, None] + torch.arange(bucket_size, dtype=torch.int64, device=k.device)[None, :]
    mask = idx < end[:, None]
    blocks = torch.where(mask, k.to(torch.int64)[idx.clamp_max(max(k.numel() - 1, 0))], 0)
    return blocks, mask


def listed_blocks(k: torch.Tensor, buckets: list[int], bucket_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bucket_blocks` of the given buckets of k (the last may be short)."""
    start = torch.tensor(buckets, dtype=torch.int64, device=k.device) * bucket_size
    return bucket_blocks(k, start, (start + bucket_size).clamp_max(k.numel()), bucket_size)


@functools.lru_cache(maxsize=64)
def _powers(bucket_size: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """(j+1)^m mod LOCATE_PRIME for m in [lo, hi) (rows), j < bucket_size (columns), int64; made once
    per shape and device (read only)."""
    x = torch.arange(1, bucket_size + 1, dtype=torch.int64, device=device)
    out = torch.empty(hi - lo, bucket_size, dtype=torch.int64, device=device)
    cur = _modpow(x, lo)
    for m in range(hi - lo):
        out[m] = cur
        cur = cur * x % LOCATE_PRIME
    return out


def _modpow(a: torch.Tensor, e: int) -> torch.Tensor:
    out = torch.ones_like(a)
    a = a % LOCATE_PRIME
    while e:
        if e & 1:
            out = out * a % LOCATE_PRIME
        a = a * a % LOCATE_PRIME
        e >>= 1
    return out


def _inverse(a: torch.Tensor) -> torch.Tensor:
    """a^(p−2) mod p: the inverse of a mod LOCATE_PRIME (0 for a ≡ 0), looked up in the table of all
    of them (one gather, not the 30-odd operations of the power)."""
    return _inverses(a.device)[a % LOCATE_PRIME]


@functools.lru_cache(maxsize=8)
def _inverses(device: torch.device) -> torch.Tensor:
    """a^(p−2) mod p for every a in [0, LOCATE_PRIME) (int64, made once per device, read only)."""
    return _modpow(torch.arange(LOCATE_PRIME, dtype=torch.int64, device=device), LOCATE_PRIME - 2)


def block_syndromes(blocks: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """S_m = Σ_j k_j·(j+1)^m mod LOCATE_PRIME of each row, m in [lo, hi) (int64). Exact in float64:
    every product is below p² < 2^32 and a row sums fewer than p of them (< 2^48 < 2^53)."""
    powers = _powers(blocks.shape[1], lo, hi, blocks.device)
    s = (blocks % LOCATE_PRIME).to(torch.float64) @ powers.to(torch.float64).T
    return s.to(torch.int64) % LOCATE_PRIME


def bucket_syndromes(k: torch.Tensor, buckets: list[int], bucket_size: int, lo: int, hi: int) -> torch.Tensor:
    """Syndromes m in [lo, hi) of the given buckets of the indices k, one row per bucket."""
    if not buckets:
        return torch.empty(0, hi - lo, dtype=torch.int64, device=k.device)
    return block_syndromes(listed_blocks(k, buckets, bucket_size)[0], lo, hi)


def bucket_checks(blocks: torch.Tensor) -> torch.Tensor:
    """The nested checksum of each row (:func:`ops.bucket_checksum` with the row as one bucket; the
    int32 view wraps mod 2^32, which the checksum, itself mod 2^32, does not see)."""
    return ops.bucket_checksum(blocks.reshape(-1).to(torch.int32).contiguous(), blocks.shape[1])


def syndrome_bytes(words: torch.Tensor) -> torch.Tensor:
    """Syndromes (< 2^16) as little-endian byte pairs."""
    return torch.stack([words & 0xFF, words >> 8], -1).reshape(-1).to(torch.uint8)


def syndrome_words(buf: torch.Tensor) -> torch.Tensor:
    pairs = buf.to(torch.int64).reshape(-1, 2)
    return pairs[:, 0] + 256 * pairs[:, 1]


def berlekamp_massey(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shortest linear recurrence of each row of syndromes s (F × N, mod LOCATE_PRIME), all rows
    at once: the connection polynomial Λ (F × (N+1), Λ_0 = 1) and its length L (F)."""
    p = LOCATE_PRIME
    rows, count = s.shape
    dev = s.device
    c = torch.zeros(rows, count + 1, dtype=torch.int64, device=dev)
    c[:, 0] = 1
    b_poly = c.clone()
    length = torch.zeros(rows, dtype=torch.int64, device=dev)
    shift = torch.ones(rows, dtype=torch.int64, device=dev)
    last = torch.ones(rows, dtype=torch.int64, device=dev)
    cols = torch.arange(count + 1, dtype=torch.int64, device=dev)
    for i in range(count):
        disc = (c[:, :i + 1] * s[:, i - cols[:i + 1]]).sum(1) % p
        src = cols[None, :] - shift[:, None]
        shifted = torch.where(src >= 0, b_poly.gather(1, src.clamp_min(0)), 0)
        coef = disc * _inverse(last) % p
        updated = (c - coef[:, None] * shifted % p) % p
        nonzero = disc != 0
        grow = nonzero & (2 * length <= i)
        b_poly = torch.where(grow[:, None], c, b_poly)
        length = torch.where(grow, i + 1 - length, length)
        last = torch.where(grow, disc, last)
        shift = torch.where(grow, 1, shift + 1)
        c = torch.where(nonzero[:, None], updated, c)
    return c, length


def locate_errors(blocks: torch.Tensor, mask: torch.Tensor, syndromes: torch.Tensor, rho: torch.Tensor,
                  bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct each row of resolved indices ``blocks`` (F × d, int64) from the first N = 2t syndromes
    of its true indices: the differences are the power sums Σ_i e_i·x_i^m of the errors e_i at
    locators x_i = j_i + 1, so Berlekamp–Massey gives the error locator Λ(z) = Π_i (1 − x_i z), its
    roots (a search over the row's locators) the wrong coordinates, and Forney's formula
    e_i = −x_i·Ω(x_i⁻¹)/Λ'(x_i⁻¹), Ω = S·Λ mod z^N, the errors. Returns the corrected rows and
    which rows are accepted: 1 ≤ L ≤ t roots, all found, every e_i a nonzero multiple of ρ, every
    corrected index in [−bound, bound], and the corrected row reproducing all N syndromes. ``rho``:
    each row's ratio (int64; the rows may come from tensors nested at different ratios)."""
    p = LOCATE_PRIME
    d = blocks.shape[1]
    count = syndromes.shape[1]
    dev = blocks.device
    diff = (syndromes - block_syndromes(blocks, 0, count)) % p
    lam, length = berlekamp_massey(diff)
    ok = (length >= 1) & (2 * length <= count)
    corrected = blocks.clone()
    live = torch.nonzero(ok).flatten()  # rows with more than t errors are rejected without a search
    if live.numel():
        lam, length = lam[live], length[live]
        cols = torch.arange(count + 1, dtype=torch.int64, device=dev)
        degree = int(((lam != 0) * cols).max())
        # roots: x^D·Λ(1/x) = Σ_{k ≤ D} Λ_k x^(D−k) (D the largest degree) vanishes at the locators;
        # one matrix product, exact in float64 as in block_syndromes (D + 1 ≤ 33 products below p²)
        powers = _powers(d, 0, degree + 1, dev).flip(0).to(torch.float64)
        acc = (lam[:, :degree + 1].to(torch.float64) @ powers).to(torch.int64) % p
        roots = (acc == 0) & mask[live]
        good = roots.sum(1) == length
        # Forney at the roots only: Ω_k = Σ_{i ≤ k} Λ_i S_{k−i} (k < N), Λ' and Ω at z = 1/x_i
        row, col = torch.nonzero(roots, as_tuple=True)
        s_live = diff[live]
        omega = torch.stack([(lam[:, :k + 1] * s_live[:, k - cols[:k + 1]]).sum(1) % p for k in range(count)], 1)
        xi = col + 1
        z = _inverse(xi)
        om = torch.zeros_like(xi)
        for k in range(count - 1, -1, -1):
            om = (om * z + omega[row, k]) % p
        der = torch.zeros_like(xi)
        for k in range(count, 0, -1):
            der = (der * z + k * lam[row, k] % p) % p
        err = (p - xi * om % p * _inverse(der) % p) % p
        err = torch.where(err > p // 2, err - p, err)
        wrong = torch.zeros(live.numel(), dtype=torch.bool, device=dev)
        wrong[row[(err == 0) | (err % rho[live][row] != 0)]] = True
        corrected[live[row], col] += err
        ok[live] = good & ~wrong
    ok &= ~(mask & (corrected.abs() > bound)).any(1)
    ok &= (block_syndromes(corrected, 0, count) == syndromes).all(1)
    return corrected, ok
