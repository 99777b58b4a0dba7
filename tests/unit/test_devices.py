"""Where the arithmetic runs: kernel launches are counted per target, and the main job's --device
choice refuses CUDA clearly where there is none. (The CUDA paths end to end run in
launch/gpu_e2e.sh on a GPU; its dry run checks the script on the CPU.)"""

import pytest
import torch
from one_tensor import start

import hvdquant
from hvdquant.codecs.base import TensorContext
from hvdquant.examples.frameworks import pick_device
from hvdquant.kernels import DitherKey, ops
from hvdquant.transports.collectives import Started
from hvdquant.transports.nested_sum import NestedSum
from hvdquant.transports.payload import PayloadExchange
from hvdquant.transports.sum_schemes import DQSGSum
from hvdquant.transports.summed import SummedExchange


def test_launches_are_counted_per_target():
    g = torch.randn(3000, generator=torch.Generator().manual_seed(0))
    ctx = TensorContext("w", (3000,), DitherKey(1, 2, 3, 0), 1)
    before = ops.launches.copy()
    enc = hvdquant.DQSG(levels=1, bucket_size=512).encode(g, ctx)
    hvdquant.DQSG(levels=1, bucket_size=512).decode(enc, ctx)
    assert ops.launches["cpu"] - before["cpu"] == 2  # one fused encode pass, one fused decode pass
    assert ops.launches["cuda"] == before["cuda"]
    with ops.force_target("cuda"):  # Numba's CUDA simulator (tests/conftest.py), or the GPU
        hvdquant.DQSG(levels=1, bucket_size=512).encode(g[:300], ctx)
    assert ops.launches["cuda"] > before["cuda"]


def test_encoded_payload_knows_its_device():
    ctx = TensorContext("w", (100,), DitherKey(1, 2, 3, 0), 1)
    enc = hvdquant.QSGD(levels=4, bucket_size=64).encode(torch.ones(100), ctx)
    assert enc.device == torch.device("cpu")
    assert hvdquant.QSGD(levels=4, bucket_size=64).decode(enc, ctx).device == torch.device("cpu")


def test_device_choice():
    assert pick_device("cpu", 0) == torch.device("cpu")
    if torch.cuda.is_available():
        assert pick_device("auto", 0).type == "cuda"
        return
    assert pick_device("auto", 3) == torch.device("cpu")
    with pytest.raises(SystemExit, match="no CUDA device is available"):
        pick_device("cuda", 0)


class OneRank:
    """Collectives of a single rank (P = 1): every collective returns its input."""

    rank, size = 0, 1

    def allreduce(self, tensor, name, op="sum"):
        out = tensor.clone()
        return Started(lambda: out, 0)

    def allgather_bytes(self, buf, name):
        return Started(lambda: [buf], 0)

    def allgather_object(self, obj, name):
        return [obj]


def _exchange_both_ways(run):
    """``run()`` on the CPU kernels and on the CUDA kernels (Numba's simulator here, or the GPU)."""
    cpu = run()
    before = ops.launches["cuda"]
    with ops.force_target("cuda"):
        cuda = run()
    assert ops.launches["cuda"] > before  # the CUDA kernels did run
    return cpu, cuda


SUM_SCHEMES = {"dqsg-sum": lambda: DQSGSum(1, 64), "nested-sum": lambda: NestedSum((3, 1), 64),
               "nested-sum-fixed": lambda: NestedSum((8, 1), 64, adaptive=False)}


@pytest.mark.parametrize("scheme", list(SUM_SCHEMES))
def test_summed_exchange_on_cuda_kernels_gives_the_cpu_bits(scheme):
    """The stock path end to end (scales, summable words, decode) through the CUDA kernels: the
    same bits as through the CPU twins, for three steps (nested: side information from step 2;
    adaptive: probed; fixed: nested, the gradients moving so that some buckets are recovered)."""
    grads = {f"w{i}": torch.randn(40 * (i + 1), 3, generator=torch.Generator().manual_seed(i)) for i in range(3)}

    def run():
        ex = SummedExchange(SUM_SCHEMES[scheme](), False, OneRank())
        outs = []
        for step in range(3):
            handed = [start(ex, name, g * (1 + step) ** 2, 9, step) for name, g in grads.items()]
            outs += [finish() for finish in handed]
        return torch.cat([o.reshape(-1) for o in outs]), ex.decode_stats.failed_buckets

    (cpu, failed), (cuda, failed_cuda) = _exchange_both_ways(run)
    assert torch.equal(cpu, cuda)
    assert failed == failed_cuda
    assert (failed > 0) == (scheme == "nested-sum-fixed")


@pytest.mark.parametrize("codec", [hvdquant.DQSG(3, 64), hvdquant.QSGD(4, 64), hvdquant.OneBitSGD(),
                                   hvdquant.ECDQ(1.5, 64), hvdquant.ECDQ(1.5, 64, scope="tensor")],
                         ids=["dqsg", "qsgd", "onebit-ef", "ecdq", "ecdq-tensor"])
def test_payload_exchange_on_cuda_kernels_gives_the_cpu_bits(codec):
    """The payload path (encode, fused group buffer, aggregate) through the CUDA kernels: the same
    bits as through the CPU twins."""
    import copy

    grads = {f"w{i}": torch.randn(50 * (i + 1), 2, generator=torch.Generator().manual_seed(i)) for i in range(3)}

    def run():
        ex = PayloadExchange(copy.deepcopy(codec), "allgather", True, OneRank())
        finishers = [start(ex, name, g, 4, 0) for name, g in grads.items()]
        return torch.cat([f().reshape(-1) for f in finishers])

    cpu, cuda = _exchange_both_ways(run)
    assert torch.equal(cpu, cuda)
