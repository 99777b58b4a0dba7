"""Elias recursive (omega) coding of QSGD's sparse levels (Alistarh et al., QSGD), on the host: a CUDA
tensor's levels are copied to host memory and the stream back to the tensor's device (decode alike).

Stream layout, bits MSB-first: ω(nnz + 1), then for each nonzero coordinate in index order:
ω(gap) with gap = index − previous index (previous = −1 at the start, so gap ≥ 1), one sign bit
(1 = negative) and ω(|level|). ω(1) = "0"; ω(N) = ω-prefix of ⌊log2 N⌋ followed by N in binary and
a final "0" (Elias 1975). Decoding is sequential; encoding runs two passes (lengths, then bits).
"""

from __future__ import annotations

import numpy as np
import torch

from .jit import cached


@cached()
def _bitlen(v):
    b = 0
    while v:
        b += 1
        v >>= 1
    return b


@cached()
def _omega_len(v):
    n = 1
    while v > 1:
        b = _bitlen(v)
        n += b
        v = b - 1
    return n


@cached()
def _put(buf, pos, value, nbits):
    for i in range(nbits - 1, -1, -1):
        if (value >> i) & 1:
            buf[pos >> 3] |= np.uint8(0x80 >> (pos & 7))
        pos += 1
    return pos


@cached()
def _put_omega(buf, pos, v):
    # groups are emitted from the innermost outwards: collect them, then write in reverse.
    groups = np.empty(64, np.int64)
    widths = np.empty(64, np.int64)
    g = 0
    while v > 1:
        b = _bitlen(v)
        groups[g] = v
        widths[g] = b
        g += 1
        v = b - 1
    for j in range(g - 1, -1, -1):
        pos = _put(buf, pos, groups[j], widths[j])
    return _put(buf, pos, 0, 1)


@cached()
def _get(buf, pos, nbits):
    v = 0
    for _ in range(nbits):
        v = (v << 1) | ((buf[pos >> 3] >> (7 - (pos & 7))) & 1)
        pos += 1
    return v, pos


@cached()
def _get_omega(buf, pos):
    n = 1
    while True:
        bit = (buf[pos >> 3] >> (7 - (pos & 7))) & 1
        if bit == 0:
            return n, pos + 1
        v, pos = _get(buf, pos, n + 1)
        n = v


@cached()
def _encode(codes):
    nnz = 0
    total = 0
    prev = -1
    for i in range(codes.shape[0]):
        k = np.int64(codes[i])
        if k != 0:
            nnz += 1
            total += _omega_len(i - prev) + 1 + _omega_len(abs(k))
            prev = i
    total += _omega_len(nnz + 1)
    buf = np.zeros((total + 7) // 8, np.uint8)
    pos = _put_omega(buf, 0, nnz + 1)
    prev = -1
    for i in range(codes.shape[0]):
        k = np.int64(codes[i])
        if k != 0:
            pos = _put_omega(buf, pos, i - prev)
            pos = _put(buf, pos, 1 if k < 0 else 0, 1)
            pos = _put_omega(buf, pos, abs(k))
            prev = i
    return buf, total


@cached()
def _decode(buf, nbits, out):
    """buf is the stream followed by zero padding (a truncated stream then reads as ω(1) groups
    and ends within the loop bounds); returns the bits consumed, or −1 for a corrupt stream."""
    out[:] = 0
    count, pos = _get_omega(buf, 0)
    prev = -1
    for _ in range(count - 1):
        gap, pos = _get_omega(buf, pos)
        sign, pos = _get(buf, pos, 1)
        level, pos = _get_omega(buf, pos)
        prev += gap
        if prev >= out.shape[0] or pos > nbits or level > 127:
            return -1
        out[prev] = -level if sign else level
    return pos


def encode(codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int8 levels -> (uint8 stream, its length in bits)."""
    if codes.dtype != torch.int8 or codes.dim() != 1:
        raise TypeError("codes must be a 1-D int8 tensor")
    buf, bits = _encode(codes.contiguous().cpu().numpy())
    return torch.from_numpy(buf).to(codes.device), int(bits)


def decode(stream: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 stream -> n int8 levels; a stream that points past n coordinates is refused."""
    out = np.empty(n, np.int8)
    raw = stream.contiguous().cpu().numpy()
    padded = np.zeros(raw.shape[0] + 16, np.uint8)
    padded[: raw.shape[0]] = raw
    if _decode(padded, 8 * raw.shape[0], out) < 0:
        raise ValueError("corrupt Elias stream: a position lies beyond the tensor")
    return torch.from_numpy(out).to(stream.device)
