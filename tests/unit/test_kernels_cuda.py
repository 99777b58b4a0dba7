"""Every CUDA kernel against its CPU twin, on small awkward sizes (empty, 1, odd, not a multiple of
the bucket). Without a GPU this runs in Numba's CUDA simulator (tests/conftest.py switches it on);
launch/gpu_check.sh runs the same file on a real GPU. Integer codes and packed bytes must match
bit for bit; decoded floats within 1 ulp (they match exactly, by construction of kernels/arith.py).
"""

import numpy as np
import pytest
import torch

from hvdquant.kernels import DitherKey, ops

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no CUDA device and no simulator", allow_module_level=True)

KEY = DitherKey(seed=123456789, step=11, tensor_id=5, sender=1)
STRAT4 = KEY.stratified(4)  # stratified dither among 4 ranks (a power of 2) and among 3 (cycle walk + shift)
STRAT3 = KEY.stratified(3)
SIZES = [0, 1, 7, 130, 517]
REAL_GPU = not cuda.simulator_enabled if hasattr(cuda, "simulator_enabled") else False


def on_device(t: torch.Tensor) -> torch.Tensor:
    """CUDA tensors on a real GPU; CPU tensors run through the CUDA kernels in the simulator."""
    return t.cuda() if torch.cuda.is_available() and REAL_GPU else t


def g_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def scales(g, bucket, levels=1):
    return ops.bucket_absmax(g, bucket) / levels


