"""Segmented launches (kernels/segments.py, kernels/ops_segments.py): one launch over several tensors
laid end to end gives, tensor by tensor, the bits of one launch per tensor; the codecs' group
methods give each tensor the bits of the single-tensor ones; and a step of the summable exchange,
or of the payload exchange with any codec that has group methods, costs the same number of
launches however many tensors it carries (on the CPU and on a simulated GPU)."""

import contextlib

import pytest
import simulated_gpu as sim
import torch
from one_tensor import start

from hvdquant import DQSG, ECDQ, NDQSG, QSGD, CodecState, ErrorFeedback, OneBitSGD, TopK
from hvdquant.codecs import dqsg as dqsg_module
from hvdquant.codecs.base import TensorContext
from hvdquant.codecs.ecdq import ZERO_BUCKET
from hvdquant.codecs.ecdq_model import CLASSES
from hvdquant.codecs.onebit import OneBitQuantizer
from hvdquant.kernels import DitherKey, ops, ops_fields, ops_segments
from hvdquant.kernels.segments import Segments
from hvdquant.stats import TorchOperations
from hvdquant.transports.collectives import Started
from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.nested_sum import NestedSum
from hvdquant.transports.payload import PayloadExchange
from hvdquant.transports.session import dither_key
from hvdquant.transports.sum_schemes import DQSGSum
from hvdquant.transports.summed import SummedExchange

LENGTHS = (1000, 512, 7, 0, 3000, 513, 1)


def tensors(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) * (i + 1) for i, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("ranks", [0, 4, 3])  # independent dither; stratified among a power of 2 and not
def test_each_segment_gets_the_bits_of_its_own_launch(ranks):
    keys = tuple(DitherKey(5, 3 + i, 100 + i, 1 if ranks else 7, ranks) for i in range(len(LENGTHS)))
    segs = Segments(LENGTHS, keys, 64)
    gs = tensors()
    rotated = ops.hadamard_rotate_segments(torch.cat(gs), segs)
    own = [ops.hadamard_rotate(g, 64, k) for g, k in zip(gs, keys)]
    assert torch.equal(rotated, torch.cat(own))
    absmax = ops.bucket_absmax_segments(rotated, segs)
    assert torch.equal(absmax, torch.cat([ops.bucket_absmax(r, 64) for r in own]))
    delta = ops.bucket_step(absmax, 3)
    deltas = delta.split(segs.buckets)
    words, counts = ops.dqsg_encode_fields_segments(rotated, delta, segs, 3, 29, 10)
    each = [ops.dqsg_encode_fields(r, d.contiguous(), 64, 3, k, 29, 10) for r, d, k in zip(own, deltas, keys)]
    assert torch.equal(words, torch.cat([w for w, _ in each]))
    assert counts == [c.tolist() for _, c in each]
    senders = ranks - 1 if ranks else 2
    first = Segments(LENGTHS, tuple(k.for_sender(0) for k in keys), 64)
    summed = words * 2.0  # a reduction that doubled the words (factor 2)
    decoded = ops.dqsg_decode_fields_segments(summed, 2.0, 29, 10, 3, delta, first, senders=senders)
    per = [ops.dqsg_decode_fields(w * 2.0, n, 2.0, 29, 10, 3, d.contiguous(), 64, k.for_sender(0), senders=senders)
           for (w, _), n, d, k in zip(each, LENGTHS, deltas, keys)]
    assert torch.equal(decoded, torch.cat(per))
    back = ops.hadamard_rotate_segments(decoded.clone(), first, inverse=True)
    assert torch.equal(back, torch.cat([ops.hadamard_rotate(p, 64, k, inverse=True) for p, k in zip(per, keys)]))


