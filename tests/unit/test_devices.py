"""Where the arithmetic runs: kernel launches are counted per target, and the main job's --device
choice refuses CUDA clearly where there is none. (The CUDA paths end to end run in
launch/gpu_e2e.sh on a GPU; its dry run checks the script on the CPU.)"""

import pytest
import torch

import hvdquant
from hvdquant.codecs.base import TensorContext
from hvdquant.examples.train_fashion_mnist import pick_device
from hvdquant.kernels import DitherKey, ops


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
