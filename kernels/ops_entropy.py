"""Entropy coding of uint8 symbols on either device (see :mod:`.ops`): chunked byte-wise rANS
(:mod:`.arith.rans`, docs/ALGORITHMS.md §11), with one static frequency table or with several tables
chosen per symbol by a context both sides know (:func:`rans_encode_modelled`; :func:`dither_bins`
gives the dither's bins as contexts).

An encoded block is three tensors: ``freq`` (int16, one entry per symbol value, summing to
M = 2^14; travels with a static table, is known to both sides when modelled), ``lengths`` (int32,
the byte count of each chunk of :data:`RANS_CHUNK` symbols) and ``stream`` (uint8, the chunks one
after the other). Encoder and decoder give the same bytes and symbols on the CPU and the GPU.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from . import table
from .arith.rans import CHUNK_SLACK, PROB_SCALE
from .dispatch import launch, launch_segments, output, vec
from .key import MAX_ELEMENTS, DitherKey
from .segments import Segments, Shares
from .sizes import integer

RANS_CHUNK = 8192  # symbols per independently coded chunk: 4 bytes of state and 4 of length per chunk


def dither_bins(n: int, key: DitherKey, bins: int, device: str | torch.device = "cpu",
                segments: Segments | None = None) -> torch.Tensor:
    """⌊(u_i + ½)·bins⌋ (uint8, at most bins − 1) for the n dithers u_i of stream ``key``
    (:func:`dither`): which of ``bins`` equal intervals of (−½, ½) each falls in; ``bins`` a power of
    2 from 1 to 256. The contexts of an entropy coder conditioned on the dither. With ``segments``
    (n = ``segments.elements``, ``key`` its first key): every segment's bins with its own key, end
    to end, in one launch."""
    bins = integer("bins", bins, 1, 256)
    if bins & (bins - 1):
        raise ValueError(f"bins must be a power of 2, got {bins}")
    out = torch.empty(integer("n", n, 0, MAX_ELEMENTS), dtype=torch.uint8, device=device)
    if segments is None:
        launch(table.dither_bins, n, bins, out, *key.words())
    else:
        _, _, sender, ranks, k0, k1 = key.words()
        launch_segments(table.dither_bins, segments, bins, out, sender, ranks, k0, k1)
    return out


def _chunk_shares(segments: Segments, **more: object) -> Shares:
    """A segmented rANS launch: one block per chunk of each segment, its chunks in the bucket columns."""
    chunks = tuple(rans_chunks(n) for n in segments.lengths)
    return Shares(units=chunks, buckets=chunks, **more)


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
    """For tables ``freq`` (rows × alphabet): (c_a = Σ_{a' < a} f_{a'} per row as int32, the symbol of
    each of the M slots per row as uint8)."""
    f = freq.to(torch.int64)
    cum = torch.cumsum(f, 1) - f
    symbols = torch.arange(f.shape[1], dtype=torch.uint8, device=f.device)
    slots = torch.stack([torch.repeat_interleave(symbols, row) for row in f])
    return cum.to(torch.int32), slots


def _chunk_offsets(lengths: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(where each chunk starts in the stream, as int64; the stream's total bytes)."""
    sizes = lengths.to(torch.int64)
    return torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def _tables(freq: torch.Tensor, what: str) -> torch.Tensor:
    """``freq`` as rows of rANS tables (int64 on the CPU); refuses entries < 0 or rows not summing to M."""
    if freq.dtype != torch.int16 or freq.dim() not in (1, 2) or not 1 <= freq.shape[-1] <= 256 or freq.numel() == 0:
        raise ValueError(f"{what} must be int16 tables of 1 to 256 entries, got {freq.dtype} {tuple(freq.shape)}")
    f = freq.to("cpu", torch.int64).reshape(-1, freq.shape[-1])
    if bool((f < 0).any()) or bool((f.sum(1) != PROB_SCALE).any()):
        raise ValueError(f"{what} is not a rANS table: entries must be ≥ 0 and every row sum to {PROB_SCALE}")
    return f


