"""Shared-secret authentication: the handshake, its failure modes, and nodes that use it."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dpwa_core import auth
from dpwa_core.auth import Status, Step, client_handshake, server_handshake
from dpwa_core.config import load_config
from dpwa_core.errors import AuthError, ConfigError
from dpwa_core.layout import Layout
from dpwa_core.node import Node
from dpwa_core.wire import HEADER, MessageType, decode_header, encode_header

Cluster = Callable[..., dict[str, Any]]
SECRET = b"correct horse battery staple"


def run_pair(
    client_secret: bytes,
    server_secret: bytes,
    *,
    client: str = "w1",
    dialled: str = "w2",
    server: str = "w2",
    members: tuple[str, ...] = ("w1", "w2"),
) -> tuple[BaseException | None, BaseException | None]:
    """Run both handshake sides over a socket pair; returns (client error, server error)."""
    a, b = socket.socketpair()
    errors: dict[str, BaseException | None] = {"server": None}
    sessions: dict[str, auth.Session] = {}

    def serve() -> None:
        try:
            magic = b.recv(4, socket.MSG_WAITALL)
            deadline = time.monotonic() + 5
            sessions["server"] = server_handshake(
                b, server_secret, deadline, magic, name=server, members=members
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors["server"] = exc
        finally:
            b.close()

    thread = threading.Thread(target=serve)
    thread.start()
    client_error: BaseException | None = None
    try:
        deadline = time.monotonic() + 5
        sessions["client"] = client_handshake(a, client_secret, deadline, name=client, peer=dialled)
    except BaseException as exc:  # noqa: BLE001
        client_error = exc
    finally:
        thread.join(10)
        a.close()
    if len(sessions) == 2:  # both sides agree on who is who and on the keys
        theirs, ours = sessions["server"], sessions["client"]
        assert (theirs.peer, ours.peer) == (client, dialled)
        ours.receive.check(theirs.send.tag(b"answer"), b"answer")
        theirs.receive.check(ours.send.tag(b"pull"), b"pull")
    return client_error, errors["server"]


def test_same_secret_passes_both_ways() -> None:
    assert run_pair(SECRET, SECRET) == (None, None)


def test_different_secrets_fail_on_both_sides_with_a_reason() -> None:
    client_error, server_error = run_pair(SECRET, b"another secret")
    assert isinstance(client_error, AuthError)
    assert "could not prove it is w2" in str(client_error)
    assert isinstance(server_error, AuthError)
    assert "refused our proof" in str(server_error)


def test_the_handshake_binds_both_names() -> None:
    # Dialled w3 but reached w2 (a relay to a third node): the server refuses the name.
    client_error, server_error = run_pair(SECRET, SECRET, dialled="w3", members=())
    assert isinstance(server_error, AuthError) and "not this node (w2)" in str(server_error)
    assert isinstance(client_error, AuthError) and "is not w3" in str(client_error)
    # A client claiming the server's own name (its own HELLO reflected back) is refused.
    client_error, server_error = run_pair(SECRET, SECRET, client="w2")
    assert isinstance(server_error, AuthError) and "own name" in str(server_error)
    assert isinstance(client_error, AuthError)
    # A name that is not in the server's config is refused.
    client_error, server_error = run_pair(SECRET, SECRET, client="intruder")
    assert isinstance(server_error, AuthError) and "not in this node's config" in str(server_error)
    assert isinstance(client_error, AuthError) and "refuses the name" in str(client_error)


def test_macs_bind_names_direction_and_both_nonces() -> None:
    n1, n2 = b"\x01" * 32, b"\x02" * 32
    w1, w2 = auth.check_name("w1"), auth.check_name("w2")
    t = w1 + w2 + n1 + n2
    assert auth._mac(SECRET, "server", t) != auth._mac(SECRET, "client", t)
    assert auth._mac(SECRET, "server", t) != auth._mac(SECRET, "server", w2 + w1 + n1 + n2)
    assert auth._mac(SECRET, "server", t) != auth._mac(SECRET, "server", w1 + w2 + n2 + n1)
    assert auth._mac(SECRET, "server", t) != auth._mac(b"x" + SECRET, "server", t)
    assert len(auth._mac(SECRET, "server", t)) == auth.MAC_SIZE


def hello_from(name: str, dialled: str, nonce: bytes = b"\x07" * 32) -> bytes:
    return auth.encode(Step.HELLO, nonce + auth.check_name(name) + auth.check_name(dialled))


def manual_client(sock: socket.socket, hello: bytes, proof: bytes | None) -> tuple[bytes, bytes]:
    """Send HELLO; read CHALLENGE; send ``proof`` (or the right one); return (challenge, result)."""
    sock.sendall(hello)
    challenge = sock.recv(auth.PREFIX.size + 64, socket.MSG_WAITALL)
    nonce_s = challenge[auth.PREFIX.size : auth.PREFIX.size + 32]
    body = hello[auth.PREFIX.size :]
    transcript = body[32:] + body[:32] + nonce_s
    if proof is None:
        proof = auth.encode(Step.PROOF, auth._mac(SECRET, "client", transcript))
    sock.sendall(proof)
    return challenge, sock.recv(auth.PREFIX.size + auth.MAC_SIZE, socket.MSG_WAITALL)


def closed_without_answer(sock: socket.socket, data: bytes) -> bool:
    """Send ``data`` (ignoring a reset), then True when the peer closes without a byte."""
    try:
        sock.sendall(data)
        return sock.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_a_recorded_exchange_cannot_be_replayed(make_cluster: Cluster, monkeypatch: Any) -> None:
    monkeypatch.setenv("DPWA_TEST_SECRET", SECRET.decode())
    config = make_cluster(2, auth={"secret_env": "DPWA_TEST_SECRET"})
    with Node(config, "w1", layout=Layout.flat(4)) as node:
        node.update_send(np.ones(4, np.float32), 1.0)
        hello = hello_from("w2", "w1")
        with socket.create_connection(node.address, timeout=5) as first:
            challenge, result = manual_client(first, hello, None)
            assert auth.decode_prefix(result[:8], Step.RESULT) is Status.OK
            body = hello[8:]
            recorded = auth.encode(
                Step.PROOF,
                auth._mac(SECRET, "client", body[32:] + body[:32] + challenge[8:40]),
            )
        with socket.create_connection(node.address, timeout=5) as second:
            challenge2, result2 = manual_client(second, hello, recorded)
            assert challenge2[8:40] != challenge[8:40]  # a fresh server nonce
            assert auth.decode_prefix(result2[:8], Step.RESULT) is Status.REFUSED
            assert closed_without_answer(second, encode_header(MessageType.PULL, size=4))
        assert node.stats()["rejected"] >= 1


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DPWA_TEST_SECRET", SECRET.decode())
    monkeypatch.setenv("DPWA_OTHER_SECRET", "not the same secret")
    return "DPWA_TEST_SECRET"


def pull_once(node: Node, params: np.ndarray, tries: int = 5) -> list[Any]:
    results = []
    for _ in range(tries):
        node.update_send(params, 1.0)
        results.append(node.update_wait(1.0))
    return results


def test_nodes_with_the_same_secret_exchange(make_cluster: Cluster, secret_env: str) -> None:
    config = make_cluster(2, auth={"secret_env": secret_env})
    with Node(config, "w1") as a, Node(config, "w2") as b:
        a.update_send(np.full(100, 2.0, np.float32), 1.0)
        got = [r for r in pull_once(b, np.zeros(100, np.float32), 20) if r is not None]
        assert got and got[0].params[0] == 2.0


def test_different_secrets_never_exchange_parameters(
    make_cluster: Cluster, secret_env: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dpwa")
    config = make_cluster(2, auth={"secret_env": secret_env})
    other = {**config, "auth": {"secret_env": "DPWA_OTHER_SECRET"}}
    with Node(config, "w1") as a, Node(other, "w2") as b:
        a.update_send(np.full(100, 2.0, np.float32), 1.0)
        mine = np.zeros(100, np.float32)
        assert pull_once(b, mine, 5) == [None] * 5
        b.update_send(mine, 1.0)
        assert pull_once(a, np.zeros(100, np.float32), 5) == [None] * 5
        assert a.stats()["pulls_served"] == b.stats()["pulls_served"] == 0
        assert a.stats()["bytes_in"] == b.stats()["bytes_in"] == 0
        assert b.stats()["scores"]["w1"] < 0.1
    assert "could not prove it is" in caplog.text
    assert "refused our proof" in caplog.text
    # Once per peer and reason, not once per attempt.
    assert caplog.text.count("does not know the shared secret (its proof is wrong)") <= 2
    assert SECRET.decode() not in caplog.text


@pytest.mark.parametrize("authed", ["server", "client"])
def test_auth_on_one_side_only_fails_clearly_on_both(
    make_cluster: Cluster, secret_env: str, caplog: pytest.LogCaptureFixture, authed: str
) -> None:
    caplog.set_level(logging.WARNING, logger="dpwa")
    plain = make_cluster(2)
    with_auth = {**plain, "auth": {"secret_env": secret_env}}
    server_config, client_config = (with_auth, plain) if authed == "server" else (plain, with_auth)
    with Node(server_config, "w1") as a, Node(client_config, "w2") as b:
        a.update_send(np.full(10, 2.0, np.float32), 1.0)
        assert pull_once(b, np.zeros(10, np.float32), 3) == [None] * 3
        assert a.stats()["pulls_served"] == 0
    if authed == "server":
        assert "sent a request without authenticating" in caplog.text  # server's line
        assert "requires the shared-secret handshake" in caplog.text  # client's line
    else:
        assert "sent an auth handshake, but this node has no 'auth'" in caplog.text
        assert "the peer has no 'auth' configured but this node has" in caplog.text


def test_an_outsider_gets_no_parameters(make_cluster: Cluster, secret_env: str) -> None:
    config = make_cluster(1, auth={"secret_env": secret_env})
    with Node(config, "w1", layout=Layout.flat(4)) as node:
        node.update_send(np.ones(4, np.float32), 1.0)
        with socket.create_connection(node.address, timeout=5) as s:
            s.sendall(encode_header(MessageType.PULL, size=4, shape_hash=Layout.flat(4).shape_hash))
            answer = s.recv(HEADER.size, socket.MSG_WAITALL)
            assert decode_header(answer).type is MessageType.AUTH_REQUIRED
            assert closed_without_answer(s, b"")
        assert node.stats()["pulls_served"] == 0


def test_auth_config_errors(tmp_path: Path, make_cluster: Cluster, monkeypatch: Any) -> None:
    monkeypatch.delenv("DPWA_UNSET_SECRET", raising=False)
    monkeypatch.setenv("DPWA_EMPTY_SECRET", "")
    base = make_cluster(1)
    cases = {
        "DPWA_UNSET_SECRET.*is not set": {"secret_env": "DPWA_UNSET_SECRET"},
        "DPWA_EMPTY_SECRET.*is empty": {"secret_env": "DPWA_EMPTY_SECRET"},
        "exactly one of secret_env": {"secret_env": "A", "secret_file": "b"},
        "unknown 'secret'": {"secret": "hunter2"},
        "cannot read": {"secret_file": str(tmp_path / "missing")},
    }
    for message, section in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config({**base, "auth": section})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config({**base, "auth": {"secret_file": str(empty)}})


def test_secret_file_is_read_relative_to_the_config(tmp_path: Path, make_cluster: Cluster) -> None:
    (tmp_path / "secret.txt").write_text("s3cret-value\n")
    (tmp_path / "secret.txt").chmod(0o600)
    import yaml

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({**make_cluster(1), "auth": {"secret_file": "secret.txt"}}))
    config = load_config(path)
    assert config.auth is not None and config.auth.secret == b"s3cret-value"
    assert "s3cret" not in repr(config)
