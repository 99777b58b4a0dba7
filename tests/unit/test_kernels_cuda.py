"""Every CUDA kernel against its CPU twin, on small awkward sizes (empty, 1, odd, not a multiple of
the bucket). Without a GPU this runs in Numba's CUDA simulator (tests/conftest.py switches it on);
launch/gpu_check.sh runs the same file on a real GPU. Every output must match bit for bit, decoded
floats included: kernels/arith/ is written so that no compiler choice (multiply-add contraction,
approximate division) can change a result, and tests/unit/test_ptx.py checks the compiled PTX for it.
"""

import numpy as np
import pytest
import torch
from kernel_cases import CASES, SIZES

from hvdquant.kernels import ops
from hvdquant.kernels.arith.constants import GPU_TILE

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no CUDA device and no simulator", allow_module_level=True)
from hvdquant.kernels import cuda as cuda_kernels  # noqa: E402 (compiles the CUDA kernels: only where CUDA is)


def assert_same(cpu_out: torch.Tensor, gpu_out: torch.Tensor, what: str) -> None:
    """Bit-identical outputs (floats compared as their bit patterns, so -0.0 != 0.0 and NaNs count)."""
    gpu_out = gpu_out.cpu()
    assert cpu_out.dtype == gpu_out.dtype and cpu_out.shape == gpu_out.shape, what
    if cpu_out.is_floating_point():
        a, b = cpu_out.numpy(), gpu_out.numpy()
        bits = np.int32 if a.dtype == np.float32 else np.int64
        ulps = np.abs(a.view(bits).astype(np.int64) - b.view(bits).astype(np.int64))
        assert ulps.max(initial=0) == 0, f"{what}: {ulps.max()} ulp apart"
    else:
        assert torch.equal(cpu_out, gpu_out), f"{what}: integer outputs differ"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_kernel_matches_cpu_twin(case, n):
    expected = CASES[case](n)
    with ops.force_target("cuda"):
        got = CASES[case](n)
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert_same(a, b, f"{case}[{i}] n={n}")


@pytest.mark.parametrize(("case", "threads", "n"), [
    *((case, 32, GPU_TILE + 517) for case in ("dqsg_fused", "dqsg_fields", "segmented")),
    ("dqsg_fields", cuda_kernels.MAX_THREADS, GPU_TILE + 517), ("absmax", cuda_kernels.MAX_THREADS, 517)])
def test_block_kernels_with_any_block_size(case, threads, n, monkeypatch):
    """The fused passes give each CUDA block one range of at most GPU_TILE elements, the cooperative
    kernels (rotation, bucket maxima, norms and checksums) one bucket, whose threads share the work:
    sizes that need several blocks, the last one short, give the CPU twin's bits with 32 threads a
    block (the simulator's launches; a thread takes several units) and, for one kernel of each kind,
    with the most a block may have (a real GPU's launches; slow in the simulator, one Python thread
    each). (The cooperative kernels with 32 threads over several buckets, the last one short, are
    test_cuda_kernel_matches_cpu_twin's n = 517.)"""
    monkeypatch.setattr(cuda_kernels, "THREADS_PER_BLOCK", threads)
    expected = CASES[case](n)
    with ops.force_target("cuda"):
        got = CASES[case](n)
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert_same(a, b, f"{case}[{i}] n={n}")


def test_mixed_devices_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a real GPU to make a CUDA tensor")
    with pytest.raises(ValueError, match="same device"):
        ops.bucket_absmax(torch.ones(4, device="cuda"), 2, out=torch.empty(2))
