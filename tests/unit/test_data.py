"""Offline data: Debian's Fashion-MNIST idx files and scikit-learn's digits."""

import gzip

import numpy as np
import pytest
import torch

from hvdquant.data import load_digits, load_fashion_mnist, read_idx


def test_fashion_mnist_shapes_and_labels():
    tx, ty, vx, vy = load_fashion_mnist()
    assert tx.shape == (60000, 1, 28, 28) and vx.shape == (10000, 1, 28, 28)
    assert tx.dtype == torch.float32 and ty.dtype == torch.int64
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert torch.bincount(ty).tolist() == [6000] * 10
    assert torch.bincount(vy).tolist() == [1000] * 10
    assert abs(float(tx.mean())) < 0.01 and abs(float(tx.std()) - 1) < 0.01


def test_read_idx_roundtrip_and_errors(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes()
    path = tmp_path / "x.idx.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + data.tobytes())
    assert np.array_equal(read_idx(path), data)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(header + data.tobytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an unsigned-byte idx"):
        read_idx(bad)


def test_missing_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nope")


def test_digits():
    x, y = load_digits()
    assert x.shape == (1797, 64) and float(x.max()) == 1.0 and set(y.tolist()) == set(range(10))
