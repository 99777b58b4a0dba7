"""Codec state out of the codecs: frozen codecs, the exchange's CodecState (residuals and adaptive
nesting's decisions) checkpointed with the exchange, and NDQSG's typed recovery requests."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from one_tensor import start

from hvdquant import DQSG, NDQSG, QSGD, CodecState, ErrorFeedback, OneBitSGD, TopK
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.codecs.requests import SyndromeRequest, WholeBucket
from hvdquant.codecs.syndromes import bucket_syndromes
from hvdquant.transports.collectives import Started
from hvdquant.transports.payload import PayloadExchange


class Board:
    """P ranks in P threads of one process: an allgather posts every rank's buffer and returns all."""

    def __init__(self, size: int) -> None:
        self.slots: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)

    def allgather(self, rank: int, buf: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = buf.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody posts the next round before everyone read this one
        return out


class ThreadRank:
    """Collectives of one rank over a :class:`Board` (the collective completes when started)."""

    def __init__(self, board: Board, rank: int) -> None:
        self.board, self.rank, self.size = board, rank, len(board.slots)

    def allgather_bytes(self, buf, name):
        got = self.board.allgather(self.rank, buf)
        return Started(lambda: got, buf.numel())


def run_step(exchanges: list[PayloadExchange], gs: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """One allgather step of tensor "w" on every rank (one thread each); every rank's result."""
    out: list[torch.Tensor | None] = [None] * len(exchanges)
    errors: list[BaseException] = []

    def rank(p: int) -> None:
        try:
            out[p] = start(exchanges[p], "w", gs[p], 5, step)()
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(p,)) for p in range(len(exchanges))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def exchanges_for(codec, ranks: int) -> list[PayloadExchange]:
    board = Board(ranks)
    return [PayloadExchange(codec, "allgather", True, ThreadRank(board, p)) for p in range(ranks)]


def test_error_feedback_ndqsg_checkpoints_residuals_and_nesting_decisions():
    """ErrorFeedback(NDQSG) through the allgather exchange, P = 4: after steps on nearly equal
    gradients the tensor nests (the decisions are in each rank's CodecState, alike on every rank),
    and a checkpoint of every rank's exchange, loaded into fresh exchanges, gives the next step's
    output bit for bit (residuals and decisions restored together)."""
    ranks, n = 4, 4096
    codec = ErrorFeedback(NDQSG((3, 1), 256))
    exchanges = exchanges_for(codec, ranks)
    gen = torch.Generator().manual_seed(3)
    common = torch.randn(n, generator=gen)
    grads = [[common + 1e-3 * torch.randn(n, generator=gen) for _ in range(ranks)] for _ in range(5)]
    for step in range(4):
        outs = run_step(exchanges, grads[step], step)
        assert all(torch.equal(o, outs[0]) for o in outs)
    states = [ex.state_dict() for ex in exchanges]
    assert all(s["codec_state"]["nesting"] == states[0]["codec_state"]["nesting"] for s in states)
    assert states[0]["codec_state"]["nesting"]["nesting"] == {"w": True}
    assert all(s["codec_state"]["residuals"]["w"].abs().sum() > 0 for s in states)
    restored = exchanges_for(codec, ranks)
    for ex, state in zip(restored, states):
        ex.load_state_dict(state)
    again = run_step(restored, grads[4], 4)
    first = run_step(exchanges, grads[4], 4)
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    assert all(a.codec_state.nesting == b.codec_state.nesting for a, b in zip(restored, exchanges))
    fresh = exchanges_for(codec, ranks)  # without the checkpoint: other residuals, nesting off
    assert not all(torch.equal(a, b) for a, b in zip(run_step(fresh, grads[4], 4), first))


def test_codec_state_refuses_malformed_checkpoints():
    state = CodecState()
    state.residuals["w"] = torch.ones(3, dtype=torch.float64)
    good = state.state_dict()
    for bad, match in [({"residuals": {}}, "keys"), ({**good, "extra": 1}, "keys"),
                       ({**good, "residuals": {"w": [1.0]}}, "1-D float"),
                       ({**good, "residuals": {"w": torch.ones(2, 2)}}, "1-D float"),
                       ({**good, "nesting": {"nesting": {"w": 1}}}, "bool"),
                       ({**good, "nesting": {"ratios": {"w": True}}}, "int"),
                       ({**good, "nesting": {"typo": {}}}, "unknown")]:
        with pytest.raises(ValueError, match=match):
            state.load_state_dict(bad)
    assert torch.equal(state.residuals["w"], torch.ones(3, dtype=torch.float64))  # nothing changed
    twin = CodecState()
    twin.load_state_dict(good)
    assert torch.equal(twin.residuals["w"], state.residuals["w"]) and twin.nesting == NestingPolicy()


def test_adaptive_ndqsg_without_a_state_refuses_instead_of_forgetting():
    from hvdquant.codecs import TensorContext
    from hvdquant.kernels import DitherKey

    ctx = TensorContext("w", (100,), DitherKey(1, 0, 2, 1), 2)
    with pytest.raises(ValueError, match="TensorContext.state"):
        NDQSG().encode(torch.randn(100), ctx)
    NDQSG(adaptive=False).encode(torch.randn(100), ctx)  # fixed nesting keeps nothing between steps
    DQSG().encode(torch.randn(100), ctx)


@pytest.mark.parametrize("codec", [DQSG(), NDQSG(), QSGD(), TopK(0.1), OneBitSGD(), ErrorFeedback(DQSG()),
                                   TopK.with_feedback(0.1)], ids=lambda c: c.config()["scheme"])
def test_codecs_are_frozen(codec):
    with pytest.raises(dataclasses.FrozenInstanceError):
        codec.residuals = {}
    field = dataclasses.fields(codec)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(codec, field, getattr(codec, field))
    assert not any(isinstance(getattr(codec, f.name), dict) for f in dataclasses.fields(codec))


def test_typed_recovery_requests_round_trip():
    """Requests derived from failed buckets and syndromes held → the sender's reply → parsed: the
    syndromes of each stage, then the whole buckets' true indices; a malformed reply or request raises."""
    d = 512
    codec = NDQSG((3, 1), d, locate=True)
    protocol = codec.recovery
    assert protocol.stages == (8, 32)
    n = 3 * d - 50
    k = torch.randint(-3, 4, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    symbols = (k + 3).to(torch.uint8)
    have: dict[int, torch.Tensor] = {}
    requests = protocol.next_requests([2, 0], have)
    assert requests == [SyndromeRequest(0, 0), SyndromeRequest(2, 0)]
    for stage, (lo, hi) in enumerate([(0, 8), (8, 32)]):
        reply = protocol.parse(protocol.reply(symbols, requests), n, requests)
        assert reply.whole == [] and [b for b, _ in reply.syndromes] == [r.bucket for r in requests]
        for b, s in reply.syndromes:
            assert torch.equal(s, bucket_syndromes(k, [b], d, lo, hi)[0])
            have[b] = s if b not in have else torch.cat([have[b], s])
        requests = protocol.next_requests([2, 0], have)
        if stage == 0:
            assert requests == [SyndromeRequest(0, 1), SyndromeRequest(2, 1)]
    assert requests == [WholeBucket(2), WholeBucket(0)]
    buf = protocol.reply(symbols, requests)
    reply = protocol.parse(buf, n, requests)
    assert torch.equal(reply.truth, torch.cat([k[2 * d:], k[:d]]).to(torch.int32))
    mixed = [SyndromeRequest(1, 1), WholeBucket(2)]
    assert protocol.parse(protocol.reply(symbols, mixed), n, mixed).whole == [2]
    with pytest.raises(ValueError, match="bytes"):
        protocol.parse(buf[:-1], n, requests)
    with pytest.raises(ValueError, match="stage"):
        protocol.reply(symbols, [SyndromeRequest(0, 2)])
    with pytest.raises(ValueError, match="bucket"):
        protocol.reply(symbols, [WholeBucket(3)])
    with pytest.raises(TypeError, match="SyndromeRequest"):
        protocol.reply(symbols, [-1])
