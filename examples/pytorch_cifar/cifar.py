"""CIFAR-10 for the example: read a local ``cifar-10-batches-py`` folder, or generate images.

Nothing is downloaded. The folder is the standard "CIFAR-10 python version": ``data_batch_1``
to ``data_batch_5`` and ``test_batch``, each a pickled dict with ``data`` (``N x 3072`` uint8,
channel-major 32x32 images) and ``labels``. The files are read with an unpickler that accepts
only those dicts, lists, strings and numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"

_ALLOWED = {  # what numpy arrays (and bytes, in a Python 3 protocol-2 pickle) are built from
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of a CIFAR batch")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as ``(images uint8 N x 3 x 32 x 32, labels int64 N)``."""
    with open(path, "rb") as f:
        batch = _ArraysOnly(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (no data/labels)")
    images = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(images) != len(labels):
        raise ValueError(f"{path}: expected N x 3072 images and N labels, got {images.shape}")
    return images.reshape(-1, 3, 32, 32), labels


def load(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train images, train labels, test images, test labels)`` from a local copy."""
    missing = [n for n in [*TRAIN_FILES, TEST_FILE] if not (folder / n).is_file()]
    if missing:
        raise SystemExit(
            f"--data {folder}: missing {', '.join(missing)}; point --data at an extracted "
            "cifar-10-batches-py folder (the CIFAR-10 python version), or use --synthetic N"
        )
    parts = [read_batch(folder / name) for name in TRAIN_FILES]
    x_test, y_test = read_batch(folder / TEST_FILE)
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    return x_train, y_train, x_test, y_test


def synthetic(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` generated 32x32 RGB images: noise around a per-class colour, so it is learnable."""
    colours = np.random.default_rng(1234).integers(40, 216, size=(10, 3, 1, 1))  # one per class
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=count)
    noise = rng.normal(0, 40, size=(count, 3, 32, 32))
    images = np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x 3 x 32 x 32 to normalized float32."""
    return (torch.from_numpy(images).float() / 255 - MEAN) / STD


def augment(batch: torch.Tensor) -> torch.Tensor:
    """The usual CIFAR augmentation: random 32x32 crop of the 4-padded image, random flip."""
    n = batch.shape[0]
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, n))
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
    out = padded[
        torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols
    ]
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(3)
    return out
