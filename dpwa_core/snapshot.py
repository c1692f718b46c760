"""The published snapshot: double-buffered parameters, clock and loss.

The training thread writes the next snapshot into the buffer that is *not* published, then flips
one index under a lock. A server thread pins the published buffer for the duration of a send, so
a peer never receives a torn snapshot (half old, half new), and publishing never waits for a send:
if the spare buffer is still pinned by a slow send of an older snapshot, the publish is skipped
and the previous snapshot stays visible until the next one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

__all__ = ["Snapshot", "SnapshotBuffer"]


class Snapshot(NamedTuple):
    """A pinned, consistent view of the published state."""

    params: np.ndarray
    clock: float
    loss: float


class SnapshotBuffer:
    """Two float32 buffers of ``size`` elements, one published, one being written.

    Args:
        size: number of float32 elements per snapshot.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._buffers = (np.empty(size, np.float32), np.empty(size, np.float32))
        self._pins = [0, 0]
        self._published = -1  # index into _buffers; -1 until the first publish
        self._state = (0.0, 0.0)
        self._lock = threading.Lock()
        self._writer = threading.Lock()  # one publisher at a time
        self.skipped = 0
        """Publishes skipped because the spare buffer was still being sent."""

    def publish(self, fill: Callable[[np.ndarray], object], clock: float, loss: float) -> bool:
        """Write a new snapshot with ``fill(buffer)`` and make it the published one.

        Args:
            fill: writes all ``size`` elements of the buffer it is given.
            clock: the clock that goes with these parameters.
            loss: the loss that goes with these parameters.

        Returns:
            False when the spare buffer was pinned by a send in flight and nothing was published.
        """
        with self._writer:
            with self._lock:
                spare = 1 - self._published if self._published >= 0 else 0
                if self._pins[spare]:
                    self.skipped += 1
                    return False
            # Readers only ever pin the published index, so nobody touches `spare` meanwhile.
            fill(self._buffers[spare])
            with self._lock:
                self._published = spare
                self._state = (clock, loss)
            return True

    @property
    def ready(self) -> bool:
        """Whether a snapshot has been published."""
        return self._published >= 0

    @contextmanager
    def pinned(self) -> Iterator[Snapshot | None]:
        """Pin the published snapshot for as long as the ``with`` block runs.

        Yields:
            The snapshot, or None when nothing has been published yet.
        """
        with self._lock:
            index = self._published
            if index < 0:
                snapshot = None
            else:
                self._pins[index] += 1
                clock, loss = self._state
                snapshot = Snapshot(self._buffers[index], clock, loss)
        try:
            yield snapshot
        finally:
            if index >= 0:
                with self._lock:
                    self._pins[index] -= 1
