"""Shared-memory segments: consistency, validation and cleanup (real /dev/shm, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dpwa_core import shm
from dpwa_core.shm import SharedSegment

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs POSIX shared memory files")


def _segments() -> set[str]:
    return {name for name in os.listdir(shm.SHM_DIR) if shm.valid_name(name)}


def _publish(segment: SharedSegment, index: int, value: float, clock: float) -> None:
    segment.begin_write(index)
    segment.slot(index)[:] = value
    segment.end_write(index, clock, value)


def test_reader_sees_what_the_writer_published() -> None:
    writer = SharedSegment.create(1000, 0xABC)
    try:
        _publish(writer, 1, 3.5, clock=42.0)
        reader = SharedSegment.attach(writer.name, writer.token, 1000, 0xABC)
        out = np.zeros(1000, np.float32)
        assert reader.read(1, writer.sequence(1), out) == (42.0, 3.5)
        assert np.all(out == 3.5)
        with pytest.raises(ValueError, match="does not map"):
            reader.slot(1)  # a reader copies with pread and never maps a peer's segment
        reader.close()
        assert reader.read(1, writer.sequence(1), out) is None  # closed: nothing to read
    finally:
        writer.close()
    assert writer.name not in _segments()


def test_a_rewritten_or_half_written_slot_is_refused() -> None:
    writer = SharedSegment.create(10, 1)
    try:
        reader = SharedSegment.attach(writer.name, writer.token, 10, 1)
        out = np.zeros(10, np.float32)
        _publish(writer, 0, 1.0, clock=1.0)
        announced = writer.sequence(0)
        _publish(writer, 0, 2.0, clock=2.0)  # rewritten after the announcement
        assert reader.read(0, announced, out) is None
        writer.begin_write(0)  # a write in progress: odd sequence
        assert writer.sequence(0) % 2 == 1
        assert reader.read(0, writer.sequence(0), out) is None
        reader.close()
    finally:
        writer.close()


def test_concurrent_writer_never_yields_a_torn_copy() -> None:
    size = 1 << 18
    writer = SharedSegment.create(size, 7)
    reader = SharedSegment.attach(writer.name, writer.token, size, 7)
    stop = threading.Event()

    def write() -> None:
        value = 0.0
        while not stop.is_set():
            value += 1.0
            _publish(writer, 0, value, clock=value)
            time.sleep(0.0005)  # a training step between publishes

    thread = threading.Thread(target=write)
    thread.start()
    out = np.empty(size, np.float32)
    consistent = torn = 0
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            sequence = writer.sequence(0)
            result = reader.read(0, sequence, out)
            if result is None:
                torn += 1
            else:
                consistent += 1
                assert np.all(out == out[0]) and out[0] == result[1]
    finally:
        stop.set()
        thread.join()
        reader.close()
        writer.close()
    assert consistent > 0, f"no consistent copy in 1 s ({torn} refused)"


def test_read_checks_each_chunk_as_it_lands_and_calls_copy_once() -> None:
    size = 3 * shm.CHUNK_BYTES // 4 + 5  # three full chunks and a short one
    writer = SharedSegment.create(size, 9)
    try:
        writer.begin_write(0)
        writer.slot(0)[:] = np.arange(size, dtype=np.float32)
        writer.end_write(0, 1.0, 2.0)
        reader = SharedSegment.attach(writer.name, writer.token, size, 9)
        out = np.zeros(size, np.float32)
        chunks: list[np.ndarray] = []
        copies: list[tuple[np.ndarray, np.ndarray]] = []
        result = reader.read(
            0,
            writer.sequence(0),
            out,
            lambda dst, src: copies.append((dst, src)),
            check=lambda chunk: chunks.append(chunk.copy()),
        )
        assert result == (1.0, 2.0)
        assert np.array_equal(out, np.arange(size, dtype=np.float32))
        assert [len(c) for c in chunks] == [shm.CHUNK_BYTES // 4] * 3 + [5]
        assert np.array_equal(np.concatenate(chunks), out)
        assert len(copies) == 1 and copies[0][0] is out and copies[0][1] is out
        with pytest.raises(ValueError, match="float32 array"):
            reader.read(0, writer.sequence(0), np.zeros(size, np.float64))
        reader.close()
    finally:
        writer.close()


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "dpwa-1-xyz",
        "dpwa-1-0123456789abcdef/..",
        "psm_123",
        "dpwa-1-0123456789ABCDEF",
    ],
)
def test_attach_refuses_names_that_are_not_segments(name: str) -> None:
    with pytest.raises(ValueError, match="not a dpwa shared-memory segment name"):
        SharedSegment.attach(name, bytes(16), 10, 0)


def test_attach_checks_token_size_and_layout() -> None:
    writer = SharedSegment.create(100, 5)
    try:
        with pytest.raises(ValueError, match="token differs"):
            SharedSegment.attach(writer.name, bytes(16), 100, 5)
        with pytest.raises(ValueError, match="layout hash"):
            SharedSegment.attach(writer.name, writer.token, 100, 6)
        with pytest.raises(ValueError, match="bytes, our layout needs"):
            SharedSegment.attach(writer.name, writer.token, 10_000, 5)
        with pytest.raises(FileNotFoundError):
            SharedSegment.attach("dpwa-1-0123456789abcdef", writer.token, 100, 5)
    finally:
        writer.close()


_CHILD = """
import sys, time
from dpwa_core.shm import SharedSegment
segment = SharedSegment.create(1000, 1)
print(segment.name, flush=True)
time.sleep(60)
"""


def test_segment_of_a_killed_process_is_removed() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert child.stdout is not None
    name = child.stdout.readline().strip()
    assert name in _segments()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    # Python's resource tracker removes it; remove_stale() is the backstop for a killed tracker.
    deadline = time.monotonic() + 10
    while name in _segments() and time.monotonic() < deadline:
        time.sleep(0.05)
    shm.remove_stale()
    assert name not in _segments()


def test_remove_stale_keeps_live_segments_and_removes_dead_ones() -> None:
    live = SharedSegment.create(10, 1)
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dead = f"dpwa-{dead_pid}-0123456789abcdef"
    path = os.path.join(shm.SHM_DIR, dead)
    with open(path, "wb") as handle:
        handle.write(b"x")
    try:
        removed = shm.remove_stale()
        assert dead in removed
        assert not os.path.exists(path)
        assert live.name in _segments()
    finally:
        live.close()
        if os.path.exists(path):
            os.unlink(path)
