"""Fuzzing: the parsers with hypothesis, and a live server over real sockets.

The server must refuse every malformed, truncated, oversized, idle or trickling connection with
one log line per peer and reason, keep its memory and connection count bounded, and keep
serving a valid peer throughout.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpwa_core import auth
from dpwa_core._log import reason_of
from dpwa_core.errors import AuthError, ProtocolError
from dpwa_core.layout import Layout
from dpwa_core.node import Node
from dpwa_core.puller import all_finite
from dpwa_core.wire import HEADER, MAX_TEXT_PAYLOAD, MessageType, decode_header, encode_header

Cluster = Callable[..., dict[str, Any]]
SIZE = 1000
LAYOUT = Layout.flat(SIZE)
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u64 = st.one_of(
    st.sampled_from([0, 1, 2**31, 2**32, 2**62, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)
)
f64 = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, -1.0, float("nan"), float("inf")]))
headers = st.builds(
    lambda *fields: HEADER.pack(*fields),
    st.one_of(st.just(b"DPWA"), st.binary(min_size=4, max_size=4)),
    st.one_of(st.just(1), u8),
    st.one_of(st.sampled_from(list(MessageType)), u8),
    st.one_of(st.just(0), u16),
    st.one_of(st.just(1), u8),
    st.one_of(st.just(0), u8),
    st.one_of(st.just(0), u16),
    f64,
    f64,
    u64,
    u64,
    u64,
)


@FUZZ
@given(headers)
def test_any_header_decodes_to_a_checked_header_or_protocol_error(data: bytes) -> None:
    try:
        header = decode_header(data)
    except ProtocolError:
        return
    assert header.clock >= 0 and np.isfinite(header.clock) and np.isfinite(header.loss)
    if header.type is MessageType.PARAMS:
        start, stop = header.span
        assert header.length == header.dtype.payload_bytes(stop - start)
    elif header.type is MessageType.LAYOUT_MISMATCH:
        assert header.length <= MAX_TEXT_PAYLOAD
    else:
        assert header.length == 0


@FUZZ
@given(st.binary(min_size=8, max_size=8), st.sampled_from(list(auth.Step)))
def test_handshake_prefix_parser_fails_only_with_auth_error(data: bytes, step: auth.Step) -> None:
    try:
        status = auth.decode_prefix(data, step)
    except AuthError:
        return
    assert data[:4] == auth.AUTH_MAGIC and status in auth.Status


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_handshake_server_fed_random_bytes_fails_cleanly(data: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(auth.AUTH_MAGIC + data)
        a.shutdown(socket.SHUT_WR)
        magic = b.recv(4, socket.MSG_WAITALL)
        with pytest.raises((AuthError, ConnectionError, TimeoutError)):
            server_handshake_short(b, magic)


def server_handshake_short(sock: socket.socket, magic: bytes) -> None:
    auth.server_handshake(sock, b"secret", time.monotonic() + 2, magic, name="w1")


def valid_pull() -> bytes:
    return encode_header(MessageType.PULL, size=SIZE, shape_hash=LAYOUT.shape_hash)


def mutate(data: bytes, index: int, value: int) -> bytes:
    out = bytearray(data)
    out[index % len(out)] = value
    return bytes(out)


hostile = st.one_of(
    st.binary(max_size=300),
    headers,
    st.builds(lambda n: valid_pull()[:n], st.integers(0, HEADER.size - 1)),  # truncated
    st.builds(mutate, st.just(valid_pull()), st.integers(0, 51), u8),
    st.builds(lambda d: auth.AUTH_MAGIC + d, st.binary(max_size=100)),
    st.builds(
        lambda n: struct.pack("<4sBBHBBHddQQQ", b"DPWA", 1, 1, 0, 1, 0, 0, 0.0, 0.0, SIZE, 0, n),
        u64,
    ),
)


def exchange(address: tuple[str, int], data: bytes) -> None:
    """Send ``data``, stop sending, and read until the server closes."""
    with socket.create_connection(address, timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except OSError:  # reset, or closed before we stopped sending: refused either way
            pass


@pytest.fixture(params=["plain", "auth"])
def served(
    make_cluster: Cluster, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Node, Node]]:
    """A serving node and a valid peer, without and with shared-secret auth."""
    options: dict[str, Any] = {}
    if request.param == "auth":
        monkeypatch.setenv("DPWA_FUZZ_SECRET", "fuzz secret")
        options["auth"] = {"secret_env": "DPWA_FUZZ_SECRET"}
    config = make_cluster(2, timeout_ms=1000, **options)
    with Node(config, "w1", layout=LAYOUT) as server, Node(config, "w2", layout=LAYOUT) as peer:
        server.update_send(np.full(SIZE, 3.0, np.float32), 1.0)
        yield server, peer


def pull_ok(peer: Node, tries: int = 20) -> bool:
    mine = np.zeros(SIZE, np.float32)
    for _ in range(tries):
        peer.update_send(mine, 1.0)
        result = peer.update_wait(1.0)
        if result is not None:
            return bool(result.params[0] == 3.0)
    return False


def server_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "dpwa.server" and r.levelno == logging.WARNING
    ]


def assert_once_per_reason(messages: list[str]) -> None:
    """Every (peer, reason) is logged at WARNING once: all tests connect from 127.0.0.1."""
    reasons = [reason_of(re.sub(r"127\.0\.0\.1:\d+", "PEER", m)) for m in messages]
    repeated = {r for r in reasons if reasons.count(r) > 1}
    assert not repeated, f"logged more than once: {repeated}"


def test_live_server_survives_hypothesis_bytes(
    served: tuple[Node, Node], caplog: pytest.LogCaptureFixture
) -> None:
    server, peer = served
    caplog.set_level(logging.DEBUG, logger="dpwa")

    @FUZZ
    @given(hostile)
    def attack(data: bytes) -> None:
        exchange(server.address, data)

    attack()
    assert pull_ok(peer)
    warnings = server_warnings(caplog)
    assert warnings, "no rejection was logged"
    assert_once_per_reason(warnings)
    assert server.stats()["rejected"] >= 10


def test_thousands_of_idle_connections_cannot_lock_out_a_valid_peer(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dpwa")
    config = make_cluster(2, timeout_ms=3000)  # idle openings live long: the cap must evict
    with Node(config, "w1", layout=LAYOUT) as server, Node(config, "w2", layout=LAYOUT) as peer:
        server.update_send(np.full(SIZE, 3.0, np.float32), 1.0)
        assert pull_ok(peer)
        process = psutil.Process()
        rss_before = process.memory_info().rss
        flooding = threading.Event()
        flooding.set()
        results: list[bool] = []
        most = [0]

        def keep_pulling() -> None:
            mine = np.zeros(SIZE, np.float32)
            while flooding.is_set():
                peer.update_send(mine, 1.0)
                results.append(peer.update_wait(1.0) is not None)
                most[0] = max(most[0], server.stats()["connections"])

        puller = threading.Thread(target=keep_pulling)
        puller.start()
        idle: list[socket.socket] = []
        try:
            for _ in range(3000):
                # A full backlog may refuse some: that is the flood's problem.
                with contextlib.suppress(OSError):
                    idle.append(socket.create_connection(server.address, timeout=5))
            time.sleep(0.5)
            rss_peak = process.memory_info().rss
        finally:
            flooding.clear()
            puller.join(30)
            for s in idle:
                s.close()
        stats = server.stats()
        assert most[0] <= 256
        assert stats["evicted"] >= 1000, stats
        # Pulls go on during the flood; a few may lose their fresh connection to eviction.
        assert sum(results) >= 0.5 * len(results) and sum(results) >= 5, results
        # Generous: 3000 connections and their threads must not grow memory by much.
        assert rss_peak - rss_before < 64 * 2**20, (rss_before, rss_peak)
        assert pull_ok(peer)
    warnings = server_warnings(caplog)
    assert sum("to make room" in m for m in warnings) == 1
    assert_once_per_reason(warnings)


def test_trickling_clients_are_cut_off_and_logged_once(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients sending one byte a second are closed after timeout_ms; a valid peer goes on."""
    caplog.set_level(logging.WARNING, logger="dpwa")
    config = make_cluster(2, timeout_ms=500)
    with Node(config, "w1", layout=LAYOUT) as server, Node(config, "w2", layout=LAYOUT) as peer:
        server.update_send(np.full(SIZE, 3.0, np.float32), 1.0)
        lifetimes: list[float] = []

        def trickle(prime: bool) -> None:
            with socket.create_connection(server.address, timeout=10) as s:
                if prime:  # one honest pull first, then trickle the next request
                    s.sendall(valid_pull())
                    got = 0
                    while got < HEADER.size + 4 * SIZE:
                        got += len(s.recv(65536))
                start = time.monotonic()
                try:
                    for byte in valid_pull():
                        s.sendall(bytes([byte]))
                        time.sleep(1.0)
                except OSError:
                    pass
                lifetimes.append(time.monotonic() - start)

        threads = [threading.Thread(target=trickle, args=(i % 2 == 0,)) for i in range(20)]
        for t in threads:
            t.start()
        assert pull_ok(peer)
        for t in threads:
            t.join(30)
        assert pull_ok(peer)
        assert len(lifetimes) == 20
        # Cut at timeout_ms after the request's first byte; the client notices at its next send.
        assert max(lifetimes) < 0.5 + 1.0 + 2.0, lifetimes
        assert server.stats()["rejected"] >= 20
    warnings = server_warnings(caplog)
    assert sum("took too long" in m for m in warnings) == 2  # opening, and later request
    assert_once_per_reason(warnings)


