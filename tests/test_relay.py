"""Relayed and tampered connections with ``auth``: real node processes, a real man in the middle.

The attacker knows no secret but holds a configured peer's address (the peer is down, or its
address was taken over). It relays each node's handshake to that node's own server or to a
third node, with and without rewriting the names, and then tries to pass its own parameters.
None of it may yield a byte of parameters or reach a model. A relay between two honest nodes
that changes a byte after the handshake is caught by the message tags.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dpwa_core import auth
from dpwa_core.node import Node
from dpwa_core.wire import HEADER, VERSION, MessageType, encode_header

Cluster = Callable[..., dict[str, Any]]
SECRET = "relay-test-secret-7f3a"
HELLO_SIZE = auth.PREFIX.size + auth.NONCE_SIZE + 2 * auth.MAX_NAME_BYTES
WORKER = Path(__file__).parent / "workers" / "recording_node.py"
# Server-to-client bytes before the first answer's payload: CHALLENGE, RESULT, PARAMS header.
ANSWER_PAYLOAD = 3 * auth.PREFIX.size + auth.NONCE_SIZE + 2 * auth.MAC_SIZE + HEADER.size
# (target, rewrite): whose server the HELLO goes to, and which name in it is changed.
VARIANTS = [
    ("own", None),
    ("own", "server"),
    ("own", "client"),
    ("third", None),
    ("third", "server"),
    ("third", "client"),
]


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(65536):
            if record is not None:
                record += chunk
            dst.sendall(chunk)
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Relay:
    """Listens on the stolen address; relays each connection's handshake somewhere else."""

    def __init__(self, port: int, servers: dict[str, tuple[str, int]]) -> None:
        self.servers = servers
        self.attempts: list[tuple[str, str, str | None]] = []
        self.from_servers = bytearray()  # every byte a node's server sent the relay
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self.relay, args=(client,), daemon=True).start()

    def relay(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client:
            client.settimeout(5)
            hello = bytearray(recv_exact(client, HELLO_SIZE))
            names = auth.PREFIX.size + auth.NONCE_SIZE
            dialler = hello[names : names + auth.MAX_NAME_BYTES].rstrip(b"\0").decode()
            other = next(n for n in self.servers if n != dialler)
            target, rewrite = VARIANTS[len(self.attempts) % len(VARIANTS)]
            self.attempts.append((dialler, target, rewrite))
            goes_to = dialler if target == "own" else other
            if rewrite == "server":  # claim the HELLO was meant for the target
                hello[names + auth.MAX_NAME_BYTES :] = auth.check_name(goes_to)
            elif rewrite == "client":  # pose as the other member towards the target
                hello[names : names + auth.MAX_NAME_BYTES] = auth.check_name(
                    other if goes_to == dialler else "w2"
                )
            with socket.create_connection(self.servers[goes_to], timeout=5) as server:
                server.sendall(hello)
                record = bytearray()
                back = threading.Thread(target=pump, args=(server, client, record))
                back.start()
                pump(client, server, None)
                back.join(5)
                self.from_servers += record
            # Whatever happened, try to pass our own parameters to the dialler.
            payload = np.full(64, 777.0, np.float32).tobytes()
            header = encode_header(MessageType.PARAMS, size=64, length=len(payload))
            client.sendall(header + payload + bytes(auth.MAC_SIZE))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.listener.close()


def params_headers(data: bytes) -> int:
    """How many PARAMS or SHM_PARAMS headers of this protocol version ``data`` holds."""
    return sum(data.count(b"DPWA" + bytes([VERSION, kind])) for kind in (MessageType.PARAMS, 8))


def test_a_relay_without_the_secret_gets_no_parameters_and_passes_none(
    make_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DPWA_RELAY_SECRET", SECRET)
    config = make_cluster(
        3, timeout_ms=500, auth={"secret_env": "DPWA_RELAY_SECRET"}, robust={"clip": False}
    )
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    ports = {n["name"]: n["port"] for n in config["nodes"]}
    relay = Relay(ports["w2"], {n: ("127.0.0.1", ports[n]) for n in ("w1", "w3")})
    values = {"w1": 1.0, "w3": 3.0}
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(path),
                name,
                str(value),
                "60",
                str(tmp_path / f"{name}.json"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, value in values.items()
    }
    try:
        deadline = time.monotonic() + 60
        pulled = [tmp_path / f"{name}.json.pulled" for name in values]
        while time.monotonic() < deadline and (
            len(relay.attempts) < 2 * len(VARIANTS) or not all(p.exists() for p in pulled)
        ):
            assert all(p.poll() is None for p in procs.values()), "a victim died"
            time.sleep(0.1)
    finally:
        for name in procs:
            (tmp_path / f"{name}.json.stop").touch()
        logs = {name: proc.communicate(timeout=30)[1] for name, proc in procs.items()}
        relay.close()
    assert all(proc.returncode == 0 for proc in procs.values()), logs
    # The attack ran: every variant was tried, from both victims.
    assert {(t, r) for _, t, r in relay.attempts} == set(VARIANTS)
    assert {d for d, _, _ in relay.attempts} == {"w1", "w3"}
    # No server sent the relay parameters, in the clear or in shared memory.
    assert params_headers(bytes(relay.from_servers)) == 0
    for name in values:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        accepted = record["accepted"]
        other = "w3" if name == "w1" else "w1"
        assert accepted, f"{name} accepted no pull at all: {logs[name]}"
        assert {peer for peer, _, _ in accepted} == {other}
        assert all(lo == hi == values[other] for _, lo, hi in accepted)
        assert record["stats"]["peers"]["w2"]["ok"] == 0
        assert record["stats"]["rejected"] >= 1  # its server refused relayed handshakes
        # Its puller refused the impostor, and its server refused relayed handshakes.
        refusals = ("could not prove it is w2", "is not w2", "refuses the name")
        assert any(text in logs[name] for text in refusals), logs[name]
    # Each way the relay tried was refused for its own reason, and said so.
    every = "".join(logs.values())
    for text in ("could not prove it is w2", "is not w2", "refuses the name"):
        assert text in every
    assert "relayed or misdirected handshake" in every and "own name" in every


def test_a_byte_changed_after_the_handshake_is_refused(
    make_cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DPWA_RELAY_SECRET", SECRET)
    caplog.set_level(logging.INFO, logger="dpwa")
    config = make_cluster(
        2,
        timeout_ms=1000,
        auth={"secret_env": "DPWA_RELAY_SECRET"},
        robust={"clip": False},
        transport="tcp",  # every answer is PARAMS, of a known size
    )
    real = config["nodes"][1]["port"]
    tamper = {"on": False, "changed": 0, "answer": 0}  # which answer of a connection to alter
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def forward_and_flip(server: socket.socket, client: socket.socket) -> None:
        seen = 0
        answer = HEADER.size + 4 * 256 + auth.MAC_SIZE  # one tagged PARAMS answer
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                data = bytearray(chunk)
                # Inside the payload of the connection's first (or second) PARAMS answer.
                offset = ANSWER_PAYLOAD + tamper["answer"] * answer + 100 - seen
                if tamper["on"] and 0 <= offset < len(data):
                    data[offset] ^= 0x40
                    tamper["changed"] += 1
                seen += len(data)
                client.sendall(data)
        for sock in (server, client):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(("127.0.0.1", real), timeout=5)
            handshake = bytearray()
            # The handshake passes untouched; the answers after it are altered.
            threading.Thread(target=pump, args=(client, server, handshake), daemon=True).start()
            threading.Thread(target=forward_and_flip, args=(server, client), daemon=True).start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # w1 reaches w2 through the relay; w2 itself listens on its real port.
    via_relay = {**config, "nodes": [config["nodes"][0], {**config["nodes"][1]}]}
    via_relay["nodes"][1]["port"] = listener.getsockname()[1]
    try:
        with Node(config, "w2") as w2, Node(via_relay, "w1") as w1:
            w2.update_send(np.full(256, 2.0, np.float32), 1.0)
            mine = np.zeros(256, np.float32)
            honest = []
            for _ in range(20):  # an untouched relay is invisible: pulls succeed
                w1.update_send(mine, 1.0)
                if (result := w1.update_wait(1.0)) is not None:
                    honest.append(float(result.params.max()))
            assert honest and set(honest) == {2.0}
            tamper["on"] = True
            w1._puller._close("w2")  # the next pull opens a fresh connection, through the flip
            before = w1.stats()["pulls_ok"]
            for _ in range(10):
                w1.update_send(mine, 1.0)
                assert w1.update_wait(1.0) is None
            assert w1.stats()["pulls_ok"] == before
            assert tamper["changed"] >= 1
            assert "message authentication failed" in caplog.text
            # The second answer of every connection altered: failures and recoveries alternate,
            # and the log stays within its budget of 60 lines a minute all the same.
            tamper["answer"] = 1
            caplog.clear()
            for _ in range(200):
                w1.update_send(mine, 1.0)
                w1.update_wait(1.0)
            peers = w1.stats()["peers"]["w2"]
            assert peers["ok"] >= 20 + 80 and peers["failed"] >= 10 + 80  # it alternated
            shown = [r for r in caplog.records if r.levelno >= logging.INFO]
            assert len(shown) <= 62, [r.getMessage() for r in shown[:80]]
    finally:
        stop.set()
        thread.join(2)
        listener.close()


def test_a_peer_of_the_old_version_gets_a_clear_refusal_and_no_parameters(
    make_cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DPWA_RELAY_SECRET", SECRET)
    caplog.set_level(logging.WARNING, logger="dpwa")
    for options in ({}, {"auth": {"secret_env": "DPWA_RELAY_SECRET"}}):
        config = make_cluster(1, **options)
        with Node(config, "w1") as node:
            node.update_send(np.ones(8, np.float32), 1.0)
            with socket.create_connection(node.address, timeout=5) as old:
                if options:  # a version-1 HELLO: prefix with version 1, then its nonce
                    old.sendall(b"DPWH" + bytes([1, 1, 0, 0]) + bytes(32))
                else:  # a version-1 PULL header
                    pull = bytearray(encode_header(MessageType.PULL, size=8))
                    pull[4] = 1
                    old.sendall(pull)
                answer = old.recv(HEADER.size)
            ours = {b"DPWA": VERSION, b"DPWH": auth.AUTH_VERSION}  # our versions, no data
            assert answer[4] == ours[bytes(answer[:4])]
            assert b"\x00\x00\x80?" not in answer  # no float32 1.0 in it
            deadline = time.monotonic() + 10
            while node.stats()["rejected"] == 0:  # the refusal is logged as the node rejects
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert node.stats()["pulls_served"] == 0
    assert f"protocol version 1, this node speaks {VERSION}" in caplog.text
    assert f"handshake version 1, this node speaks {auth.AUTH_VERSION}" in caplog.text