def test_nested_segments_get_the_bits_of_their_own_launches():
    """The stock nested path's twins, tensor by tensor: checksums (of chosen tensors), cosets resolved
    each with its own ratio (ratio 0: not resolved), fields of each tensor's radix, index sums decoded."""
    keys = tuple(DitherKey(5, 3 + i, 100 + i, 0, 3) for i in range(len(LENGTHS)))
    segs = Segments(LENGTHS, keys, 64)
    parts, gs = list(LENGTHS), tensors()
    delta = ops.bucket_step(ops.bucket_absmax_segments(torch.cat(gs), segs), 8)
    deltas = [d.contiguous() for d in delta.split(segs.buckets)]
    k = ops.dqsg_encode_segments(torch.cat(gs), delta, segs, 8).to(torch.int32) - 8
    ks = [x.contiguous() for x in k.split(parts)]
    chosen = (True, False, True, True, False, True, False)
    assert torch.equal(ops.bucket_checksum_segments(k, segs), torch.cat([ops.bucket_checksum(x, 64) for x in ks]))
    assert torch.equal(ops.bucket_checksum_segments(k, segs, chosen),
                       torch.cat([ops.bucket_checksum(x, 64) for x, c in zip(ks, chosen) if c]))
    ratios = tuple(r if c else 0 for r, c in zip((2, 4, 8, 4, 2, 8, 4), chosen))
    nines = torch.full((segs.elements,), 9, dtype=torch.uint8)  # a segment of ratio 0 keeps its part
    cosets = ops.nested_encode_segments(torch.cat(gs), delta, segs, 8, ratios, nines.clone())
    assert torch.equal(cosets, torch.cat([ops.nested_encode(g, d, 64, 8, r, key) if r else nine
                                          for g, d, r, key, nine in zip(gs, deltas, ratios, keys, nines.split(parts))]))
    sides = [g * 1.1 for g in gs]
    residues = [((x + 2 * (r // 2)) % r if r else x).to(torch.uint8) for x, r in zip(ks, ratios)]
    kout = ops.nested_decode_segments(torch.cat(residues), delta, segs, ratios, torch.cat(sides), senders=2)
    own = []
    for res, d, side, key, r in zip(residues, deltas, sides, keys, ratios):
        own.append(torch.zeros(res.numel(), dtype=torch.int32))
        if r:
            ops.nested_decode(res, d, 64, r, side, key, senders=2, kout=own[-1])
    assert torch.equal(kout, torch.cat(own))
    unreduced = [x + 4 * r * (i % 3) if r else x for i, (x, r) in enumerate(zip(residues, ratios))]  # ≡ mod ρ
    assert torch.equal(ops.nested_decode_segments(torch.cat(unreduced).to(torch.int32), delta, segs, ratios,
                                                  torch.cat(sides), senders=2), kout)
    fields = tuple((3, 30) if c else (17, 12) for c in chosen)
    codes = (k + 8).to(torch.uint8).remainder(torch.tensor([3 if c else 17 for c in chosen]).repeat_interleave(
        torch.tensor(LENGTHS))).to(torch.uint8)
    words = ops.pack_sum_fields_segments(codes, segs, fields)
    each = [ops.pack_sum_fields(c.contiguous().to(torch.int8), 0, r, f)
            for c, (r, f) in zip(codes.split(parts), fields)]
    assert torch.equal(words, torch.cat(each))
    assert torch.equal(ops.unpack_sum_fields_segments(words * 2.0, segs, fields, 2.0), codes.to(torch.int32))
    assert torch.equal(ops.dqsg_decode_segments(kout, delta, segs, 0, senders=2),
                       torch.cat([ops.dqsg_decode(x, d, 64, key, senders=2) for x, d, key in zip(own, deltas, keys)]))


def test_one_launch_whatever_the_number_of_tensors():
    keys = tuple(DitherKey(5, 3, i, 0) for i in range(len(LENGTHS)))
    segs = Segments(LENGTHS, keys, 64)
    before = ops.launches["cpu"]
    ops.bucket_absmax_segments(torch.cat(tensors()), segs)
    assert ops.launches["cpu"] == before + 1


def test_segments_refuse_keys_of_different_senders_or_seeds():
    with pytest.raises(ValueError, match="share the seed, sender"):
        Segments((3, 4), (DitherKey(1, 0, 0, 0), DitherKey(1, 0, 1, 1)), 8)
    with pytest.raises(ValueError, match="one key per length"):
        Segments((3, 4), (DitherKey(1, 0, 0, 0),), 8)


class Immediate:
    rank, size = 0, 1

    def allreduce(self, tensor, name, op="sum"):
        return Started(lambda: tensor.clone(), 0)

    def allgather_bytes(self, buf, name):
        return Started(lambda: [buf], 0)

    def allgather_object(self, obj, name):
        return [obj]

    def alltoall_bytes(self, bufs, name):
        return Started(lambda: list(bufs), 0)


# launches of each step of the summable exchange (one rank): maxima, steps, quantization, fields
# packed, unpacked, decoded (DQSG: unpacked and decoded in one), each rotation one more. NDQSG: a
# tensor nests from its second step on (the side information is the step before's sum): its cosets and
# checksums (two launches), its cosets resolved and their checksums (two); a recovery round packs and unpacks one
# field segment (two). Adaptive nesting starts with no tensor nested and probes every tensor with side
# information: its checksums (one) and per candidate ratio (2, 4, 8, 16) a resolve and its checksums
# (two), less the resolve of a ratio no tensor is probed at (every tensor nests at it).
SUMMED_LAUNCHES = {"dqsg": [4] * 5, "dqsg-rotated": [6] * 5, "ndqsg-adaptive": [6, 15, 15, 19, 18],
                   "ndqsg-recovered": [6, 12, 12, 12, 12]}
SUMMED_SCHEMES = {"dqsg": lambda: DQSGSum(3, 64), "dqsg-rotated": lambda: DQSGSum(3, 64, rotation="hadamard"),
                  "ndqsg-adaptive": lambda: NestedSum((8, 1), 64, adaptive=True),
                  "ndqsg-recovered": lambda: NestedSum((3, 1), 64, adaptive=False)}


@pytest.mark.parametrize("scheme", list(SUMMED_SCHEMES))
def test_summed_exchange_costs_a_constant_number_of_launches_per_step(scheme):
    """Each step of an exchange of 3 or of 30 tensors: the same kernel launches (per phase, one for
    all), and the same number of torch operations (the finiteness checks of the sums one for all).
    ``ndqsg-adaptive`` keeps its gradients, so nesting turns on as it pays; ``ndqsg-recovered``
    draws new ones every step, so its nested tensors fail and are recovered at every step."""
    counts, recoveries, torch_ops = [], [], []
    for count in (3, 30):
        gen = torch.Generator().manual_seed(count)
        grads = {f"layer{i}.weight": torch.randn(40 + 17 * i, 9, generator=gen) for i in range(count)}
        ex = SummedExchange(SUMMED_SCHEMES[scheme](), False, Immediate())
        ops_fields._radix_inverses.cache_clear()  # tables made once per process: made in both runs
        ops_segments._inverse_tables.cache_clear()
        launched, operations = [], []
        for step in range(5):
            fresh = scheme == "ndqsg-recovered"
            grads = {name: torch.randn(g.shape, generator=gen) if fresh else g for name, g in grads.items()}
            before = ops.launches["cpu"]
            with TorchOperations() as counted:
                handed = [start(ex, name, g, 5, step) for name, g in grads.items()]
                for finish in handed:
                    finish()
            launched.append(ops.launches["cpu"] - before)
            operations.append(counted.count)
        counts.append(launched)
        torch_ops.append(operations)
        recoveries.append(ex.decode_stats.recovery_rounds)
    assert counts[0] == counts[1] == SUMMED_LAUNCHES[scheme]
    assert torch_ops[0] == torch_ops[1]  # torch's own operations (each a launch on a GPU) too
    assert recoveries == ([4, 4] if scheme == "ndqsg-recovered" else [0, 0])


# launches of one payload-exchange step of a single rank: DQSG encodes in one (CPU: scales inside
# the fused pass) and decodes in one per sender; 1-bit SGD in four (lane sums, column means, bits,
# packing) and two (unpacking, means); QSGD in two (norms, levels; fixed coding: packing) and one
# (scaling; fixed: unpacking), its Elias streams coded on the host; ECDQ (rotated) in six (rotation,
# norms, indices, dither bins, rANS chunks, their gathering) and three per sender (dither bins, rANS
# chunks, reconstruction) and one rotation back, in the tensor scope two more (σ per tensor, the buckets'
# maxima for the exponents); rANS-coded DQSG in five (maxima, steps, indices, rANS
# chunks and their gathering) and two per sender (rANS chunks, reconstruction); scatter-reduce adds the
# owner's re-encoding and its decode; each rotation and rotation back one more; error feedback
# decodes its own payloads
PAYLOAD_CODECS = {"dqsg": DQSG(3, 64), "dqsg-rotated": DQSG(3, 64, rotation="hadamard"),
                  "dqsg-ef": ErrorFeedback(DQSG(3, 64)),
                  "dqsg-rotated-ef": ErrorFeedback(DQSG(3, 64, rotation="hadamard")), "onebit-sgd": OneBitSGD(),
                  "qsgd-elias": QSGD(1, 64), "qsgd-fixed": QSGD(3, 64, norm="max", coding="fixed"),
                  "ecdq": ECDQ(1.1, 64), "ecdq-tensor": ECDQ(1.1, 64, scope="tensor"),
                  "dqsg-rans": DQSG(3, 64, coding="rans")}
PAYLOAD_LAUNCHES = {("allgather", "dqsg"): 2, ("allgather", "dqsg-rotated"): 4, ("allgather", "dqsg-ef"): 3,
                    ("allgather", "dqsg-rotated-ef"): 6, ("allgather", "onebit-sgd"): 8,
                    ("allgather", "qsgd-elias"): 3, ("allgather", "qsgd-fixed"): 5, ("allgather", "ecdq"): 10,
                    ("allgather", "ecdq-tensor"): 12, ("allgather", "dqsg-rans"): 7,
                    ("scatter_reduce", "dqsg"): 4, ("scatter_reduce", "dqsg-rotated"): 8,
                    ("scatter_reduce", "dqsg-ef"): 5, ("scatter_reduce", "dqsg-rotated-ef"): 10,
                    ("scatter_reduce", "onebit-sgd"): 14, ("scatter_reduce", "qsgd-elias"): 6,
                    ("scatter_reduce", "qsgd-fixed"): 10, ("scatter_reduce", "ecdq"): 20,
                    ("scatter_reduce", "ecdq-tensor"): 24, ("scatter_reduce", "dqsg-rans"): 14}


@pytest.mark.parametrize(("reducer", "codec"), sorted(PAYLOAD_LAUNCHES))
def test_payload_exchange_costs_a_constant_number_of_launches_per_step(reducer, codec):
    """A payload exchange of one fused buffer of 3 or of 30 tensors: the same kernel launches (each
    phase one launch for the whole buffer) and, on the allgather, torch operations (the payloads
    parsed with one copy, the results checked finite in one check), and the same result as the tensors exchanged one
    buffer each."""
    counts, torch_ops = [], []
    for count in (3, 30):
        gen = torch.Generator().manual_seed(count)
        grads = {f"layer{i}.weight": torch.randn(40 + 17 * i, 9, generator=gen) for i in range(count)}
        fused, alone = (PayloadExchange(PAYLOAD_CODECS[codec], reducer, True, Immediate()) for _ in range(2))
        for step in range(2):
            keys = [(name, g, dither_key(5, step, name, 0)) for name, g in grads.items()]
            buf = FusedBuffer.of(keys)
            before = ops.launches["cpu"]
            with TorchOperations() as counted:
                out = buf.unflatten(fused.start(buf)())
            launched = ops.launches["cpu"] - before
            for name, g in grads.items():
                assert torch.equal(out[name], start(alone, name, g, 5, step)()), name
        counts.append(launched)
        torch_ops.append(counted.count)
    assert counts[0] == counts[1] == PAYLOAD_LAUNCHES[reducer, codec]
    if reducer == "allgather" and codec != "dqsg-rans":  # (scatter-reduce places each owner's chunk of each
        # tensor, and rANS-coded DQSG makes each tensor's tables, one by one)
        assert abs(torch_ops[0] - torch_ops[1]) <= 1  # torch's operations too (one: where padding is zeros)


# a (simulated) GPU's launches of the same step: DQSG's scales are a pass of their own there
GPU_CODECS = {"dqsg": (DQSG(1, 64), 3), "dqsg-rotated": (DQSG(1, 64, rotation="hadamard"), 5),
              "dqsg-rans": (DQSG(3, 64, coding="rans"), 7), "onebit-sgd": (OneBitSGD(), 8),
              "qsgd-elias": (QSGD(1, 64), 3), "ecdq": (ECDQ(1.1, 64), 10)}


def _nesting_state(names: list[str], ratios: list[int]) -> CodecState:
    """Adaptive nesting's decisions: each name nests at its ratio, or not at all where it is 0."""
    state = CodecState()
    for name, rho in zip(names, ratios):
        state.nesting.nesting[name] = bool(rho)
        if rho:
            state.nesting.ratios[name] = rho
    return state


@pytest.mark.parametrize("codec", [NDQSG((3, 1), adaptive=False), NDQSG((8, 1), 64, rotation="hadamard"),
                                   NDQSG((12, 1), 100, dither="stratified")],
                         ids=["fixed", "adaptive-rotated", "adaptive-stratified"])
@pytest.mark.parametrize("sender", [0, 2])
def test_ndqsg_group_encoder_gives_each_tensor_its_own_bits(codec, sender):
    """NDQSG's group encoder against its single-tensor encoder: a DQSG(s₁) sender, and a nested one
    whose tensors nest at different ratios (adaptive: some not at all, packed by bits and by radix),
    on tensors of one and several columns and an empty one; a non-finite tensor is refused alone;
    the launches do not grow with the tensors."""
    shapes = ((40, 25), (512,), (7, 1), (0,), (300, 10), (1, 513), (1,))
    names = [f"t{i}" for i in range(len(shapes))]
    state = _nesting_state(names, [4, 0, 3, 2, 12, 6, 0])
    gen = torch.Generator().manual_seed(1)
    gs = [torch.randn(shape, generator=gen) - 0.3 for shape in shapes]
    ctxs = [TensorContext(name, shape, dither_key(7, 3, name, sender), 3, state) for name, shape in zip(names, shapes)]
    grouped = codec.encode_group(gs, ctxs)
    for a, b in zip(grouped, [codec.encode(g, c) for g, c in zip(gs, ctxs)]):
        assert a.fields.keys() == b.fields.keys() and all(torch.equal(a.fields[k], b.fields[k]) for k in b.fields)
        assert a.entropy() == b.entropy() and (b.source is None or torch.equal(a.source, b.source))
    assert ("cosets" in grouped[0].fields) == (sender == 2)
    bad = [g.clone() for g in gs]
    bad[4][3, 2] = float("inf")
    assert [e is None for e in codec.encode_group(bad, ctxs)] == [i == 4 for i in range(len(gs))]
    launched = []
    for count in (7, 70):  # every name, so every ratio, in both (one packing launch per ratio in use)
        many = [torch.randn(9, 40 + i, generator=gen) for i in range(count)]
        mctxs = [TensorContext(f"t{i % 7}", g.shape, dither_key(7, 3, f"m{i}", sender), 3, state)
                 for i, g in enumerate(many)]
        before = ops.launches["cpu"]
        codec.encode_group(many, mctxs)
        launched.append(ops.launches["cpu"] - before)
    assert launched[0] == launched[1]


def _recover_from(codec, payloads, ctx):
    """A recovery round answered by the senders' own payloads (what the transport's collective gathers)."""
    return lambda failed: {p: codec.recovery_payload(payloads[p], ctx.sender(p), requests)
                           for p, requests in failed.items()}


@pytest.mark.parametrize("codec", [NDQSG((8, 1), 64, adaptive=False, locate=True), NDQSG((8, 1), 64),
                                   NDQSG((16, 2), 100, rotation="hadamard", dither="stratified")],
                         ids=["fixed-locate", "adaptive", "adaptive-rotated-stratified"])
def test_ndqsg_group_decoder_gives_each_tensor_its_own_bits(codec):
    """NDQSG's group decoder against the decoder of one tensor at a time, 3 senders: the means, the
    decode statistics (failed buckets, syndromes, recovery rounds) and adaptive nesting's decisions
    (some tensors nesting at different ratios, some not); and for payloads its side information
    resolves, the same launches for 7 tensors and for 70 (adaptive nesting's probes included)."""
    shapes = ((40, 25), (512,), (7, 1), (0,), (300, 10), (1, 513), (1,))
    names = [f"t{i}" for i in range(len(shapes))]
    gen = torch.Generator().manual_seed(2)
    gs = [torch.randn(shape, generator=gen) for shape in shapes]
    results = []
    for grouped in (True, False):
        state = _nesting_state(names, [4, 0, 3, 2, 8, 6, 16])
        ctxs = [TensorContext(n, g.shape, dither_key(7, 3, n, 0), 3, state) for n, g in zip(names, gs)]
        noise = torch.Generator().manual_seed(3)
        payloads = [[codec.encode(g * (1 + 0.3 * p) + 2.0 * p * torch.randn(g.shape, generator=noise), c.sender(p))
                     for p in range(3)] for g, c in zip(gs, ctxs)]  # the side information misses some buckets
        recovers = [_recover_from(codec, senders, c) for senders, c in zip(payloads, ctxs)]
        out = codec.aggregate_group(payloads, ctxs, recovers) if grouped else \
            [codec.aggregate(senders, c, r) for senders, c, r in zip(payloads, ctxs, recovers)]
        results.append((out, state.nesting.state_dict()))
    (group, decided), (alone, decided_alone) = results
    for (mean, stats), (mean_alone, stats_alone) in zip(group, alone):
        assert torch.equal(mean, mean_alone) and stats == stats_alone
    assert decided == decided_alone
    assert sum(st.recovery_rounds for _, st in group) > 0  # the rounds were exercised
    launched = []
    for count in (7, 70):
        many = [torch.randn(9, 40 + i, generator=gen) for i in range(count)]
        ctxs = [TensorContext(f"m{i}", g.shape, dither_key(7, 3, f"m{i}", 0), 3, CodecState())
                for i, g in enumerate(many)]
        payloads = [[codec.encode(g * (1 + 1e-4 * p), c.sender(p)) for p in range(3)] for g, c in zip(many, ctxs)]
        before = ops.launches["cpu"]
        out = codec.aggregate_group(payloads, ctxs, [None] * count)
        launched.append(ops.launches["cpu"] - before)
        assert not any(st.recovery_rounds for _, st in out)
    assert launched[0] == launched[1]


@pytest.mark.parametrize("codec", [NDQSG((8, 1), 16, adaptive=False, locate=True),
                                   NDQSG((8, 1), 16, rotation="hadamard")], ids=["fixed-locate", "adaptive-rotated"])
def test_ndqsg_group_on_cuda_kernels_gives_the_cpu_bits(codec):
    """NDQSG's group encoder and decoder on the CUDA kernels (Numba's simulator here, or the GPU), 3
    senders, recovery rounds and adaptive nesting's probes included: the CPU twins' bits and
    statistics, and the same nesting decisions (small tensors: the simulator runs a Python thread per
    GPU thread)."""
    shapes, names = ((3, 24), (40,), (2, 5)), ["a", "b", "c"]
    gen = torch.Generator().manual_seed(4)
    gs = [torch.randn(shape, generator=gen) for shape in shapes]
    noise = [[p * torch.randn(shape, generator=gen) for p in range(3)] for shape in shapes]

    def run():
        state = _nesting_state(names, [4, 2, 0])
        ctxs = [TensorContext(n, g.shape, dither_key(7, 3, n, 0), 3, state) for n, g in zip(names, gs)]
        by_sender = [codec.encode_group([g * (1 + 0.3 * p) + e[p] for g, e in zip(gs, noise)],
                                        [c.sender(p) for c in ctxs]) for p in range(3)]
        payloads = [[by_sender[p][i] for p in range(3)] for i in range(len(gs))]
        out = codec.aggregate_group(payloads, ctxs, [_recover_from(codec, sent, c) for sent, c in zip(payloads, ctxs)])
        return torch.cat([m for m, _ in out]), [st for _, st in out], state.nesting.state_dict()

    cpu = run()
    before = ops.launches["cuda"]
    with ops.force_target("cuda"):
        cuda = run()
    assert ops.launches["cuda"] > before
    assert torch.equal(cpu[0], cuda[0]) and cpu[1:] == cuda[1:]
    assert sum(st.recovery_rounds for st in cpu[1]) > 0


@pytest.mark.skipif(not sim.available(), reason="needs Numba's CUDA simulator and no real GPU")
@pytest.mark.parametrize("codec", sorted(GPU_CODECS))
def test_payload_exchange_launches_on_a_simulated_gpu(codec):
    """On a (simulated) GPU too a payload buffer of 2 or of 3 tensors costs the same launches, its
    result stays on the GPU and has the host's bits (small tensors: the simulator runs a Python
    thread per GPU thread)."""
    counts = []
    for count in (2, 3):
        gen = torch.Generator().manual_seed(count)
        grads = {f"layer{i}.weight": torch.randn(2 + i, 24, generator=gen) for i in range(count)}
        outs = []
        for device in ("cpu", "cuda"):
            ex = PayloadExchange(GPU_CODECS[codec][0], "allgather", True, Immediate())
            with sim.simulated_gpu() if device == "cuda" else contextlib.nullcontext():
                buf = FusedBuffer.of([(name, g.to(device), dither_key(5, 0, name, 0)) for name, g in grads.items()])
                before = ops.launches[device]
                outs.append(ex.start(buf)())
                launched = ops.launches[device] - before
        assert outs[1].device == sim.GPU and torch.equal(outs[0], outs[1].cpu())
        counts.append(launched)
    assert counts[0] == counts[1] == GPU_CODECS[codec][1]


def test_topk_groups_cost_a_constant_number_of_torch_operations():
    """Top-k's selection is torch's (a sort, not a kernel of ours): a group of 3 or of 30 tensors is
    encoded and aggregated among 2 senders in the same number of torch operations."""
    counts = []
    for count in (3, 30):
        gen = torch.Generator().manual_seed(count)
        gs = [torch.randn(40 + 17 * i, 9, generator=gen) for i in range(count)]
        ctxs = [TensorContext(f"t{i}", tuple(g.shape), dither_key(5, 0, f"t{i}", 0), 2, CodecState())
                for i, g in enumerate(gs)]
        with TorchOperations() as ops_run:
            encs = TopK(0.1).encode_group(gs, ctxs)
            TopK(0.1).aggregate_group([[e, e] for e in encs], ctxs, [None] * count)
        counts.append(ops_run.count)
    assert counts[0] == counts[1] > 0


def test_rans_groups_beyond_a_byte_of_tables_run_in_runs(monkeypatch):
    """rANS-coded DQSG names each symbol's table (its tensor's) in one byte: a group of more tensors
    than that is coded in runs of at most MAX_RANS_GROUP tensors, one rANS launch each, with the
    bits of the single-tensor methods (the limit lowered to 4 here: 10 tensors, 3 runs)."""
    monkeypatch.setattr(dqsg_module, "MAX_RANS_GROUP", 4)
    codec = DQSG(3, 64, rotation="hadamard", coding="rans")
    gen = torch.Generator().manual_seed(3)
    gs = [torch.randn(30 + 41 * i, generator=gen) for i in range(10)]
    ctxs = [TensorContext(f"t{i}", tuple(g.shape), dither_key(7, 3, f"t{i}", 1), 2, CodecState())
            for i, g in enumerate(gs)]
    before = ops.launches["cpu"]
    grouped = codec.encode_group(gs, ctxs)
    encode_launches = ops.launches["cpu"] - before
    for a, g, c in zip(grouped, gs, ctxs):
        b = codec.encode(g, c)
        assert all(torch.equal(a.fields[k], b.fields[k]) for k in b.fields) and a.entropy() == b.entropy()
    before = ops.launches["cpu"]
    decoded = codec.decode_group(grouped, ctxs)
    decode_launches = ops.launches["cpu"] - before
    assert all(torch.equal(d, codec.decode(e, c)) for d, e, c in zip(decoded, grouped, ctxs))
    # rotation, maxima, steps, indices, then per run the rANS chunks and their gathering; per run the
    # rANS chunks, then the reconstruction and the rotation back
    assert (encode_launches, decode_launches) == (4 + 2 * 3, 3 + 2)


def test_ecdq_tensor_scope_groups_keep_exponents_zero_buckets_and_refusals_by_name():
    """ECDQ's tensor scope over a group: a spike's bucket takes a coarser exponent, a bucket of zeros
    its own byte, each tensor its own σ, as when encoded alone; the group's refusals name the tensor
    at fault (a step too fine for its spike, a NaN) as encoding it alone does."""
    d = 64
    spike = torch.zeros(24 * d)  # σ ≈ 1e3/√1536: the spike is 1e3/(0.19σ) ≈ 206 > 125 steps
    spike[17], spike[70] = -1e3, 0.5
    mixed = torch.full((2 * d,), 1e-6)
    mixed[3] = 50.0
    noise = torch.randn(100, generator=torch.Generator().manual_seed(1))
    gs = [spike, torch.zeros(0), mixed, torch.zeros(d + 5), noise]
    ctxs = [TensorContext(f"t{i}", tuple(g.shape), dither_key(7, 3, f"t{i}", 1), 4, CodecState())
            for i, g in enumerate(gs)]
    codec = ECDQ(0.19, d, rotation="none", scope="tensor")
    grouped = codec.encode_group(gs, ctxs)
    for a, g, c in zip(grouped, gs, ctxs):
        b = codec.encode(g, c)
        assert all(torch.equal(a.fields[k], b.fields[k]) for k in b.fields) and a.entropy() == b.entropy()
    assert int(grouped[0].fields["codes"][0]) // CLASSES > 0 == int(grouped[0].fields["codes"][1]) // CLASSES
    assert grouped[3].fields["codes"].tolist() == [ZERO_BUCKET, ZERO_BUCKET]
    for out, e, c in zip(codec.decode_group(grouped, ctxs), grouped, ctxs):
        assert torch.equal(out, codec.decode(e, c))
    with pytest.raises(ValueError, match="too fine for 't2'"):
        ECDQ(1e-7, d, rotation="none", scope="tensor").encode_group(gs[1:], ctxs[1:])
    gs[4][7] = float("inf")
    with pytest.raises(FloatingPointError, match="'t4'"):
        codec.encode_segments(gs, ctxs)
    assert [e is None for e in codec.encode_group(gs, ctxs)] == [False] * 4 + [True]


@pytest.mark.parametrize("codec", [DQSG(1), DQSG(3, rotation="hadamard"), DQSG(2, 100, dither="independent"),
                                   OneBitQuantizer(), QSGD(1), QSGD(3, 100, norm="max", coding="fixed"),
                                   ECDQ(1.1), ECDQ(2.6, 64, dither="independent", rotation="none"),
                                   DQSG(3, rotation="hadamard", coding="rans"), ECDQ(0.7, 100, scope="tensor"),
                                   ECDQ(2.6, 64, dither="independent", rotation="none", scope="tensor"), TopK(0.1)],
                         ids=["s1", "s3-rotated", "independent", "onebit", "qsgd-elias", "qsgd-fixed", "ecdq",
                              "ecdq-independent", "dqsg-rans", "ecdq-tensor", "ecdq-tensor-independent", "topk"])
@pytest.mark.parametrize("ranks", [4, 3])
def test_group_methods_give_each_tensor_its_own_bits(codec, ranks):
    """The group encoders, decoders and aggregations (segmented launches) against the single-tensor
    methods, tensor by tensor, among 4 ranks and among 3 (for DQSG the stratified dither's other
    family, which aggregates per tensor), on tensors of one and of several columns and an empty one;
    a non-finite tensor is refused alone; error feedback over groups leaves the residuals of
    tensor-by-tensor encoding."""
    shapes = ((40, 25), (512,), (7, 1), (0,), (300, 10), (1, 513), (1,))
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(shape, generator=gen) - 0.3 for shape in shapes]
    ctxs = [TensorContext(f"t{i}", shape, dither_key(7, 3, f"t{i}", 1), ranks, CodecState())
            for i, shape in enumerate(shapes)]
    grouped = codec.encode_group(gs, ctxs)
    alone = [codec.encode(g, c) for g, c in zip(gs, ctxs)]
    for a, b in zip(grouped, alone):
        assert all(torch.equal(a.fields[k], b.fields[k]) for k in b.fields) and a.entropy() == b.entropy()
    for d, e, c in zip(codec.decode_group(grouped, ctxs), alone, ctxs):
        assert torch.equal(d, codec.decode(e, c))
    payloads = [[codec.encode(g * (p + 1), c.sender(p)) for p in range(ranks)] for g, c in zip(gs, ctxs)]
    for (mean, _), senders, c in zip(codec.aggregate_group(payloads, ctxs, [None] * len(ctxs)), payloads, ctxs):
        assert torch.equal(mean, codec.aggregate(senders, c)[0])
    bad = [g.clone() for g in gs]
    bad[4][3, 2] = float("nan")
    refused = codec.encode_group(bad, ctxs)
    assert [e is None for e in refused] == [i == 4 for i in range(len(gs))]
    states = CodecState(), CodecState()
    ef = ErrorFeedback(codec)
    by_group, by_tensor = ([TensorContext(c.name, c.shape, c.key, ranks, st) for c in ctxs] for st in states)
    for _ in range(2):
        for x, y in zip(ef.encode_group(gs, by_group), [ef.encode(g, c) for g, c in zip(gs, by_tensor)]):
            assert all(torch.equal(x.fields[k], y.fields[k]) for k in y.fields)
    assert all(torch.equal(states[0].residuals[k], states[1].residuals[k]) for k in states[1].residuals)
    assert ef.encode_group([], []) == [] == codec.encode_group([], [])  # a group whose every tensor was refused
