"""Segment tables: one launch over several tensors laid end to end in flat buffers.

A segmented kernel (:mod:`..table`, ``Kernel.segments``) takes ``segs``, an int64 table with one
row per tensor (:data:`COLUMNS`), and calls the tensor's block function on views of the flat
buffers: the same calls, with the same indices and dither keys, as one launch per tensor would
make, so the same bits. Column 0 holds the number of blocks of the rows before (the kernel's
block b belongs to the last row whose column 0 is at most b), column 1 the row's length in the
kernel's unit (elements, or buckets for a per-bucket kernel, or what the launch says). The word
columns hold a tensor's summable words or, for a packed payload, its bytes; the bucket columns its
buckets or, for 1-bit SGD, its columns; ``arg0`` and ``arg1`` two integer parameters of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

#: the columns of a segment table, in order (``(start, end)`` pairs are half-open ranges of a flat buffer)
COLUMNS = ("first_block", "count", "element_start", "element_end", "bucket_start", "bucket_end", "word_start",
           "word_end", "step", "tensor_id", "arg0", "arg1")


def build(jit: Callable, leaf: Callable) -> SimpleNamespace:
    """The lookup of a block's segment."""

    @leaf
    def segment_of(segs, b):
        """The last row s of ``segs`` with segs[s, 0] ≤ b (binary search; rows with no block share
        their successor's column 0 and are skipped)."""
        lo = 0
        hi = segs.shape[0] - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if segs[mid, 0] <= b:
                lo = mid
            else:
                hi = mid - 1
        return lo

    return SimpleNamespace(segment_of=segment_of)
