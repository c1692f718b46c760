"""A server that is sending parameters says BUSY to IF_IDLE pulls, and pullers ask an idle peer.

Each server is kept busy by a raw client that asks for a 32 MB model and then stops reading, so
the server's send blocks part-way (more than loopback's socket buffers hold) until its idle
timeout; the nodes under test pull over TCP on real loopback sockets.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import pytest

from dpwa_core.layout import Layout
from dpwa_core.node import Node
from dpwa_core.wire import (
    FLAG_IF_IDLE,
    HEADER,
    MessageType,
    decode_header,
    encode_header,
    recv_exact,
)

Cluster = Callable[..., dict[str, Any]]
BIG = Layout.flat(8 * 1024 * 1024)  # 32 MB of float32: more than loopback buffers in flight
TIMEOUT_MS = 20_000  # a stalled answer holds its server for this long


def request(layout: Layout, flags: int = 0) -> bytes:
    return encode_header(
        MessageType.PULL, size=layout.size, shape_hash=layout.shape_hash, flags=flags
    )


def answer_type(sock: socket.socket) -> MessageType:
    header = bytearray(HEADER.size)
    recv_exact(sock, memoryview(header), time.monotonic() + 10)
    return decode_header(header).type


@contextmanager
def stalled_answer(address: tuple[str, int]) -> Iterator[None]:
    """Ask ``address`` for its parameters, read the start of the answer, then stop reading."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(request(BIG))
        assert answer_type(sock) is MessageType.PARAMS
        recv_exact(sock, memoryview(bytearray(1 << 20)), time.monotonic() + 10)
        yield


def publish(node: Node, value: float) -> None:
    node.update_send(np.full(BIG.size, value, np.float32), 1.0)


def test_a_sending_server_answers_if_idle_pulls_with_busy_and_others_with_params(
    make_cluster: Cluster,
) -> None:
    config = make_cluster(1, transport="tcp", timeout_ms=TIMEOUT_MS)
    with Node(config, "w1", layout=BIG) as node:
        publish(node, 1.0)
        with socket.create_connection(node.address, timeout=10) as idle_ask:
            idle_ask.sendall(request(BIG, FLAG_IF_IDLE))  # nothing is going out yet
            assert answer_type(idle_ask) is MessageType.PARAMS
        with stalled_answer(node.address):
            with socket.create_connection(node.address, timeout=10) as ask:
                ask.sendall(request(BIG, FLAG_IF_IDLE))
                assert answer_type(ask) is MessageType.BUSY
                ask.sendall(request(BIG, FLAG_IF_IDLE))  # the connection stays usable
                assert answer_type(ask) is MessageType.BUSY
            with socket.create_connection(node.address, timeout=10) as insist:
                insist.sendall(request(BIG))
                assert answer_type(insist) is MessageType.PARAMS
        assert node.stats()["served_busy"] == 2


def three_nodes(stack: ExitStack, make_cluster: Cluster) -> tuple[Node, Node, Node]:
    """w1 pulls over TCP; w2 and w3 publish 32 MB models and are up."""
    config = make_cluster(3, transport="tcp", timeout_ms=TIMEOUT_MS)
    w1, w2, w3 = (stack.enter_context(Node(config, f"w{i}", layout=BIG)) for i in (1, 2, 3))
    publish(w2, 2.0)
    publish(w3, 3.0)
    assert w1.wait_for_peers(timeout=10) == 2
    return w1, w2, w3


def test_pulls_go_to_the_idle_peer_while_another_is_busy(make_cluster: Cluster) -> None:
    with ExitStack() as stack:
        w1, w2, w3 = three_nodes(stack, make_cluster)
        stack.enter_context(stalled_answer(w2.address))
        mine = np.zeros(BIG.size, np.float32)
        sources = []
        for _ in range(40):  # w2 is drawn first half of the time; 2**-40 to never see it
            w1.update_send(mine, 1.0)
            result = w1.update_wait(1.0)
            assert result is not None
            sources.append(result.peer)
            if w1.stats()["pulls_busy"]:
                break
        assert set(sources) == {"w3"}
        assert w1.stats()["pulls_busy"] == 1 and w2.stats()["served_busy"] == 1
        assert w1.stats()["peers"]["w2"]["score"] == 1.0  # BUSY is no failure


def test_when_every_peer_is_busy_the_first_one_drawn_answers(make_cluster: Cluster) -> None:
    with ExitStack() as stack:
        w1, w2, w3 = three_nodes(stack, make_cluster)
        stack.enter_context(stalled_answer(w2.address))
        stack.enter_context(stalled_answer(w3.address))
        w1.update_send(np.zeros(BIG.size, np.float32), 1.0)
        result = w1.update_wait(1.0)
        assert result is not None and result.peer in ("w2", "w3")
        assert w1.stats()["pulls_busy"] == 2  # both said BUSY, then the first was asked again
        assert w2.stats()["served_busy"] == w3.stats()["served_busy"] == 1