class RansTables:
    """rANS tables (``freq``: int16, rows × alphabet, each row summing to M = 2^14) checked once,
    with what the kernels read (frequencies and cumulative counts as int32, each row's slot → symbol
    map) made once per device: a coder whose tables never change builds this once and passes it to
    :func:`rans_encode_modelled` and :func:`rans_decode`."""

    def __init__(self, freq: torch.Tensor) -> None:
        self.freq = freq
        self.rows = _tables(freq, "freq")  # int64 on the CPU, rows × alphabet
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frequencies, cumulative counts, slot symbols) on ``device``."""
        got = self._on.get(device)
        if got is None:
            cum, slots = _cumulative(self.rows)
            got = self._on[device] = (self.rows.to(device=device, dtype=torch.int32), cum.to(device), slots.to(device))
        return got


def _contexts(contexts: torch.Tensor | None, rows: int, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(the context of each symbol, its stride): one zero byte and stride 0 for a single table."""
    if contexts is None:
        if rows != 1:
            raise ValueError(f"{rows} tables need contexts (one per symbol)")
        return torch.zeros(1, dtype=torch.uint8, device=device), 0
    vec("contexts", contexts, torch.uint8, n)
    if n and int(contexts.max()) >= rows:
        raise ValueError(f"context {int(contexts.max())} has no table: there are {rows}")
    return contexts, 1


def _encode(symbols: torch.Tensor, tables: RansTables, contexts: torch.Tensor | None,
            segments: Segments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths, stream) of ``symbols`` coded with ``tables`` (every segment on its own: one launch
    over their chunks, then one gathering all their bytes)."""
    n, device = symbols.numel(), symbols.device
    if segments is not None and (n != segments.elements or contexts is None):
        raise ValueError(f"a segmented encode takes {segments.elements} symbols and their contexts")
    ctx, stride = _contexts(contexts, tables.rows.shape[0], n, device)
    shares = None if segments is None else _chunk_shares(segments)
    chunks = rans_chunks(n) if shares is None else sum(shares.units)
    lengths = torch.empty(chunks, dtype=torch.int32, device=device)
    if not chunks:
        return lengths, torch.empty(0, dtype=torch.uint8, device=device)
    f_dev, c_dev, _ = tables.on(device)
    region = 2 * RANS_CHUNK + CHUNK_SLACK
    scratch = torch.empty(chunks * region, dtype=torch.uint8, device=device)
    args = (symbols, ctx, stride, RANS_CHUNK, f_dev, c_dev, region, scratch, lengths)
    if shares is None:
        launch(table.rans_encode, chunks, *args)
    else:  # each segment's chunks write their own scratch regions, laid end to end as one launch's would be
        launch_segments(table.rans_encode, segments, *args,
                        shares=replace(shares, words=tuple(c * region for c in shares.units)))
    if bool((lengths < 0).any()):
        raise ValueError("a symbol has frequency 0 in its table: it cannot be coded (a histogram or table "
                         "that does not match the symbols)")
    offsets, total = _chunk_offsets(lengths)
    stream = torch.empty(total, dtype=torch.uint8, device=device)
    launch(table.rans_gather, chunks, scratch, region, lengths, offsets, stream)
    return lengths, stream


def rans_encode(symbols: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(freq, lengths, stream) of uint8 ``symbols`` whose histogram is ``counts`` (one entry per symbol
    value, at most 256: e.g. ``torch.bincount(symbols, minlength=alphabet)``); ``freq`` on the CPU,
    ``lengths`` and ``stream`` on the symbols' device."""
    vec("symbols", symbols, torch.uint8)
    if counts.dim() != 1 or not 1 <= counts.numel() <= 256:
        raise ValueError(f"counts must be a histogram of 1 to 256 symbol values, got shape {tuple(counts.shape)}")
    freq = rans_table(counts)
    if not symbols.numel():
        return freq, torch.empty(0, dtype=torch.int32, device=symbols.device), \
            torch.empty(0, dtype=torch.uint8, device=symbols.device)
    if int(counts.sum()) != symbols.numel():
        raise ValueError(f"counts sum to {int(counts.sum())}, not to the {symbols.numel()} symbols")
    return freq, *_encode(symbols, RansTables(freq.reshape(1, -1)), None)


