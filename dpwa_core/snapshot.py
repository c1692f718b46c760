"""The published snapshot: double-buffered parameters, clock and loss.

The training thread writes the next snapshot into the buffer that is *not* published, then flips
one index under a lock. A server thread pins the published buffer for the duration of a send, so
a peer never receives a torn snapshot (half old, half new), and publishing never waits for a send:
if the spare buffer is still pinned by a slow send of an older snapshot, the publish is skipped
and the previous snapshot stays visible until the next one.

The two buffers are private memory, or the two slots of a :class:`~dpwa_core.shm.SharedSegment`
when the node also serves co-located peers through shared memory. Then each publish also moves
the slot's sequence counter (odd while writing, even after), so a reader that copies a slot
without pinning it can tell a consistent copy from a torn one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from dpwa_core.shm import SharedSegment

__all__ = ["FRESH_STEPS", "Snapshot", "SnapshotBuffer"]

FRESH_STEPS = 1
"""A lazily published snapshot at most this many training steps old is served at once."""


class Snapshot(NamedTuple):
    """A pinned, consistent view of the published state."""

    params: np.ndarray
    clock: float
    loss: float
    slot: int = 0
    """Which of the two buffers (the shared-memory slot, when shared)."""
    sequence: int = 0
    """The slot's sequence counter at publish time (shared memory only; 0 otherwise)."""


class SnapshotBuffer:
    """Two float32 buffers of ``size`` elements, one published, one being written.

    Args:
        size: number of float32 elements per snapshot.
        segment: a shared-memory segment of ``size`` elements per slot to hold the two buffers,
            or None for private memory. The buffer then owns it and removes it on :meth:`close`.
    """

    def __init__(self, size: int, segment: SharedSegment | None = None) -> None:
        self.size = size
        self.segment = segment
        """The shared-memory segment holding the buffers, or None."""
        if segment is None:
            self._buffers = (np.empty(size, np.float32), np.empty(size, np.float32))
        else:
            if segment.size != size:
                raise ValueError(f"segment holds {segment.size} elements per slot, need {size}")
            self._buffers = (segment.slot(0), segment.slot(1))
        self._pins = [0, 0]
        self._published = -1  # index into _buffers; -1 until the first publish
        self._state = (0.0, 0.0, 0)  # clock, loss, sequence
        self._lock = threading.Lock()
        self._fresh = threading.Condition(self._lock)  # notified on every publish
        self._writer = threading.Lock()  # one publisher at a time
        self.skipped = 0
        """Publishes skipped because the spare buffer was still being sent."""
        self.published = 0
        """Snapshots written (each one model-sized copy)."""
        self._wanted = True  # nothing published yet: the first publish is always wanted
        self._ticks = 0  # training steps the trainer reported (tick)
        self._published_tick = -1  # the tick of the published snapshot
        self.lazy = False
        """Whether the trainer publishes only when :attr:`wanted` (set by the node)."""

    def want(self, wait: float = 0.0) -> None:
        """Note that a peer asked for the snapshot (the server calls this on every PULL).

        A trainer that publishes lazily (:attr:`lazy`, :attr:`wanted`) then copies its model at
        its next step, so a model nobody pulls is never copied.

        Args:
            wait: with a lazy trainer, wait up to this many seconds for that next publish, so
                the answer is the model as it is now, not as it was at the previous request;
                unless the published snapshot is at most :data:`FRESH_STEPS` training steps
                old (:meth:`tick`), which is fresh enough: waiting for a newer one would cost
                about as much time as it gains. That one is sent as it is, and no copy is
                asked for: on a fast link peers ask every step or two, and a copy for each
                request would cost the trainer a model copy per answer.
        """
        with self._fresh:
            fresh = self._published >= 0 and self._ticks - self._published_tick <= FRESH_STEPS
            if self.lazy and wait > 0 and fresh:
                return  # sent as it is: no copy is asked for
            self._wanted = True
            if not self.lazy or wait <= 0 or self._published < 0:
                return
            target = self.published + 1
            self._fresh.wait_for(lambda: self.published >= target, wait)

    def tick(self) -> None:
        """Note one training step (the node calls this on every publish, copied or not)."""
        with self._lock:
            self._ticks += 1

    @property
    def wanted(self) -> bool:
        """Whether a peer asked since the last publish (or nothing was published yet)."""
        return self._wanted

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
            self._wanted = False  # cleared first: a request during the copy asks again
            segment = self.segment
            if segment is None:
                fill(self._buffers[spare])
                sequence = 0
            else:
                segment.begin_write(spare)
                try:
                    fill(self._buffers[spare])
                finally:  # even a failed fill leaves the counter even: readers then see a
                    segment.end_write(spare, clock, loss)  # new sequence, never the old one
                sequence = segment.sequence(spare)
            with self._lock:
                self._published = spare
                self._published_tick = self._ticks
                self._state = (clock, loss, sequence)
                self.published += 1
                self._fresh.notify_all()
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
                clock, loss, sequence = self._state
                snapshot = Snapshot(self._buffers[index], clock, loss, index, sequence)
        try:
            yield snapshot
        finally:
            if index >= 0:
                with self._lock:
                    self._pins[index] -= 1

    def close(self, timeout: float = 1.0) -> None:
        """Stop publishing and remove a shared-memory segment.

        Waits up to ``timeout`` seconds for sends in flight to unpin their buffer (close the
        server first, so they fail fast).
        """
        segment, self.segment = self.segment, None
        if segment is None:
            return
        deadline = time.monotonic() + timeout
        with self._writer:
            while True:
                with self._lock:
                    if not any(self._pins) or time.monotonic() >= deadline:
                        self._published = -1
                        self._buffers = (np.empty(0, np.float32), np.empty(0, np.float32))
                        break
                time.sleep(0.005)
        segment.close()