def sym_of(n, hi, seed=0):
    return torch.randint(0, hi, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def nested_decode_with_kout(n):
    kout = torch.empty(n, dtype=torch.int32)
    ghat = ops.nested_decode(sym_of(n, 5), scales(g_of(n), 64, 2), 64, 5, g_of(n, 3) * 2, KEY.for_sender(0),
                             senders=2, factor=0.5, kout=kout)
    return ghat, kout


CASES = {
    "dither": lambda n: (ops.dither(n, KEY),),
    "absmax": lambda n: (ops.bucket_absmax(g_of(n), 64),),
    "checksum": lambda n: (ops.bucket_checksum(sym_of(n, 15).to(torch.int32) - 7, 64),),
    "l2": lambda n: (ops.bucket_l2(g_of(n), 64),),
    "dqsg_encode": lambda n: (ops.dqsg_encode(g_of(n), scales(g_of(n), 64, 3), 64, 3, KEY),
                              ops.dqsg_encode(g_of(n), scales(g_of(n), 64, 3), 64, 3, KEY, symbols=True)),
    "dqsg_decode": lambda n: (ops.dqsg_decode(
        torch.randint(-6, 7, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(1)),
        scales(g_of(n), 64, 3), 64, KEY.for_sender(0), senders=3, factor=1 / 3),
                              ops.dqsg_decode(sym_of(n, 7), scales(g_of(n), 64, 3), 64, KEY, offset=3)),
    "stratified": lambda n: (ops.dither(n, STRAT4), ops.dither(n, STRAT3),
                             ops.dqsg_encode(g_of(n), scales(g_of(n), 64, 3), 64, 3, STRAT3),
                             ops.dqsg_decode(torch.randint(-6, 7, (n,), dtype=torch.int32,
                                                           generator=torch.Generator().manual_seed(2)),
                                             scales(g_of(n), 64, 3), 64, STRAT4.for_sender(1), senders=2),
                             ops.dqsg_decode(torch.ones(n, dtype=torch.int32), scales(g_of(n), 64, 3), 64,
                                             STRAT4.for_sender(0), senders=4),
                             ops.dqsg_aggregate(torch.stack([sym_of(n, 7, p).view(torch.int8) - 3 for p in range(3)]),
                                                torch.stack([scales(g_of(n, p), 64, 3) for p in range(3)]), 64,
                                                STRAT3.for_sender(0), factor=1 / 3),
                             ops.dqsg_aggregate(torch.stack([sym_of(n, 7, p) for p in range(3)]),
                                                torch.stack([scales(g_of(n, p), 64, 3) for p in range(3)]), 64,
                                                STRAT3.for_sender(0), factor=1 / 3, offset=3)),
    "dqsg_fused": lambda n: (*ops.dqsg_encode_packed(g_of(n), 64, 1, STRAT3),
                             *ops.dqsg_encode_packed(g_of(n), 64, 3, KEY),
                             ops.dqsg_decode_packed(ops.radixpack(sym_of(n, 3), 3), scales(g_of(n), 64), 64, 1,
                                                    STRAT4, n),
                             ops.dqsg_decode_packed(ops.bitpack(sym_of(n, 7), 3), scales(g_of(n), 64, 3), 64, 3,
                                                    KEY, n)),
    "dqsg_fields": lambda n: (*ops.dqsg_encode_fields(g_of(n), scales(g_of(n), 64, 3), 64, 3, STRAT3, 19, 11),
                              ops.dqsg_encode_fields(g_of(n), scales(g_of(n), 64), 64, 1, KEY, 7, 7)[0],
                              ops.dqsg_decode_fields(ops.pack_sum_fields(sym_of(n, 7).to(torch.int8) - 3, 9, 19, 11)
                                                     * 0.5, n, 0.5, 19, 11, 9, scales(g_of(n), 64, 3), 64,
                                                     STRAT3.for_sender(0), senders=3)),
    "nested_encode": lambda n: (ops.nested_encode(g_of(n), scales(g_of(n), 64, 3), 64, 3, 4, KEY),),
    "nested_decode": lambda n: nested_decode_with_kout(n),
    "qsgd": lambda n: (ops.qsgd_encode(g_of(n), ops.bucket_l2(g_of(n), 64), 64, 4, KEY),
                       ops.scale_decode(sym_of(n, 9).to(torch.int8) - 4, ops.bucket_l2(g_of(n), 64),
                                        64, 4)),
    "onebit": lambda n: (*ops.onebit_column_means(g_of(n), 1), ops.onebit_encode(g_of(n)),
                         ops.onebit_decode(sym_of(n, 2), 1, torch.ones(1), -torch.ones(1))),
    "bitpack3": lambda n: (ops.bitpack(sym_of(n, 8), 3), ops.bitunpack(ops.bitpack(sym_of(n, 8), 3), 3, n)),
    "bitpack1": lambda n: (ops.bitpack(sym_of(n, 2), 1),),
    "radix3": lambda n: (ops.radixpack(sym_of(n, 3), 3), ops.radixunpack(ops.radixpack(sym_of(n, 3), 3), 3, n)),
    "modadd4": lambda n: (ops.modadd_cosets(ops.pack_cosets(sym_of(n, 4, 1), 4), ops.pack_cosets(sym_of(n, 4, 2), 4),
                                            4),),
    "modadd5": lambda n: (ops.modadd_cosets(ops.pack_cosets(sym_of(n, 5, 1), 5), ops.pack_cosets(sym_of(n, 5, 2), 5),
                                            5),),
    "sum_fields": lambda n: (ops.pack_sum_fields(sym_of(n, 7).to(torch.int8) - 3, 3, 7, 12),
                             ops.unpack_sum_fields(ops.pack_sum_fields(torch.full((n,), 2, dtype=torch.int8), 3, 7, 12)
                                                   * 0.25, n, 3, 7, 12, factor=0.25)),
}


def assert_same(cpu_out: torch.Tensor, gpu_out: torch.Tensor, what: str) -> None:
    gpu_out = gpu_out.cpu()
    assert cpu_out.dtype == gpu_out.dtype and cpu_out.shape == gpu_out.shape, what
    if cpu_out.is_floating_point():
        a, b = cpu_out.numpy(), gpu_out.numpy()
        ulps = np.abs(a.view(np.int32 if a.dtype == np.float32 else np.int64).astype(np.int64)
                      - b.view(np.int32 if b.dtype == np.float32 else np.int64).astype(np.int64))
        assert ulps.max(initial=0) <= 1, f"{what}: {ulps.max()} ulp apart"
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


def test_mixed_devices_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a real GPU to make a CUDA tensor")
    with pytest.raises(ValueError, match="same device"):
        ops.bucket_absmax(torch.ones(4, device="cuda"), 2, out=torch.empty(2))
