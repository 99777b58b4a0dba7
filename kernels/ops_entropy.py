"""Entropy coding of uint8 symbols on either device (see :mod:`.ops`): chunked byte-wise rANS with
a static frequency table (:mod:`.arith.rans`, docs/ALGORITHMS.md §11).

An encoded block is three tensors: ``freq`` (int16, one entry per symbol value, summing to
M = 2^14), ``lengths`` (int32, the byte count of each chunk of :data:`RANS_CHUNK` symbols) and
``stream`` (uint8, the chunks one after the other). Encoder and decoder give the same bytes and
symbols on the CPU and the GPU.
"""

from __future__ import annotations

import torch

from . import table
from .arith.rans import CHUNK_SLACK, PROB_SCALE
from .dispatch import launch, output, vec
from .sizes import integer

RANS_CHUNK = 8192  # symbols per independently coded chunk: 4 bytes of state and 4 of length per chunk


def rans_chunks(n: int) -> int:
    """Chunks of :data:`RANS_CHUNK` symbols holding n symbols."""
    return (n + RANS_CHUNK - 1) // RANS_CHUNK


def rans_table(counts: torch.Tensor) -> torch.Tensor:
    """The static table for a histogram: frequencies f_a summing to M = 2^14 with f_a ≥ 1 wherever
    counts_a > 0 and f_a = 0 elsewhere (int16, on the CPU). Each f_a = max(1, ⌊counts_a·M/total⌋) and
    the most frequent symbol takes the remainder (it holds at least M/alphabet before, so it stays
    ≥ 1). Computed by the encoder only: the table travels with the stream."""
    counts = counts.detach().to("cpu", torch.int64).reshape(-1)
    total = int(counts.sum())
    freq = torch.zeros_like(counts)
    if total == 0:
        return freq.to(torch.int16)
    present = counts > 0
    freq[present] = torch.clamp(counts[present] * PROB_SCALE // total, min=1)
    top = int(torch.argmax(counts))
    freq[top] += PROB_SCALE - int(freq.sum())
    if int(freq[top]) < 1:
        raise ValueError(f"{int(present.sum())} distinct symbols do not fit a table of {PROB_SCALE} slots")
    return freq.to(torch.int16)


def _cumulative(freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_a = Σ_{a' < a} f_{a'} as int32, the symbol of each of the M slots as uint8)."""
    f = freq.to(torch.int64)
    cum = torch.cumsum(f, 0) - f
    slots = torch.repeat_interleave(torch.arange(f.numel(), dtype=torch.uint8, device=f.device), f)
    return cum.to(torch.int32), slots


def _chunk_offsets(lengths: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(where each chunk starts in the stream, as int64; the stream's total bytes)."""
    sizes = lengths.to(torch.int64)
    return torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def rans_encode(symbols: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(freq, lengths, stream) of uint8 ``symbols`` whose histogram is ``counts`` (one entry per symbol
    value, at most 256: e.g. ``torch.bincount(symbols, minlength=alphabet)``); ``freq`` on the CPU,
    ``lengths`` and ``stream`` on the symbols' device."""
    vec("symbols", symbols, torch.uint8)
    if counts.dim() != 1 or not 1 <= counts.numel() <= 256:
        raise ValueError(f"counts must be a histogram of 1 to 256 symbol values, got shape {tuple(counts.shape)}")
    n, device = symbols.numel(), symbols.device
    freq = rans_table(counts)
    if n and int(counts.sum()) != n:
        raise ValueError(f"counts sum to {int(counts.sum())}, not to the {n} symbols")
    chunks = rans_chunks(n)
    lengths = torch.empty(chunks, dtype=torch.int32, device=device)
    if not chunks:
        return freq, lengths, torch.empty(0, dtype=torch.uint8, device=device)
    cum, _ = _cumulative(freq)
    f_dev, c_dev = freq.to(device=device, dtype=torch.int32), cum.to(device)
    region = 2 * RANS_CHUNK + CHUNK_SLACK
    scratch = torch.empty(chunks * region, dtype=torch.uint8, device=device)
    launch(table.rans_encode, chunks, symbols, RANS_CHUNK, f_dev, c_dev, region, scratch, lengths)
    offsets, total = _chunk_offsets(lengths)
    stream = torch.empty(total, dtype=torch.uint8, device=device)
    launch(table.rans_gather, chunks, scratch, region, lengths, offsets, stream)
    return freq, lengths, stream


def rans_decode(freq: torch.Tensor, lengths: torch.Tensor, stream: torch.Tensor, n: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The n uint8 symbols of :func:`rans_encode`'s (freq, lengths, stream), on the stream's device.
    A table that does not sum to M, lengths that do not add up to the stream, or a chunk that does
    not decode back to the encoder's initial state raise ValueError."""
    vec("stream", stream, torch.uint8)
    n = integer("n", n, 0, 1 << 40)
    chunks = rans_chunks(n)
    if freq.dtype != torch.int16 or freq.dim() != 1 or not 1 <= freq.numel() <= 256:
        raise ValueError(f"freq must be an int16 table of 1 to 256 entries, got {freq.dtype} {tuple(freq.shape)}")
    f = freq.to("cpu", torch.int64)
    if bool((f < 0).any()) or (n and int(f.sum()) != PROB_SCALE):
        raise ValueError(f"freq is not a rANS table: entries must be ≥ 0 and sum to {PROB_SCALE}")
    vec("lengths", lengths, torch.int32, chunks)
    offsets, total = _chunk_offsets(lengths)
    if total != stream.numel() or bool((lengths < 0).any()):
        raise ValueError(f"chunk lengths add up to {total} bytes, the stream has {stream.numel()}")
    out = output(out, "out", n, torch.uint8, stream)
    if not chunks:
        return out
    device = stream.device
    cum, slots = _cumulative(f)
    status = torch.zeros(chunks, dtype=torch.int32, device=device)
    launch(table.rans_decode, chunks, stream, offsets, lengths, RANS_CHUNK, n,
           f.to(device=device, dtype=torch.int32), cum.to(device), slots.to(device), out, status)
    bad = torch.nonzero(status).reshape(-1)
    if bad.numel():
        raise ValueError(f"corrupt rANS stream: chunk {int(bad[0])} of {chunks} does not decode")
    return out
