"""The session (one owner of a job's state) and the fused buffer, on one process."""

import pytest
import torch

from hvdquant.transports.fused import FusedBuffer, compressible
from hvdquant.transports.session import Session, dither_key
from hvdquant.version import __version__


class TwoRanks:
    """Rank 0 of 2 whose peer proposes ``other`` as its configuration (or the same as rank 0)."""

    rank, size = 0, 2

    def __init__(self, other: dict | None = None) -> None:
        self.other = other

    def allgather_object(self, obj, name):
        config, seed = obj
        return [obj, (self.other if self.other is not None else config, seed + 1)]


class Exchange:
    """An exchange's face towards the session: config and state."""

    kind = "test"

    def __init__(self, coll, config=None) -> None:
        self.coll, self._config, self.state = coll, config or {"codec": {"levels": 1, "bucket_size": 16}}, {}

    def config(self):
        return self._config

    def state_dict(self):
        return {"kind": self.kind, **self.state}

    def load_state_dict(self, state):
        if state.get("kind") != self.kind:
            raise ValueError("other kind")
        self.state = {k: v for k, v in state.items() if k != "kind"}


def test_agreement_takes_rank_0s_seed_and_names_a_differing_field():
    session = Session(Exchange(TwoRanks()), seed=7, tag="t")
    assert session.agree(lambda: {"min_numel": 3}) == 7
    assert session.agree(lambda: pytest.fail("fields asked again")) == 7  # once per job
    theirs = {"hvdquant_version": __version__, "codec.levels": 1, "codec.bucket_size": 32, "min_numel": 3,
              "seed": 7, "restored_seed": None, "steps": []}
    with pytest.raises(ValueError, match=r"codec.bucket_size: rank 0 has 16, rank 1 has 32"):
        Session(Exchange(TwoRanks(theirs)), seed=7, tag="t").agree(lambda: {"min_numel": 3})


def test_buffer_keys_compressed_tensors_by_name_and_step():
    session = Session(Exchange(TwoRanks()), seed=5, tag="t")
    with pytest.raises(RuntimeError, match="before Session.agree"):
        session.buffer([("w", torch.ones(4, 4))], 1)
    session.agree()
    for step in range(2):
        buf = session.buffer([("w", torch.ones(40, 40)), ("b", torch.ones(40))], min_numel=16)
        w, b = buf.segments
        assert w.key == dither_key(5, step, "w", 0) and b.key is None  # 1-D: uncompressed
    assert session.steps.counts == {"w": 2}


def test_checkpoint_round_trip_and_refusal_of_other_versions():
    session = Session(Exchange(TwoRanks()), seed=5, tag="t")
    session.agree()
    session.buffer([("w", torch.ones(8, 8))], None)
    session.exchange.state = {"residual": 1.5}
    state = session.state_dict()
    restored = Session(Exchange(TwoRanks()), seed=99, tag="t")
    restored.load_state_dict(state)
    assert restored.steps.counts == {"w": 1} and restored.exchange.state == {"residual": 1.5}
    assert restored.agree() == 5  # the checkpoint's seed, agreed again
    with pytest.raises(ValueError, match=r"hvdquant '0.3.0'.*restart from the model's weights"):
        Session(Exchange(TwoRanks()), seed=5, tag="t").load_state_dict({**state, "version": "0.3.0"})


def test_fused_buffer_layout_checks_and_unflatten():
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.float64)
    buf = FusedBuffer.of([("a", a, None), ("b", b, None)])
    assert [(s.offset, s.length) for s in buf.segments] == [(0, 6), (6, 4)]
    out = buf.unflatten(buf.flat * 2)
    assert torch.equal(out["a"], a * 2) and out["b"].dtype == torch.float64
    with pytest.raises(ValueError, match="unique"):
        FusedBuffer.of([("a", a, None), ("a", b, None)])
    with pytest.raises(ValueError, match="at least one"):
        FusedBuffer.of([])
    with pytest.raises(ValueError, match="result has 3 values"):
        buf.unflatten(torch.zeros(3))
    assert compressible(torch.ones(4, 4), 16) and not compressible(torch.ones(4, 4), 17)
    assert not compressible(torch.ones(64), 1) and compressible(torch.ones(1), None)


def test_buffer_over_an_existing_flat_buffer_is_not_a_copy_and_join_assembles_results():
    flat = torch.arange(10.0)
    buf = FusedBuffer.of([("a", flat[:6].view(2, 3), None), ("b", flat[6:], None)], flat)
    assert buf.flat is flat and [(s.offset, s.length, s.shape) for s in buf.segments] == [(0, 6, (2, 3)), (6, 4, (4,))]
    with pytest.raises(ValueError, match="1-D float32 buffer of the items' 6 values"):
        FusedBuffer.of([("a", flat[:6], None)], flat)
    one = FusedBuffer.of([("w", torch.ones(3), None)])
    part = torch.full((3,), 2.0)
    assert one.join([part]) is part  # one segment: handed on as it is
    assert torch.equal(buf.join([torch.zeros(6), torch.ones(4)]), torch.cat([torch.zeros(6), torch.ones(4)]))
    with pytest.raises(ValueError, match="results of"):
        buf.join([torch.zeros(5), torch.ones(4)])