def small_server(max_connections: int) -> tuple[Any, Any]:
    from dpwa_core.server import Server
    from dpwa_core.snapshot import SnapshotBuffer

    server = Server("127.0.0.1", 0, 2.0, max_connections=max_connections)
    snapshots = SnapshotBuffer(SIZE)
    snapshots.publish(lambda out: out.fill(3.0), 1.0, 1.0)
    server.set_source(LAYOUT, snapshots)
    return server, snapshots


def pulled(sock: socket.socket) -> bool:
    """One PULL on ``sock``; True when the whole PARAMS answer came back."""
    try:
        sock.sendall(valid_pull())
        got = 0
        while got < HEADER.size + 4 * SIZE:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            got += len(chunk)
        return True
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def test_at_the_cap_an_unfinished_opening_goes_before_an_idle_peer() -> None:
    server, _ = small_server(max_connections=2)
    try:
        valid = socket.create_connection(server.address, timeout=5)
        assert pulled(valid)  # opened, now idle between pulls
        lurker = socket.create_connection(server.address, timeout=5)  # never sends
        wait_until(lambda: server.connections == 2)
        newcomer = socket.create_connection(server.address, timeout=5)
        assert pulled(newcomer)
        lurker.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert lurker.recv(1) == b""  # the lurker was closed to make room
        assert pulled(valid)  # the idle valid peer was kept
        assert server.evicted == 1
        for s in (valid, lurker, newcomer):
            s.close()
    finally:
        server.close()


def test_at_the_cap_a_stalled_request_goes_before_an_idle_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dpwa")
    server, _ = small_server(max_connections=2)
    try:
        valid = socket.create_connection(server.address, timeout=5)
        assert pulled(valid)  # opened, now idle between pulls
        staller = socket.create_connection(server.address, timeout=5)
        assert pulled(staller)
        staller.sendall(valid_pull()[:10])  # a request started and never finished
        wait_until(lambda: sum(c.state == 1 for c in server._conns) == 1)  # _STARTED
        newcomer = socket.create_connection(server.address, timeout=5)
        assert pulled(newcomer)
        staller.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert staller.recv(1) == b""  # the stalled connection was closed to make room
        assert pulled(valid)  # the idle valid peer was kept
        assert server.evicted == 1 and server.rejected == 0
        assert "closed a stalled connection" in caplog.text
        for s in (valid, staller, newcomer):
            s.close()
    finally:
        server.close()


@FUZZ
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=0, max_size=300))
def test_all_finite_agrees_with_numpy(values: list[float]) -> None:
    array = np.array(values, np.float32)
    assert all_finite(array) == bool(np.isfinite(array).all())
