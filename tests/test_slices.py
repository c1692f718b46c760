"""Partial pulls (dpwa_core/slices.py): slice bounds, the wire, the schedule, and real nodes.

The real-node tests pull over TCP on loopback (``transport: tcp``) and assert the mechanism:
which elements each blend touched, which bytes crossed, what a hand-written client gets, and
that an answer holding another slice than the one asked for is refused.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpwa_core import ConfigError, Node, load_config
from dpwa_core.errors import ProtocolError
from dpwa_core.layout import Layout
from dpwa_core.slices import AUTO_MAX, HIGH, LOW, TARGET, SliceSchedule
from dpwa_core.wire import (
    HEADER,
    MAX_SLICES,
    DType,
    MessageType,
    decode_header,
    encode_header,
    recv_exact,
    slice_bounds,
)
from dpwa_core.wire_dtype import decode_into

Cluster = Callable[..., dict[str, Any]]


@given(st.integers(1, 10_000), st.data())
def test_slices_cover_the_model_once_in_order(size: int, data: st.DataObject) -> None:
    slices = data.draw(st.integers(1, min(size, MAX_SLICES)))
    spans = [slice_bounds(size, slices, i) for i in range(slices)]
    assert spans[0][0] == 0 and spans[-1][1] == size
    for (_, stop), (start, end) in zip(spans, spans[1:], strict=False):
        assert stop == start and start < end
    lengths = [stop - start for start, stop in spans]
    assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize(
    ("size", "slices", "index"),
    [(10, 0, 0), (10, 11, 0), (100, MAX_SLICES + 1, 0), (10, 2, 2), (10, 2, -1)],
)
def test_a_slice_that_does_not_exist_is_refused(size: int, slices: int, index: int) -> None:
    with pytest.raises(ValueError, match="is not a slice"):
        slice_bounds(size, slices, index)


def test_headers_name_their_slice_and_params_hold_exactly_its_bytes() -> None:
    start, stop = slice_bounds(1000, 3, 1)
    for dtype in DType:
        data = encode_header(
            MessageType.PARAMS,
            size=1000,
            length=dtype.payload_bytes(stop - start),
            dtype=dtype,
            slices=3,
            slice_index=1,
        )
        header = decode_header(data)
        assert (header.slices, header.slice_index, header.span) == (3, 1, (start, stop))
    pull = decode_header(encode_header(MessageType.PULL, size=1000, slices=4, slice_index=3))
    assert pull.span == (750, 1000)
    assert decode_header(encode_header(MessageType.PULL, size=1000)).span == (0, 1000)
    bad = [
        (dict(kind=MessageType.PARAMS, length=4000, slices=3, slice_index=1), "does not hold"),
        (dict(kind=MessageType.PULL, slices=0, slice_index=1), "whole-model message"),
        (dict(kind=MessageType.PULL, slices=4, slice_index=4), "is not a slice"),
        (dict(kind=MessageType.PULL, slices=MAX_SLICES + 1), "is not a slice"),
        (dict(kind=MessageType.NOT_READY, slices=2), "NOT_READY cannot be about a slice"),
        (dict(kind=MessageType.BUSY, slices=2), "BUSY cannot be about a slice"),
    ]
    for fields, message in bad:
        data = encode_header(size=1000, **fields)  # type: ignore[arg-type]
        with pytest.raises(ProtocolError, match=message):
            decode_header(data)


def test_auto_rescales_the_count_so_that_a_pull_takes_about_target_steps() -> None:
    schedule = SliceSchedule("auto", 10_000)
    assert (schedule.slices, schedule.index) == (1, 0)
    for step in range(11):  # a step every 0.1 s
        schedule.stepped(100.0 + 0.1 * step)
    assert schedule.step_s == pytest.approx(0.1)
    schedule.landed(False, True, elapsed=6 * TARGET * 0.1)  # a whole pull took 6 x TARGET
    assert schedule.slices == 6
    schedule.landed(True, True, elapsed=(LOW + HIGH) / 2 * 0.1)  # in between: kept
    assert schedule.slices == 6
    schedule.landed(True, True, elapsed=100.0)  # far too slow: as many as allowed, no more
    assert schedule.slices == AUTO_MAX
    schedule.landed(True, True, elapsed=LOW / 2 * 0.1)  # fast: fewer
    assert schedule.slices == round(AUTO_MAX * LOW / 2 / TARGET)
    schedule.landed(True, True, elapsed=0.001)
    assert schedule.slices == 1
    schedule.landed(False, True, elapsed=0.001)  # whole and fast: stays whole
    assert schedule.slices == 1
    assert schedule.sliced == 4
    schedule.landed(False, False, elapsed=10.0)  # a shared-memory pull says nothing of links
    assert schedule.slices == 1


def test_a_fixed_count_cycles_through_its_slices_and_never_changes() -> None:
    schedule = SliceSchedule(3, 10_000)
    schedule.stepped(0.0)
    schedule.stepped(0.1)
    seen = []
    for _ in range(7):
        seen.append(schedule.index)
        schedule.landed(True, True, elapsed=5.0)
    assert seen == [0, 1, 2, 0, 1, 2, 0] and schedule.slices == 3
    schedule.landed(False, False, elapsed=5.0)  # a whole pull (shared memory): same slice next
    assert schedule.index == 1
    assert SliceSchedule(8, 5).slices == 5  # at most one slice per element
    assert SliceSchedule("auto", 1).slices == 1


def test_config_default_and_range(make_cluster: Cluster) -> None:
    assert load_config(make_cluster(2)).pull_slices == 1
    assert load_config(make_cluster(2, pull_slices=8)).pull_slices == 8
    assert load_config(make_cluster(2, pull_slices="auto")).pull_slices == "auto"
    for bad in (0, MAX_SLICES + 1, 2.5, "many", True, None):
        with pytest.raises(ConfigError, match="pull_slices"):
            load_config(make_cluster(2, pull_slices=bad))


def _blends(config: dict[str, Any], count: int) -> tuple[list[tuple[int, int]], Node, Node]:
    """w1 (zeros) blends w2 (always ones) ``count`` times; the range each blend changed."""
    size = 1000
    a, b = Node(config, "w1"), Node(config, "w2")
    mine, theirs = np.zeros(size, np.float32), np.ones(size, np.float32)
    changed = []
    deadline = time.monotonic() + 30
    try:
        while len(changed) < count and time.monotonic() < deadline:
            b.publish(theirs, 1.0)  # w2 serves ones and never blends
            before = mine.copy()
            if a.step(mine, 1.0) is not None:
                moved = np.flatnonzero(mine != before)
                changed.append((int(moved.min()), int(moved.max()) + 1) if moved.size else (0, 0))
            time.sleep(0.002)
    finally:
        a.close()
        b.close()
    return changed, a, b


def test_each_pull_brings_and_blends_the_next_slice_only(make_cluster: Cluster) -> None:
    config = make_cluster(
        2, transport="tcp", pull_slices=4, drift_correction=0, wire_dtype="float32"
    )
    changed, a, _ = _blends(config, 6)
    assert changed == [(0, 250), (250, 500), (500, 750), (750, 1000), (0, 250), (250, 500)]
    stats = a.stats()
    assert stats["pulls_sliced"] == stats["pulls_ok"] == 6 and stats["slices"] == 4
    # A quarter of the model each (the next pull may have landed already, not yet blended).
    pulls, rest = divmod(stats["bytes_in"], HEADER.size + 250 * 4)
    assert rest == 0 and pulls in (6, 7), stats["bytes_in"]


def test_a_co_located_peer_is_pulled_whole_through_shared_memory(make_cluster: Cluster) -> None:
    changed, a, _ = _blends(make_cluster(2, pull_slices=4, drift_correction=0), 3)
    assert changed == [(0, 1000)] * 3
    stats = a.stats()  # the next pull may have landed already
    assert stats["pulls_shm"] in (3, 4) and stats["pulls_sliced"] == 0 and stats["slices"] == 4


def test_a_slice_moves_the_clock_by_its_share(make_cluster: Cluster) -> None:
    config = make_cluster(2, transport="tcp", pull_slices=4, drift_correction=0)
    a, b = Node(config, "w1"), Node(config, "w2")
    try:
        b.publish(np.ones(100, np.float32), 1.0, samples=150)  # b's clock: 150
        mine = np.zeros(100, np.float32)
        a.publish(mine, 1.0, samples=100)  # a's clock: 100
        result = None
        for _ in range(500):
            result = a.step(mine, 1.0, samples=0)
            if result is not None:
                break
            time.sleep(0.01)
        assert result is not None and result.factor == 0.5
        # ours + f * share * (theirs - ours), with share = 1/4: 100 + 0.125 * 50
        assert a.clock == pytest.approx(100 + 0.125 * 50)
    finally:
        a.close()
        b.close()


def _raw_pull(address: tuple[str, int], request: bytes) -> tuple[Any, socket.socket]:
    conn = socket.create_connection(address, timeout=5)
    conn.sendall(request)
    head = memoryview(bytearray(HEADER.size))
    recv_exact(conn, head, time.monotonic() + 5)
    return decode_header(head), conn


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_server_answers_a_slice_with_that_slice(make_cluster: Cluster, dtype: str) -> None:
    node = Node(make_cluster(1, transport="tcp", wire_dtype=dtype), "w1")
    values = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    node.publish(values, 1.0)
    layout = Layout.flat(1000)
    try:
        request = encode_header(
            MessageType.PULL, size=1000, shape_hash=layout.shape_hash, slices=3, slice_index=2
        )
        header, conn = _raw_pull(node.address, request)
        with conn:
            start, stop = slice_bounds(1000, 3, 2)
            assert header.type is MessageType.PARAMS and header.span == (start, stop)
            got = np.empty(stop - start, np.float32)
            scratch = np.empty(1 << 20, np.uint8)
            decode_into(
                lambda view: recv_exact(conn, view, time.monotonic() + 5),
                header.dtype,
                got,
                scratch,
            )
        part = values[start:stop]
        tolerance = 0.0 if dtype == "float32" else float(np.abs(part).max()) / 250
        assert np.abs(got - part).max() <= tolerance
    finally:
        node.close()


def test_a_pull_for_a_slice_that_does_not_exist_closes_the_connection(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    node = Node(make_cluster(1, transport="tcp"), "w1")
    node.publish(np.ones(10, np.float32), 1.0)
    try:
        request = bytearray(encode_header(MessageType.PULL, size=10, slices=2, slice_index=1))
        request[10] = 7  # slice 7 of 2
        with caplog.at_level(logging.WARNING, logger="dpwa"):
            with socket.create_connection(node.address, timeout=5) as conn:
                conn.sendall(bytes(request))
                assert conn.recv(100) == b""  # closed, no answer
            deadline = time.monotonic() + 5
            while "is not a slice" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.02)
        assert "slice 7 of 2 is not a slice of a 10-element model" in caplog.text
        assert node.stats()["rejected"] == 1
    finally:
        node.close()


def test_an_answer_with_another_slice_than_asked_is_refused(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile peer answers slice 1 whatever it was asked: the pull fails, nothing blends."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = make_cluster(2, transport="tcp", pull_slices=2, drift_correction=0)
    config["nodes"][1]["port"] = port
    layout = Layout.flat(10)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while True:
                head = memoryview(bytearray(HEADER.size))
                try:
                    recv_exact(conn, head, time.monotonic() + 10)
                except (ConnectionError, TimeoutError, OSError):
                    return
                answer = encode_header(
                    MessageType.PARAMS,
                    size=10,
                    shape_hash=layout.shape_hash,
                    length=5 * 4,
                    slices=2,
                    slice_index=1,
                )
                conn.sendall(answer + np.full(5, 9.0, np.float32).tobytes())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    node = Node(config, "w1")
    mine = np.zeros(10, np.float32)
    try:
        with caplog.at_level(logging.WARNING, logger="dpwa"):
            deadline = time.monotonic() + 10
            while node.stats()["pulls_failed"] == 0 and time.monotonic() < deadline:
                node.step(mine, 1.0)
                time.sleep(0.01)
        assert node.stats()["pulls_failed"] >= 1 and node.stats()["pulls_ok"] == 0
        assert "answer holds elements 5:10, asked for 0:5" in caplog.text
        assert np.all(mine == 0.0)
    finally:
        node.close()
        listener.close()


def test_gossip_step_on_a_torch_model_blends_one_slice_at_a_time(make_cluster: Cluster) -> None:
    """The adapter path (``connect``): a slice pull changes that slice of the model only."""
    torch = pytest.importorskip("torch")
    import dpwa_core

    config = make_cluster(2, transport="tcp", pull_slices=2, drift_correction=0)
    mine, theirs = torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)  # 110 parameters
    with torch.no_grad():
        for p in mine.parameters():
            p.zero_()
        for p in theirs.parameters():
            p.fill_(1.0)
    with dpwa_core.connect(mine, config, "w1") as a, dpwa_core.connect(theirs, config, "w2") as b:
        b.node.publish(b.adapter.to_flat(theirs), 1.0)  # w2 serves ones and never blends
        changed = []
        deadline = time.monotonic() + 30
        while len(changed) < 3 and time.monotonic() < deadline:
            before = a.adapter.to_flat(mine).copy()
            last = a.last
            a.step(1.0)
            if a.last is not last:
                moved = np.flatnonzero(a.adapter.to_flat(mine) != before)
                changed.append((int(moved.min()), int(moved.max()) + 1))
            time.sleep(0.005)
    assert changed == [(0, 55), (55, 110), (0, 55)], changed
