"""Offline data sets: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (idx files), digits
from scikit-learn. Nothing is downloaded."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path(os.environ.get("HVDQ_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic (0, 0, dtype 0x08, ndim), big-endian dims, data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)}, file holds {data.size} bytes")
    return data.reshape(tuple(dims))


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y); images float32 (N, 1, 28, 28) normalized, labels int64."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: install Debian's dataset-fashion-mnist "
                                "(bash launch/setup.sh does) or set HVDQ_FASHION_MNIST")
    out = []
    for split in ("train", "t10k"):
        x = read_idx(root / f"{split}-images-idx3-ubyte.gz")
        y = read_idx(root / f"{split}-labels-idx1-ubyte.gz")
        xt = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        out += [(xt - 0.2860) / 0.3530, torch.from_numpy(y.astype(np.int64))]
    return out[0], out[1], out[2], out[3]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits: (x float32 (1797, 64) in [0, 1], y int64)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return torch.from_numpy(d.data.astype(np.float32) / 16.0), torch.from_numpy(d.target.astype(np.int64))
