"""The double-buffered snapshot: never torn, and publishing never waits for a reader."""

from __future__ import annotations

import threading
import time

import numpy as np

from dpwa_core.snapshot import FRESH_STEPS, SnapshotBuffer


def test_nothing_published_yields_none() -> None:
    buf = SnapshotBuffer(4)
    assert not buf.ready
    with buf.pinned() as snap:
        assert snap is None


def test_publish_copies_and_carries_state() -> None:
    buf = SnapshotBuffer(3)
    params = np.array([1, 2, 3], np.float32)
    assert buf.publish(lambda out: np.copyto(out, params), clock=7, loss=0.5)
    params[:] = 0  # the caller may change its array right after publishing
    with buf.pinned() as snap:
        assert snap is not None
        np.testing.assert_array_equal(snap.params, [1, 2, 3])
        assert (snap.clock, snap.loss) == (7, 0.5)


def test_publish_skips_instead_of_waiting_for_a_pinned_spare() -> None:
    buf = SnapshotBuffer(2)
    buf.publish(lambda out: out.fill(1), 1, 0)
    with buf.pinned() as first:
        assert first is not None
        assert buf.publish(lambda out: out.fill(2), 2, 0)  # writes the other buffer
        with buf.pinned() as second:
            assert second is not None
            # Both buffers are pinned now: the next publish must skip, not block or overwrite.
            assert not buf.publish(lambda out: out.fill(3), 3, 0)
            assert buf.skipped == 1
            np.testing.assert_array_equal(first.params, [1, 1])
            np.testing.assert_array_equal(second.params, [2, 2])
    assert buf.publish(lambda out: out.fill(4), 4, 0)
    with buf.pinned() as snap:
        assert snap is not None and snap.clock == 4
        np.testing.assert_array_equal(snap.params, [4, 4])


def test_readers_never_see_a_torn_snapshot() -> None:
    buf = SnapshotBuffer(200_000)
    stop = threading.Event()
    torn: list[tuple[float, float]] = []
    reads = [0]

    def writer() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            buf.publish(lambda out, k=k: out.fill(k), clock=k, loss=0)

    def reader() -> None:
        while not stop.is_set():
            with buf.pinned() as snap:
                if snap is None:
                    continue
                lo, hi = float(snap.params.min()), float(snap.params.max())
                if lo != hi or lo != snap.clock:
                    torn.append((lo, hi))
                reads[0] += 1

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(2)
    ]
    for t in threads:
        t.start()
    threading.Event().wait(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert reads[0] > 10
    assert torn == []


def test_a_lazy_snapshot_one_step_old_is_served_at_once_an_older_one_waits() -> None:
    buffer = SnapshotBuffer(4)
    buffer.lazy = True
    buffer.tick()
    buffer.publish(lambda out: out.fill(1.0), 1.0, 0.5)
    for _ in range(FRESH_STEPS):
        buffer.tick()  # steps that copied nothing: nobody asked
        began = time.monotonic()
        buffer.want(wait=5.0)
        assert time.monotonic() - began < 1.0  # fresh enough: no wait for the next copy
    buffer.tick()  # one step more: now it is stale, and the next copy is awaited
    copier = threading.Timer(0.3, lambda: buffer.publish(lambda out: out.fill(2.0), 2.0, 0.5))
    began = time.monotonic()
    copier.start()
    buffer.want(wait=5.0)
    assert 0.25 <= time.monotonic() - began < 4.0
    with buffer.pinned() as snapshot:
        assert snapshot is not None and snapshot.params[0] == 2.0


def test_a_fresh_lazy_snapshot_is_sent_without_asking_the_trainer_for_a_copy() -> None:
    buffer = SnapshotBuffer(4)
    buffer.lazy = True
    buffer.tick()
    assert buffer.publish(lambda out: out.fill(1.0), 1.0, 0.5)
    assert not buffer.wanted
    buffer.want(wait=5.0)  # fresh: sent as it is
    assert not buffer.wanted  # so the trainer copies nothing for it
    for _ in range(FRESH_STEPS + 1):
        buffer.tick()
    copier = threading.Timer(0.2, lambda: buffer.publish(lambda out: out.fill(2.0), 2.0, 0.5))
    copier.start()
    buffer.want(wait=5.0)  # stale: asks for a copy and waits for it
    copier.join()
    with buffer.pinned() as snapshot:
        assert snapshot is not None and snapshot.params[0] == 2.0
