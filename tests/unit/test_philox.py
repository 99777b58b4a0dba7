"""The counter-based generator: Philox-4x32-10 known answers and the dither streams built on it."""

import numpy as np
import pytest

from hvdquant.kernels import DitherKey, cpu, ops, tensor_id

# Known-answer vectors of Philox-4x32-10 from the Random123 distribution (kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    words = [np.uint64(w) for w in (*counter, *key)]
    assert tuple(int(x) for x in cpu.philox4x32(*words)) == expected


def test_dither_is_the_documented_function_of_philox():
    """Element i of stream (seed, step, tensor, sender) = lane i%4 of Philox(counter=(i//4, step,
    tensor, sender), key=(seed lo, seed hi)), mapped by u = ((x >> 9) + 1/2)·2^-23 − 1/2."""
    key = DitherKey(seed=0x0123456789ABCDEF, step=7, tensor_id=tensor_id("fc.weight"), sender=3)
    u = ops.dither(11, key).numpy()
    for i in range(11):
        counter = (i // 4, key.step, key.tensor_id, key.sender)
        words = [np.uint64(w) for w in (*counter, key.seed & 0xFFFFFFFF, key.seed >> 32)]
        x = int(cpu.philox4x32(*words)[i % 4])
        assert u[i] == np.float32(((x >> 9) + 0.5) * 2.0**-23 - 0.5)


def test_dither_range_and_moments():
    u = ops.dither(1_000_003, DitherKey(1, 0, 0, 0)).numpy().astype(np.float64)
    assert u.min() > -0.5 and u.max() < 0.5
    # Uniform(-1/2, 1/2): mean 0, variance 1/12. Standard errors at n = 1e6: mean 2.9e-4,
    # variance 7.5e-5; bounds are 5 standard errors.
    assert abs(u.mean()) < 5 * (1 / 12 / len(u)) ** 0.5
    assert abs(u.var() - 1 / 12) < 5 * ((1 / 80 - 1 / 144) / len(u)) ** 0.5


def test_streams_are_reproducible_and_distinct():
    base = DitherKey(seed=42, step=3, tensor_id=tensor_id("w"), sender=0)
    a = ops.dither(1000, base).numpy()
    assert np.array_equal(a, ops.dither(1000, base).numpy())
    assert np.array_equal(a[:7], ops.dither(7, base).numpy())  # a prefix does not depend on the length
    for other in (DitherKey(43, 3, base.tensor_id, 0), DitherKey(42, 4, base.tensor_id, 0),
                  DitherKey(42, 3, tensor_id("b"), 0), base.for_sender(1)):
        b = ops.dither(1000, other).numpy()
        assert not np.array_equal(a, b)
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.15  # 1000 pairs: |r| > 0.15 has p < 1e-6


@pytest.mark.parametrize("field,value", [("seed", -1), ("seed", 1 << 64), ("step", 1 << 32),
                                         ("tensor_id", -5), ("sender", 1 << 32)])
def test_key_out_of_range_is_refused(field, value):
    kw = dict(seed=1, step=0, tensor_id=0, sender=0) | {field: value}
    with pytest.raises(ValueError, match=field):
        DitherKey(**kw)


def test_key_wrong_type_is_refused():
    with pytest.raises(TypeError, match="step"):
        DitherKey(seed=1, step=1.5, tensor_id=0, sender=0)


def test_tensor_id_is_stable():
    assert tensor_id("conv1.weight") == tensor_id("conv1.weight") != tensor_id("conv1.bias")
    assert 0 <= tensor_id("x") < 2**32