def rans_encode_modelled(symbols: torch.Tensor, tables: torch.Tensor | RansTables, contexts: torch.Tensor,
                         segments: Segments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths, stream) of uint8 ``symbols``, symbol i coded with the table ``freq[contexts[i]]``
    (``tables``: int16 ``freq``, contexts × alphabet, every row summing to M = 2^14 and nonzero
    wherever a symbol may occur in its context, or a :class:`RansTables` of it; ``contexts``: uint8,
    one per symbol). The tables do not travel: the decoder (:func:`rans_decode` with the same tables
    and contexts) must know both. With ``segments``: every segment coded on its own in one launch
    (its chunks start at its start), the segments' chunk lengths and streams each end to end
    (:func:`rans_split` cuts them)."""
    vec("symbols", symbols, torch.uint8)
    tables = tables if isinstance(tables, RansTables) else RansTables(tables)
    if symbols.numel() and int(symbols.max()) >= tables.rows.shape[1]:
        raise ValueError(f"symbol {int(symbols.max())} is outside the tables' alphabet of {tables.rows.shape[1]}")
    return _encode(symbols, tables, contexts, segments)


def rans_split(lengths: torch.Tensor, stream: torch.Tensor, segments: Segments
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each segment's (chunk lengths, stream) from :func:`rans_encode_modelled`'s with ``segments``
    (views; one copy of the lengths to the host)."""
    chunks = [rans_chunks(n) for n in segments.lengths]
    ends = torch.cumsum(lengths.to(torch.int64), 0).tolist()
    bounds = [0] + [ends[c - 1] if c else 0 for c in np.cumsum(chunks).tolist()]
    return list(lengths.split(chunks)), list(stream.split(np.diff(bounds).tolist()))


def rans_decode(freq: torch.Tensor | RansTables, lengths: torch.Tensor, stream: torch.Tensor, n: int,
                out: torch.Tensor | None = None, contexts: torch.Tensor | None = None,
                segments: Segments | None = None) -> torch.Tensor:
    """The n uint8 symbols of :func:`rans_encode`'s (freq, lengths, stream), or of
    :func:`rans_encode_modelled`'s (lengths, stream) with its tables ``freq`` and ``contexts``, on the
    stream's device; with ``segments``, of its segmented form (every segment's symbols end to end, one
    launch). A table that does not sum to M, lengths that do not add up to the stream, or a chunk
    that does not decode back to the encoder's initial state raise ValueError."""
    vec("stream", stream, torch.uint8)
    n = integer("n", n, 0, 1 << 40)
    if segments is not None and (n != segments.elements or contexts is None):
        raise ValueError(f"a segmented decode takes n = {segments.elements} symbols and their contexts")
    shares = None if segments is None else _chunk_shares(segments, args=tuple((m, 0) for m in segments.lengths))
    chunks = rans_chunks(n) if shares is None else sum(shares.units)
    vec("lengths", lengths, torch.int32, chunks)
    offsets, total = _chunk_offsets(lengths)
    if total != stream.numel() or bool((lengths < 0).any()):
        raise ValueError(f"chunk lengths add up to {total} bytes, the stream has {stream.numel()}")
    out = output(out, "out", n, torch.uint8, stream)
    if not chunks:
        return out
    tables = freq if isinstance(freq, RansTables) else RansTables(freq)
    device = stream.device
    ctx, stride = _contexts(contexts, tables.rows.shape[0], n, device)
    f_dev, c_dev, slots = tables.on(device)
    status = torch.zeros(chunks, dtype=torch.int32, device=device)
    if shares is None:
        launch(table.rans_decode, chunks, stream, offsets, lengths, RANS_CHUNK, n, ctx, stride, f_dev, c_dev, slots,
               out, status)
    else:  # each segment's length is in its row of the table
        launch_segments(table.rans_decode, segments, stream, offsets, lengths, RANS_CHUNK, ctx, stride, f_dev, c_dev,
                        slots, out, status, shares=shares)
    bad = torch.nonzero(status).reshape(-1)
    if bad.numel():
        raise ValueError(f"corrupt rANS stream: chunk {int(bad[0])} of {chunks} does not decode")
    return out
