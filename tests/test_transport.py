"""Transports and wire dtypes between real nodes on loopback: shared memory, TCP, fp16/bf16."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import cluster

from dpwa_core import Node, shm
from dpwa_core.puller import RECEIVE_CHUNK
from dpwa_core.shm import SharedSegment
from dpwa_core.wire_dtype import WireDType

needs_shm = pytest.mark.skipif(not shm.available(), reason="needs POSIX shared memory files")
SIZE = 50_000


def segments_of(pid: int) -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if shm.valid_name(n) and n.split("-")[1] == str(pid)}


def pull(a: Node, b: Node, value_a: float, value_b: float) -> Any:
    """b publishes value_b; a publishes value_a and pulls; returns a's PullResult."""
    b.update_send(np.full(SIZE, value_b, np.float32), 1.0)
    deadline = time.monotonic() + 30
    while True:
        a.update_send(np.full(SIZE, value_a, np.float32), 1.0)
        result = a.update_wait(1.0)
        if result is not None:
            return result
        assert time.monotonic() < deadline, a.stats()
        time.sleep(0.01)


@needs_shm
def test_co_located_nodes_pull_through_shared_memory() -> None:
    config = cluster(2)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        result = pull(a, b, 1.0, 2.0)
        assert np.all(result.params == 2.0)
        stats, served = a.stats(), b.stats()
        assert stats["pulls_shm"] == stats["pulls_ok"] >= 1
        assert served["served_shm"] >= 1
        assert stats["bytes_in"] < 1000  # only the header and the slot's address crossed TCP
        assert stats["peers"]["w2"]["seconds"] is None  # no link: peer choice does not time it
        assert len(segments_of(os.getpid())) == 2
    assert not segments_of(os.getpid())  # closing removes both segments


def test_tcp_transport_makes_no_segment_and_sends_the_parameters() -> None:
    config = cluster(2, transport="tcp")
    before = segments_of(os.getpid()) if shm.available() else set()
    with Node(config, "w1") as a, Node(config, "w2") as b:
        result = pull(a, b, 1.0, 2.0)
        assert np.all(result.params == 2.0)
        assert a.stats()["pulls_shm"] == 0
        assert a.stats()["bytes_in"] >= 4 * SIZE
        if shm.available():
            assert segments_of(os.getpid()) == before


@needs_shm
def test_a_torn_copy_is_asked_again_over_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SharedSegment, "read", lambda self, *args, **kwargs: None)
    config = cluster(2)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        result = pull(a, b, 1.0, 2.0)
        assert np.all(result.params == 2.0)
        assert a.stats()["pulls_shm"] == 0 and a.stats()["bytes_in"] >= 4 * SIZE


@needs_shm
def test_segment_not_on_this_host(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def elsewhere(*args: object, **kwargs: object) -> SharedSegment:
        raise FileNotFoundError("no such segment")

    monkeypatch.setattr(SharedSegment, "attach", elsewhere)
    caplog.set_level(logging.INFO, logger="dpwa")
    config = cluster(2)
    with Node(config, "w1") as a, Node(config, "w2") as b:  # auto: falls back to TCP, for good
        for _ in range(3):
            result = pull(a, b, 1.0, 2.0)
            assert np.all(result.params == 2.0)
        assert a.stats()["pulls_shm"] == 0
    assert sum("pulling w2 over TCP" in r.getMessage() for r in caplog.records) == 1

    caplog.clear()
    config = cluster(2, transport="shm", timeout_ms=500)
    with Node(config, "w1") as a, Node(config, "w2") as b:  # shm only: the pull fails, clearly
        b.update_send(np.full(SIZE, 2.0, np.float32), 1.0)
        for _ in range(3):
            a.update_send(np.full(SIZE, 1.0, np.float32), 1.0)
            assert a.update_wait(1.0) is None
        assert a.stats()["pulls_ok"] == 0
    assert "transport is 'shm'" in caplog.text


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_nonfinite_parameters_are_refused_on_every_path(transport: str) -> None:
    config = cluster(2, transport=transport, timeout_ms=1000)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        size = 3 * RECEIVE_CHUNK + 5  # received and checked in four chunks
        poisoned = np.full(size, 2.0, np.float32)
        poisoned[size - 1] = np.inf  # in the last one
        b.update_send(poisoned, 1.0)
        for _ in range(3):
            a.update_send(np.ones(size, np.float32), 1.0)
            assert a.update_wait(1.0) is None
        assert a.stats()["rejected_nonfinite"] == 3


@pytest.mark.parametrize(
    ("sender", "tolerance"),
    [("float16", 2**-11), ("bfloat16", 2**-8), ("float32", 0.0), ("int8", None)],
)
def test_peers_with_different_wire_dtypes_talk(sender: str, tolerance: float | None) -> None:
    base = cluster(2, transport="tcp")
    receiver_config = {**base, "wire_dtype": "bfloat16" if sender != "bfloat16" else "float16"}
    sender_config = {**base, "wire_dtype": sender}
    values = np.random.default_rng(0).standard_normal(SIZE).astype(np.float32)
    with Node(receiver_config, "w1") as a, Node(sender_config, "w2") as b:
        b.update_send(values, 1.0)
        result = None
        deadline = time.monotonic() + 30
        while result is None:
            a.update_send(np.zeros(SIZE, np.float32), 1.0)
            result = a.update_wait(1.0)
            assert time.monotonic() < deadline
        error = np.abs(result.params.astype(np.float64) - values)
        if tolerance is None:  # int8: relative to the largest value of each 256-value block
            blocks = np.abs(values[: SIZE // 256 * 256]).reshape(-1, 256).max(axis=1)
            bound = np.repeat(blocks, 256) / 254 * (1 + 2**-22)
            assert np.all(error[: bound.size] <= bound)
        else:
            assert np.all(error <= tolerance * np.abs(values) + 2**-24)
        payload = WireDType[sender.upper()].payload_bytes(SIZE)
        assert a.stats()["bytes_in"] >= payload
        assert b.stats()["bytes_out"] < payload + SIZE / 4  # really sent narrower


_NODE = """
import sys, time
import numpy as np
from dpwa_core import Node
node = Node(sys.argv[1], "w1")
node.update_send(np.ones(1000, np.float32), 1.0)
print("published", flush=True)
time.sleep(60)
"""


@needs_shm
def test_killed_node_leaves_no_segment(tmp_path: Any) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster(2)))
    child = subprocess.Popen(
        [sys.executable, "-c", _NODE, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "published"
    assert len(segments_of(child.pid)) == 1
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    deadline = time.monotonic() + 10
    while segments_of(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not segments_of(child.pid)


def test_tcp_pulls_are_timed_for_peer_choice() -> None:
    config = cluster(2, transport="tcp")
    with Node(config, "w1") as a, Node(config, "w2") as b:
        pull(a, b, 1.0, 2.0)
        seconds = a.stats()["peers"]["w2"]["seconds"]
        assert seconds is not None and 0 < seconds < 30
