"""Offline data sets: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (idx files), digits
from scikit-learn, and the Python standard library's own source files as a byte-level text corpus.
Nothing is downloaded."""

from __future__ import annotations

import gzip
import os
import sysconfig
import zlib
from dataclasses import dataclass
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


#: standard-library folders left out of the text corpus: third-party packages, the test suites (which
#: distributions package separately, so their presence varies) and IDLE
STDLIB_SKIPPED = ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__")


@dataclass(frozen=True)
class TextCorpus:
    """Source files as bytes, split by file: ``train`` holds the training files, ``validation`` the
    others' bytes joined (files separated by a NUL byte)."""
    train: list[bytes]
    validation: bytes
    root: str

    @property
    def train_bytes(self) -> int:
        return sum(len(f) for f in self.train)


def load_stdlib_text(root: Path | None = None, validation_share: int = 10) -> TextCorpus:
    """The ``*.py`` files under ``root`` (default: this Python's standard library,
    ``sysconfig.get_paths()["stdlib"]``, without :data:`STDLIB_SKIPPED`), split deterministically by
    file: a file is a validation file when the CRC-32 of its path relative to ``root`` is 0 modulo
    ``validation_share`` (about one file in ``validation_share``), whatever else the folder holds."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not set(p.relative_to(root).parts) & set(STDLIB_SKIPPED) and p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.py files under {root}: pass a folder of source files")
    train, validation = [], []
    for path in files:
        rel = path.relative_to(root).as_posix().encode()
        (validation if zlib.crc32(rel) % validation_share == 0 else train).append(path.read_bytes())
    if not train or not validation:
        raise ValueError(f"{root}: {len(files)} files give an empty training or validation split")
    return TextCorpus(train, b"\0".join(validation), str(root))