def test_a_joiner_skips_a_busy_sponsor_and_copies_it_once_it_is_idle(
    make_cluster: Cluster,
) -> None:
    config = make_cluster(2, transport="tcp", timeout_ms=TIMEOUT_MS, start="shared")
    with Node(config, "w1", layout=BIG) as w1, Node(config, "w2", layout=BIG) as w2:
        model = np.full(BIG.size, 1.0, np.float32)
        while not w1.joined:  # the first node starts the cluster's model
            w1.step(model, 1.0)
        mine = np.full(BIG.size, 9.0, np.float32)
        with stalled_answer(w1.address):
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                assert w2.step(mine, 1.0) is None
                time.sleep(0.01)
            assert not w2.joined and w2.stats()["pulls_busy"] >= 2  # asked again and again
            assert w1.stats()["served_busy"] == w2.stats()["pulls_busy"]
        deadline = time.monotonic() + 20
        while not w2.joined:
            assert time.monotonic() < deadline, w2.stats()
            w2.step(mine, 1.0)
            time.sleep(0.01)
        assert w2.stats()["joined_from"] == "w1" and np.all(mine == 1.0)


def test_busy_in_answer_to_a_plain_pull_is_a_protocol_error(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_cluster(2, timeout_ms=1000)
    liar = socket.create_server(("127.0.0.1", config["nodes"][1]["port"]))
    layout = Layout.flat(16)
    asked: list[int] = []

    def lie() -> None:
        conn, _ = liar.accept()
        with conn:
            header = bytearray(HEADER.size)
            recv_exact(conn, memoryview(header), time.monotonic() + 5)
            asked.append(decode_header(header).flags)
            conn.sendall(encode_header(MessageType.BUSY))
            time.sleep(0.5)

    thread = threading.Thread(target=lie, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.WARNING), Node(config, "w1", layout=layout) as node:
            node.update_send(np.zeros(layout.size, np.float32), 1.0)
            assert node.update_wait(1.0) is None
            assert node.stats()["pulls_failed"] == 1 and node.stats()["pulls_busy"] == 0
        thread.join(5)
        assert asked and not asked[0] & FLAG_IF_IDLE  # its only peer is asked unconditionally
        assert "got BUSY in answer to a PULL that did not allow it" in caplog.text
    finally:
        liar.close()


def test_a_server_waiting_for_a_fresh_snapshot_already_says_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The uplink is claimed before the wait for a lazy trainer's next copy, not after it, so
    a second IF_IDLE pull arriving during that wait is sent elsewhere instead of sharing."""
    from dpwa_core import server as server_module
    from dpwa_core.server import Server
    from dpwa_core.snapshot import SnapshotBuffer

    monkeypatch.setattr(server_module, "FRESH_WAIT", 30.0)  # the test's publish ends the wait
    small = Layout.flat(1000)
    snapshots = SnapshotBuffer(small.size)
    snapshots.lazy = True
    snapshots.publish(lambda out: out.fill(1.0), 1.0, 1.0)
    for _ in range(3):
        snapshots.tick()  # the published copy is now 3 steps old: a PULL waits for a new one
    server = Server("127.0.0.1", 0, 30.0)
    server.set_source(small, snapshots)
    try:
        with (
            socket.create_connection(server.address, timeout=30) as first,
            socket.create_connection(server.address, timeout=30) as second,
        ):
            first.sendall(request(small, FLAG_IF_IDLE))
            deadline = time.monotonic() + 20
            while not snapshots.wanted:  # the server is in its wait
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second.sendall(request(small, FLAG_IF_IDLE))
            assert answer_type(second) is MessageType.BUSY
            snapshots.publish(lambda out: out.fill(2.0), 2.0, 1.0)  # the trainer's next step
            assert answer_type(first) is MessageType.PARAMS
        assert server.served_busy == 1
    finally:
        server.close()


def test_exponential_peer_choice_asks_the_schedules_peer_over_real_sockets(
    make_cluster: Cluster,
) -> None:
    """With ``peer_choice: exponential`` w1 (position 0 of 4) asks w2 and w3 in turn (hops of
    1 and 2), never w4; a peer that failed lately gives way to the draw."""
    small = Layout.flat(1000)
    config = make_cluster(4, transport="tcp", peer_choice="exponential", timeout_ms=5000)
    with ExitStack() as stack:
        nodes = [stack.enter_context(Node(config, f"w{i}", layout=small)) for i in (1, 2, 3, 4)]
        for value, node in enumerate(nodes[1:], start=2):
            node.update_send(np.full(small.size, float(value), np.float32), 1.0)
        w1 = nodes[0]
        assert w1.wait_for_peers(timeout=10) == 3
        peers = []
        for _ in range(6):
            w1.update_send(np.zeros(small.size, np.float32), 1.0)
            result = w1.update_wait(1.0)
            assert result is not None
            peers.append(result.peer)
        assert peers == ["w2", "w3"] * 3
        assert w1.stats()["pulls_scheduled"] == 6 and w1.stats()["pulls_shared"] == 0
