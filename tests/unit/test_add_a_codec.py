"""docs/DEVELOPING.md's "Adding a codec" example, run as written: the block between its markers
defines a codec that works through an exchange with measured bits per coordinate."""

import re
from pathlib import Path

import torch
from one_tensor import start

from hvdquant.transports.collectives import Started
from hvdquant.transports.exchange import make_exchange

DOC = Path(__file__).resolve().parents[2] / "docs" / "DEVELOPING.md"


class TwoRanksOfOne:
    """Rank 0 of 2 whose peer sends exactly what rank 0 sends (so the mean is rank 0's decode)."""

    rank, size = 0, 2

    def allgather_bytes(self, buf, name):
        return Started(lambda: [buf, buf.clone()], int(buf.numel()))

    def allgather_object(self, obj, name):
        return [obj, obj]


def example() -> type:
    text = DOC.read_text()
    block = re.search(r"<!-- add-a-codec: begin -->\n```python\n(.*?)```\n<!-- add-a-codec: end -->", text, re.S)
    assert block, "docs/DEVELOPING.md lost its add-a-codec block"
    namespace: dict = {}
    exec(compile(block.group(1), str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["Half"]


def test_the_documented_codec_runs_through_an_exchange():
    half = example()()
    g = torch.randn(300, 40, generator=torch.Generator().manual_seed(0))
    ex = make_exchange(half, "allgather", True, TwoRanksOfOne())
    out = start(ex, "layer.weight", g, 1, 0)()
    assert out.shape == g.shape and torch.equal(out, g.half().float())
    stats = ex.statistics()
    # 16 bits per coordinate of payload; the group header (one int64 size per tensor) on top
    assert stats["payload_bits_per_coordinate"] == 16.0
    assert stats["bits_per_coordinate"] == 8 * (2 * g.numel() + 8) / g.numel()
