"""Nodes over real loopback sockets: exchange, factor and clock math, faults, hostile peers."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from dpwa_core.layout import Layout
from dpwa_core.node import Node
from dpwa_core.wire import HEADER, VERSION, MessageType, decode_header, encode_header
from dpwa_core.wire_dtype import INT8_BLOCK, WireDType

Cluster = Callable[..., dict[str, Any]]


def pull_until(node: Node, params: np.ndarray, loss: float = 1.0, tries: int = 50):  # type: ignore[no-untyped-def]
    """update_send/update_wait until a pull succeeds (peers may still be starting)."""
    for _ in range(tries):
        node.update_send(params, loss)
        result = node.update_wait(loss)
        if result is not None:
            return result
        time.sleep(0.02)
    raise AssertionError(f"{node.name}: no pull succeeded in {tries} tries: {node.stats()}")


@pytest.fixture
def two(make_cluster: Cluster) -> Iterator[tuple[Node, Node]]:
    config = make_cluster(2)
    with Node(config, "w1", seed=1) as a, Node(config, "w2", seed=2) as b:
        yield a, b


def test_two_nodes_exchange_parameters(two: tuple[Node, Node]) -> None:
    a, b = two
    a.update_send(np.full(1000, 3.0, np.float32), loss=0.5)
    result = pull_until(b, np.zeros(1000, np.float32))
    assert result.peer == "w1"
    np.testing.assert_array_equal(result.params, np.full(1000, 3.0))
    assert result.factor == 0.5
    assert result.loss == 0.5
    assert not result.params.flags.writeable
    assert b.stats()["pulls_ok"] >= 1
    # The server counts a pull once its send returns, which can be just after b has it all.
    deadline = time.monotonic() + 2
    while a.stats()["pulls_served"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.stats()["pulls_served"] >= 1


def test_factor_and_clock_math(make_cluster: Cluster) -> None:
    config = make_cluster(2, interpolation="clock", divergence_threshold=0.5)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        params = np.ones(10, np.float32)
        a.update_send(params, loss=1.0, samples=30)  # a.clock = 30
        b.update_send(params, loss=1.0, samples=20)  # b.clock = 20 (this pull may fail: a new)
        b.update_wait(1.0)
        b.clock = 20.0  # a's 30 is within robust.max_clock_lead (2) times ours: not bounded
        b.update_send(params, loss=1.0, samples=0)
        result = b.update_wait(0.25)  # below the divergence threshold of 0.5
        assert result is not None
        expected = 30 / (20 + 30) * (0.25 / 0.5)
        assert result.factor == pytest.approx(expected)
        assert result.clock == 30
        assert b.clock == pytest.approx(expected * 30 + (1 - expected) * 20)


def test_a_claimed_clock_is_bounded_by_max_clock_lead(make_cluster: Cluster) -> None:
    config = make_cluster(2, interpolation="clock")
    with Node(config, "w1") as a, Node(config, "w2") as b:
        params = np.ones(10, np.float32)
        a.update_send(params, loss=1.0, samples=10**9)  # a lies: a billion samples
        b.clock = 0.0
        result = pull_until(b, params)
        ours = b.stats()
        assert result.clock >= 10**9  # the claim, as received
        assert result.factor <= 2 / 3 + 1e-9  # peer_clock counted as at most 2x ours
        assert b.clock <= 2 * 10  # a few tries, each 1 sample and at most 2x ours
        assert ours["clocks_bounded"] >= 1


def test_nodes_start_in_any_order(make_cluster: Cluster) -> None:
    config = make_cluster(2, timeout_ms=200)
    with Node(config, "w2") as b:
        b.update_send(np.zeros(4, np.float32), 1.0)
        assert b.update_wait(1.0) is None  # w1 does not exist yet
        with Node(config, "w1") as a:
            a.update_send(np.ones(4, np.float32), 1.0)
            assert pull_until(b, np.zeros(4, np.float32)).peer == "w1"


def test_a_dead_peer_returns_none_within_timeout(make_cluster: Cluster) -> None:
    config = make_cluster(3, timeout_ms=300)  # w3 is never started
    with Node(config, "w1", seed=3) as a, Node(config, "w2") as b:
        b.update_send(np.ones(4, np.float32), 1.0)
        for _ in range(30):
            start = time.monotonic()
            a.update_send(np.zeros(4, np.float32), 1.0)
            a.update_wait(1.0)
            assert time.monotonic() - start < 0.3 + 0.2
        scores = a.stats()["scores"]
        assert scores["w3"] <= 0.25  # at least two failed pulls halved it twice
        assert scores["w2"] > 0.9
        assert a.stats()["pulls_failed"] >= 1


def test_a_silent_peer_never_blocks_beyond_timeout(make_cluster: Cluster) -> None:
    config = make_cluster(2, timeout_ms=250)
    port = config["nodes"][1]["port"]
    silent = socket.create_server(("127.0.0.1", port))  # accepts, never answers
    try:
        with Node(config, "w1") as a:
            for _ in range(3):
                start = time.monotonic()
                a.update_send(np.zeros(1000, np.float32), 1.0)
                assert a.update_wait(1.0) is None
                assert time.monotonic() - start < 0.25 + 0.15
            assert a.stats()["pulls_timed_out"] >= 2
            assert a.stats()["scores"]["w2"] < 0.1
    finally:
        silent.close()


def test_a_peer_that_stalls_mid_payload_times_out_and_leaves_no_result(
    make_cluster: Cluster,
) -> None:
    config = make_cluster(2, timeout_ms=300)
    port = config["nodes"][1]["port"]
    layout = Layout.flat(1000)
    stall = socket.create_server(("127.0.0.1", port))

    def half_answer() -> None:
        conn, _ = stall.accept()
        with conn:
            conn.recv(HEADER.size)
            conn.sendall(
                encode_header(
                    MessageType.PARAMS, size=1000, shape_hash=layout.shape_hash, length=4000
                )
            )
            conn.sendall(b"\x00" * 1000)  # a quarter of the payload, then silence
            time.sleep(1.0)

    thread = threading.Thread(target=half_answer, daemon=True)
    thread.start()
    try:
        with Node(config, "w1", layout=layout) as a:
            start = time.monotonic()
            a.update_send(np.zeros(1000, np.float32), 1.0)
            assert a.update_wait(1.0) is None
            assert time.monotonic() - start < 0.3 + 0.15
    finally:
        stall.close()


def test_layout_mismatch_is_refused_with_both_layouts(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_cluster(2, timeout_ms=500)
    caplog.set_level(logging.WARNING, logger="dpwa")
    with (
        Node(config, "w1", layout=Layout([(3, 4), (4,)])) as a,
        Node(config, "w2", layout=Layout([(4, 3), (4,)])) as b,
    ):
        a.update_send(np.ones(16, np.float32), 1.0)
        mine = np.zeros(16, np.float32)
        for _ in range(5):
            b.update_send(mine, 1.0)
            assert b.update_wait(1.0) is None
        np.testing.assert_array_equal(mine, 0)
        assert a.stats()["rejected"] >= 1
    text = caplog.text
    assert "layout mismatch" in text
    assert "[3x4, 4]" in text and "[4x3, 4]" in text


def test_params_must_match_the_layout(two: tuple[Node, Node]) -> None:
    a, _ = two
    a.update_send(np.zeros(5, np.float32), 1.0)
    with pytest.raises(ValueError, match="got 6 parameters, the node's layout has 5"):
        a.update_send(np.zeros(6, np.float32), 1.0)
    with pytest.raises(TypeError, match="1-D float32 numpy array, got a 1-D float64"):
        a.update_send(np.zeros(5), 1.0)
    with pytest.raises(TypeError, match="got list"):
        a.update_send([0.0] * 5, 1.0)  # type: ignore[arg-type]


def test_not_ready_peer_gives_none_without_penalty(two: tuple[Node, Node]) -> None:
    a, b = two
    b.update_send(np.zeros(5, np.float32), 1.0)  # a has published nothing
    assert b.update_wait(1.0) is None
    assert b.stats()["scores"]["w1"] == 1.0


def test_add_and_remove_peer_at_run_time(make_cluster: Cluster) -> None:
    config = make_cluster(1)
    extra = make_cluster(1)["nodes"][0]
    with Node(config, "w1") as a, Node({**extra_config(extra)}, "x") as x:
        x.update_send(np.full(3, 7.0, np.float32), 1.0)
        a.update_send(np.zeros(3, np.float32), 1.0)
        assert a.update_wait(1.0) is None  # no peers at all
        a.add_peer("x", "127.0.0.1", x.address[1])
        assert pull_until(a, np.zeros(3, np.float32)).peer == "x"
        a.remove_peer("x")
        assert a.peers() == []
        with pytest.raises(KeyError):
            a.remove_peer("x")
        with pytest.raises(ValueError, match="own peer"):
            a.add_peer("w1", "127.0.0.1", 1)


def extra_config(node: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": [{**node, "name": "x"}], "timeout_ms": 1000}


def test_close_frees_the_port_within_a_second(two: tuple[Node, Node]) -> None:
    a, b = two
    a.update_send(np.zeros(5, np.float32), 1.0)
    pull_until(b, np.zeros(5, np.float32))  # leaves a kept-alive connection open
    start = time.monotonic()
    a.close()
    assert time.monotonic() - start < 1.0
    host, port = a.address
    socket.create_server((host, port)).close()  # would raise if the port were still taken
    alive = {t.name for t in threading.enumerate()}
    assert not any(name.startswith("dpwa-puller-w1") for name in alive)


def test_a_node_restarted_under_the_same_name_is_used_again(make_cluster: Cluster) -> None:
    # The restarted peer's new parameters are a jump robust.clip would shrink; this is about
    # the connection.
    config = make_cluster(2, robust={"clip": False})
    with Node(config, "w2") as b:
        with Node(config, "w1") as a:
            a.update_send(np.full(4, 1.0, np.float32), 1.0)
            assert pull_until(b, np.zeros(4, np.float32)).params[0] == 1.0
        with Node(config, "w1") as again:
            again.update_send(np.full(4, 2.0, np.float32), 1.0)
            # b's kept-alive socket points at the dead process: it must reconnect by itself.
            assert pull_until(b, np.zeros(4, np.float32)).params[0] == 2.0


def test_garbage_requests_are_logged_and_closed_and_service_continues(
    two: tuple[Node, Node], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = two
    caplog.set_level(logging.DEBUG, logger="dpwa")
    a.update_send(np.full(8, 5.0, np.float32), 1.0)
    bad = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 40,
        encode_header(MessageType.PARAMS, size=8, length=32),  # a server never receives PARAMS
        struct.pack("<4sBBHBBHddQQQ", b"DPWA", VERSION, 1, 0, 1, 0, 0, 0.0, 0.0, 8, 0, 2**63),
    ]
    for data in bad:
        with socket.create_connection(a.address, timeout=2) as s:
            s.sendall(data)
            try:
                answer = s.recv(100)
            except ConnectionResetError:  # closed with our extra bytes unread
                answer = b""
            assert answer == b""  # closed without an answer
    assert pull_until(b, np.zeros(8, np.float32)).params[0] == 5.0
    assert a.stats()["rejected"] >= 3
    assert "bad magic" in caplog.text
    assert "expected a PULL request" in caplog.text
    assert "PULL carries no payload" in caplog.text


def test_a_lying_server_cannot_make_the_puller_allocate(make_cluster: Cluster) -> None:
    config = make_cluster(2, timeout_ms=500)
    port = config["nodes"][1]["port"]
    liar = socket.create_server(("127.0.0.1", port))
    layout = Layout.flat(4)

    def lie() -> None:
        conn, _ = liar.accept()
        with conn:
            conn.recv(HEADER.size)
            # Claims a 2**61-element layout (8 EiB) with a matching payload length.
            conn.sendall(encode_header(MessageType.PARAMS, size=2**61, shape_hash=1, length=2**63))
            time.sleep(0.5)

    threading.Thread(target=lie, daemon=True).start()
    try:
        with Node(config, "w1", layout=layout) as a:
            mine = np.zeros(4, np.float32)
            a.update_send(mine, 1.0)
            assert a.update_wait(1.0) is None
            assert a.stats()["pulls_failed"] == 1
            np.testing.assert_array_equal(mine, 0)
    finally:
        liar.close()


@pytest.mark.parametrize("scale", [float("nan"), -1.0, float("inf"), 1e38])
def test_a_hostile_int8_scale_fails_the_pull_with_one_log_line(
    make_cluster: Cluster, scale: float, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_cluster(2, timeout_ms=500)
    port = config["nodes"][1]["port"]
    liar = socket.create_server(("127.0.0.1", port))
    layout = Layout.flat(INT8_BLOCK + 1)  # two blocks; the second one's scale is hostile
    payload = struct.pack("<2f", 0.5, scale) + b"\x7f" * layout.size

    def lie() -> None:
        conn, _ = liar.accept()
        with conn:
            conn.recv(HEADER.size)
            header = encode_header(
                MessageType.PARAMS,
                size=layout.size,
                shape_hash=layout.shape_hash,
                length=len(payload),
                dtype=WireDType.INT8,
            )
            conn.sendall(header + payload)
            time.sleep(0.5)

    threading.Thread(target=lie, daemon=True).start()
    try:
        with caplog.at_level(logging.WARNING), Node(config, "w1", layout=layout) as a:
            mine = np.zeros(layout.size, np.float32)
            a.update_send(mine, 1.0)
            assert a.update_wait(1.0) is None
            assert a.stats()["pulls_failed"] == 1
            np.testing.assert_array_equal(mine, 0)
        messages = [record.getMessage() for record in caplog.records]
        lines = [line for line in messages if "int8 block 1 has scale" in line]
        assert len(lines) == 1, lines
    finally:
        liar.close()


def test_pulled_snapshots_are_never_torn(two: tuple[Node, Node]) -> None:
    a, b = two
    size = 500_000
    stop = threading.Event()

    def publish() -> None:
        k = 0
        params = np.empty(size, np.float32)
        while not stop.is_set():
            k += 1
            params.fill(k)
            a.update_send(params, 1.0, samples=0)

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        seen = set()
        mine = np.zeros(size, np.float32)
        for _ in range(40):
            b.update_send(mine, 1.0)
            result = b.update_wait(1.0)
            if result is None:
                continue
            lo, hi = result.params.min(), result.params.max()
            assert lo == hi, f"torn snapshot: values {lo}..{hi}"
            seen.add(float(lo))
        assert len(seen) >= 2  # the publisher really was overwriting during pulls
    finally:
        stop.set()
        thread.join()


def test_server_request_header_roundtrip_over_a_raw_socket(two: tuple[Node, Node]) -> None:
    """A hand-written client following docs/PROTOCOL.md gets the parameters."""
    a, _ = two
    a.update_send(np.arange(6, dtype=np.float32), loss=0.75, samples=4)
    layout = Layout.flat(6)
    with socket.create_connection(a.address, timeout=2) as s:
        s.sendall(encode_header(MessageType.PULL, size=6, shape_hash=layout.shape_hash))
        data = b""
        while len(data) < HEADER.size + 24:
            chunk = s.recv(4096)
            assert chunk
            data += chunk
    header = decode_header(data[: HEADER.size])
    assert header.type is MessageType.PARAMS
    assert (header.clock, header.loss, header.length) == (4.0, 0.75, 24)
    np.testing.assert_array_equal(np.frombuffer(data[HEADER.size :], "<f4"), np.arange(6))


def test_close_cuts_short_a_pull_in_flight(make_cluster: Cluster) -> None:
    config = make_cluster(2, timeout_ms=5000)
    port = config["nodes"][1]["port"]
    silent = socket.create_server(("127.0.0.1", port))  # accepts, never answers
    try:
        a = Node(config, "w1")
        a.update_send(np.zeros(100, np.float32), 1.0)  # starts a pull that would wait 5 s
        time.sleep(0.2)
        start = time.monotonic()
        a.close()
        assert time.monotonic() - start < 1.0
        threads = [t for t in threading.enumerate() if t.name == "dpwa-puller-w1"]
        assert not any(t.is_alive() for t in threads)
        assert a.update_wait(1.0) is None
    finally:
        silent.close()


def test_a_node_without_peers_never_pulls(make_cluster: Cluster) -> None:
    with Node(make_cluster(1), "w1") as a:
        a.update_send(np.ones(3, np.float32), 1.0)
        assert a.update_wait(1.0) is None
        stats = a.stats()
        assert stats["pulls_failed"] == stats["pulls_timed_out"] == stats["pulls_ok"] == 0
        assert a.peers() == []


def test_wait_for_peers_returns_when_peers_are_up(make_cluster: Cluster) -> None:
    config = make_cluster(3)
    with Node(config, "w1") as a:
        late: list[Node] = []
        starter = threading.Timer(0.3, lambda: late.append(Node(config, "w2")))
        starter.start()
        try:
            start = time.monotonic()
            assert a.wait_for_peers(count=1, timeout=10) == 1
            assert 0.2 < time.monotonic() - start < 5
            start = time.monotonic()
            assert a.wait_for_peers(timeout=0.4) == 1  # w3 never comes
            assert time.monotonic() - start < 1.5
        finally:
            starter.join()
            for node in late:
                node.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_parameters_are_refused_by_default(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture, bad: float
) -> None:
    caplog.set_level(logging.WARNING, logger="dpwa")
    with Node(make_cluster(2), "w1") as a, Node(a.config, "w2") as b:
        poisoned = np.ones(1000, np.float32)
        poisoned[777] = bad
        a.update_send(poisoned, 1.0)
        mine = np.zeros(1000, np.float32)
        for _ in range(4):
            b.update_send(mine, 1.0)
            assert b.update_wait(1.0) is None
        np.testing.assert_array_equal(mine, 0)
        stats = b.stats()
        assert stats["rejected_nonfinite"] == 4
        assert stats["pulls_failed"] == 4
        assert stats["scores"]["w1"] < 0.1
        a.update_send(np.full(1000, 2.0, np.float32), 1.0)  # healthy again: used again
        assert pull_until(b, mine).params[777] == 2.0
    assert caplog.text.count("they contain NaN or Inf") == 1  # once per peer


def test_nonfinite_parameters_pass_when_allowed(make_cluster: Cluster) -> None:
    config = make_cluster(2, reject_nonfinite=False)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        a.update_send(np.array([1.0, np.nan], np.float32), 1.0)
        result = pull_until(b, np.zeros(2, np.float32))
        assert np.isnan(result.params[1])
        assert b.stats()["rejected_nonfinite"] == 0
