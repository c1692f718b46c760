"""The demo's data: scikit-learn's digits, standardized, split once, and sharded per node.

The digits data set (1797 images of 8x8 pixels, 10 classes) ships inside scikit-learn, so nothing
is downloaded. The split is fixed (seed 0): 30% of the images are the test set every node is
scored on; the rest is cut into one training shard per node.

Two ways to shard:

- ``labels`` (the default): the training images are sorted by digit and cut into contiguous
  pieces, so each node sees only a few digits (about ``10 / nodes`` of them), like phones whose
  users write different things. Alone, a node can never recognise the digits it has not seen;
  with gossip it learns them from its peers' models. This makes the value of gossip plain.
- ``iid``: a random, even split. Every node sees every digit, so gossip mainly adds data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SPLITS", "DemoData", "load_digits_data"]

SPLITS = ("labels", "iid")
"""The ways to shard the training set: by label (non-iid) or at random."""

TEST_FRACTION = 0.3
"""Share of the images held out as the common test set."""


@dataclass(frozen=True)
class DemoData:
    """Train and test arrays plus each node's shard (indices into the training set)."""

    x_train: np.ndarray
    """float32 ``(n, 64)``, standardized with the training set's mean and deviation."""
    y_train: np.ndarray
    """int64 ``(n,)`` labels 0..9."""
    x_test: np.ndarray
    """float32 ``(m, 64)``, standardized like the training set."""
    y_test: np.ndarray
    """int64 ``(m,)`` labels 0..9."""
    shards: tuple[np.ndarray, ...]
    """One int64 index array per node, into ``x_train``."""

    @property
    def inputs(self) -> int:
        """Features per sample (64)."""
        return int(self.x_train.shape[1])

    @property
    def classes(self) -> int:
        """Number of classes (10)."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return node ``index``'s training images and labels."""
        rows = self.shards[index]
        return self.x_train[rows], self.y_train[rows]

    def save(self, path: Path) -> None:
        """Write everything to one ``.npz`` file that :meth:`load` reads back."""
        arrays = {
            "x_train": self.x_train,
            "y_train": self.y_train,
            "x_test": self.x_test,
            "y_test": self.y_test,
        }
        arrays.update({f"shard_{i}": rows for i, rows in enumerate(self.shards)})
        np.savez(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> DemoData:
        """Read a file written by :meth:`save` (plain arrays; no pickled objects)."""
        with np.load(path, allow_pickle=False) as f:
            count = sum(1 for key in f.files if key.startswith("shard_"))
            return cls(
                x_train=f["x_train"],
                y_train=f["y_train"],
                x_test=f["x_test"],
                y_test=f["y_test"],
                shards=tuple(f[f"shard_{i}"] for i in range(count)),
            )


def load_digits_data(nodes: int, split: str = "labels") -> DemoData:
    """Load the digits, split off the test set, and shard the rest over ``nodes`` nodes.

    Args:
        nodes: how many shards to cut (at least 1, at most the number of training images).
        split: ``"labels"`` (each node sees a few digits) or ``"iid"`` (random shards).

    Returns:
        The standardized arrays and the shards; the same arguments always give the same data.

    Raises:
        ValueError: ``split`` is unknown or ``nodes`` is out of range.
    """
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]  # used here only

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    n_test = int(round(TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    if not 1 <= nodes <= len(train):
        raise ValueError(f"nodes must be between 1 and {len(train)}, got {nodes}")
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0  # pixels that are always blank stay 0
    x = ((x - mean) / std).astype(np.float32)
    y = y.astype(np.int64)
    x_train, y_train = x[train], y[train]
    if split == "labels":
        ranked = np.argsort(y_train, kind="stable")
    else:
        ranked = rng.permutation(len(y_train))
    shards = tuple(part.astype(np.int64) for part in np.array_split(ranked, nodes))
    return DemoData(x_train, y_train, x[test], y[test], shards)
