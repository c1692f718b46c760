"""Shared-secret authentication: a mutual HMAC-SHA256 challenge-response on every connection.

docs/PROTOCOL.md ("Authentication") describes every byte. In short, on a new connection::

    client -> server  HELLO      nonce_c
    server -> client  CHALLENGE  nonce_s, HMAC(secret, "dpwa-server\\0" | nonce_c | nonce_s)
    client -> server  PROOF      HMAC(secret, "dpwa-client\\0" | nonce_s | nonce_c)
    server -> client  RESULT     accepted or refused

Both nonces are 32 fresh random bytes, so a recorded exchange proves nothing on a new connection;
MACs are compared in constant time. A client that finds the server's MAC wrong says so instead
of sending its own MAC, so it never computes a MAC over a nonce an impostor chose for it to sign
in vain. The secret itself never crosses the wire and is never logged.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import socket
import struct

from dpwa_core.errors import AuthError
from dpwa_core.secret import AuthSettings, file_is_private, load_secret
from dpwa_core.wire import HEADER, MAGIC, MessageType, decode_header, recv_exact, send_all

__all__ = [
    "AUTH_MAGIC",
    "AUTH_VERSION",
    "MAC_SIZE",
    "NONCE_SIZE",
    "PREFIX",
    "AuthSettings",
    "Status",
    "Step",
    "client_handshake",
    "client_mac",
    "decode_prefix",
    "encode",
    "file_is_private",
    "load_secret",
    "server_handshake",
    "server_mac",
]

AUTH_MAGIC = b"DPWH"
"""First four bytes of every handshake message; a wire header starts with ``DPWA`` instead."""
AUTH_VERSION = 1
NONCE_SIZE = 32
MAC_SIZE = 32
PREFIX = struct.Struct("<4sBBH")
"""magic, version, step, status: the 8 bytes every handshake message starts with."""

_SERVER_LABEL = b"dpwa-server\x00"
_CLIENT_LABEL = b"dpwa-client\x00"


class Step(enum.IntEnum):
    """Which handshake message this is; the prefix's sixth byte."""

    HELLO = 1
    """Client to server: the client's nonce."""
    CHALLENGE = 2
    """Server to client: the server's nonce and its MAC."""
    PROOF = 3
    """Client to server: the client's MAC, or a refusal of the server's."""
    RESULT = 4
    """Server to client: whether the client's MAC was accepted."""


class Status(enum.IntEnum):
    """The prefix's status field: 0 unless a side refuses the other."""

    OK = 0
    REFUSED = 1


_BODY = {
    Step.HELLO: NONCE_SIZE,
    Step.CHALLENGE: NONCE_SIZE + MAC_SIZE,
    Step.PROOF: MAC_SIZE,
    Step.RESULT: 0,
}


def server_mac(secret: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
    """The server's proof: ``HMAC-SHA256(secret, "dpwa-server\\0" | nonce_c | nonce_s)``."""
    return hmac.new(secret, _SERVER_LABEL + nonce_c + nonce_s, hashlib.sha256).digest()


def client_mac(secret: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    """The client's proof: ``HMAC-SHA256(secret, "dpwa-client\\0" | nonce_s | nonce_c)``."""
    return hmac.new(secret, _CLIENT_LABEL + nonce_s + nonce_c, hashlib.sha256).digest()


def encode(step: Step, body: bytes = b"", status: Status = Status.OK) -> bytes:
    """Pack one handshake message: the 8-byte prefix, then ``body``."""
    if len(body) != _BODY[step]:
        raise ValueError(f"{step.name} carries {_BODY[step]} bytes, got {len(body)}")
    return PREFIX.pack(AUTH_MAGIC, AUTH_VERSION, step, status) + body


def decode_prefix(data: bytes | bytearray | memoryview, expected: Step) -> Status:
    """Check a handshake message's 8-byte prefix; returns its status.

    Raises:
        AuthError: wrong size, magic, version, step or status, naming the first wrong field.
    """
    if len(data) != PREFIX.size:
        raise AuthError(f"handshake prefix is {len(data)} bytes, expected {PREFIX.size}")
    magic, version, step, status = PREFIX.unpack(data)
    if magic != AUTH_MAGIC:
        raise AuthError(f"bad handshake magic {bytes(magic)!r}, expected {AUTH_MAGIC!r}")
    if version != AUTH_VERSION:
        raise AuthError(f"handshake version {version}, this node speaks {AUTH_VERSION}")
    if step != expected:
        name = Step(step).name if step in Step._value2member_map_ else str(step)
        raise AuthError(f"expected handshake step {expected.name}, got {name}")
    if status not in Status._value2member_map_:
        raise AuthError(f"unknown handshake status {status}")
    return Status(status)


def _receive(sock: socket.socket, step: Step, deadline: float) -> tuple[Status, bytes]:
    """Receive one whole handshake message of type ``step``."""
    data = bytearray(PREFIX.size + _BODY[step])
    view = memoryview(data)
    recv_exact(sock, view[: PREFIX.size], deadline)
    status = decode_prefix(view[: PREFIX.size], step)
    recv_exact(sock, view[PREFIX.size :], deadline)
    return status, bytes(view[PREFIX.size :])


def client_handshake(sock: socket.socket, secret: bytes, deadline: float) -> None:
    """Prove to the server that we know ``secret``, and check that it does too.

    Args:
        sock: a freshly connected socket (or TLS socket); nothing has been sent on it yet.
        secret: the shared secret.
        deadline: ``time.monotonic()`` value by which the handshake must be done.

    Raises:
        AuthError: the server does not know the secret, refused ours, has no auth configured,
            or broke the handshake protocol.
        TimeoutError: the deadline passed.
        ConnectionError: the server closed the connection.
    """
    nonce_c = secrets.token_bytes(NONCE_SIZE)
    send_all(sock, encode(Step.HELLO, nonce_c), deadline)
    first = bytearray(PREFIX.size)
    recv_exact(sock, memoryview(first), deadline)
    if first[:4] == MAGIC:  # a wire header: the server speaks no handshake
        rest = bytearray(HEADER.size - PREFIX.size)
        recv_exact(sock, memoryview(rest), deadline)
        header = decode_header(bytes(first) + bytes(rest))
        if header.type is MessageType.TLS_REQUIRED:
            raise AuthError(
                "the peer requires TLS, but this node has no 'tls' configured; give every node "
                "the cluster's tls section"
            )
        if header.type is MessageType.NO_AUTH:
            raise AuthError(
                "the peer has no 'auth' configured but this node has; give every node the "
                "same auth section"
            )
        raise AuthError(f"expected a handshake CHALLENGE, got a {header.type.name} message")
    decode_prefix(first, Step.CHALLENGE)
    body = bytearray(NONCE_SIZE + MAC_SIZE)
    recv_exact(sock, memoryview(body), deadline)
    nonce_s, their_mac = bytes(body[:NONCE_SIZE]), bytes(body[NONCE_SIZE:])
    if not hmac.compare_digest(their_mac, server_mac(secret, nonce_c, nonce_s)):
        # Say so, so the server logs a clear reason, but sign nothing for an impostor.
        send_all(sock, encode(Step.PROOF, bytes(MAC_SIZE), Status.REFUSED), deadline)
        raise AuthError("the peer does not know the shared secret (its proof is wrong)")
    send_all(sock, encode(Step.PROOF, client_mac(secret, nonce_s, nonce_c)), deadline)
    status, _ = _receive(sock, Step.RESULT, deadline)
    if status is not Status.OK:
        raise AuthError("the peer refused our proof: the secrets differ")


def server_handshake(
    sock: socket.socket, secret: bytes, deadline: float, magic: bytes | bytearray
) -> None:
    """Check that the client knows ``secret`` and prove that we do; returns when it is in.

    Args:
        sock: the accepted connection, of which the first four bytes (``magic``) are read.
        secret: the shared secret.
        deadline: ``time.monotonic()`` value by which the handshake must be done.
        magic: the four bytes already read; must be :data:`AUTH_MAGIC`.

    Raises:
        AuthError: the client does not know the secret, refused ours, or broke the protocol.
        TimeoutError: the deadline passed.
        ConnectionError: the client closed the connection.
    """
    hello = bytearray(PREFIX.size + NONCE_SIZE)
    hello[:4] = magic
    view = memoryview(hello)
    recv_exact(sock, view[4 : PREFIX.size], deadline)
    decode_prefix(view[: PREFIX.size], Step.HELLO)
    recv_exact(sock, view[PREFIX.size :], deadline)
    nonce_c = bytes(view[PREFIX.size :])
    nonce_s = secrets.token_bytes(NONCE_SIZE)
    send_all(sock, encode(Step.CHALLENGE, nonce_s + server_mac(secret, nonce_c, nonce_s)), deadline)
    status, their_mac = _receive(sock, Step.PROOF, deadline)
    if status is Status.REFUSED:
        raise AuthError("the peer refused our proof: it does not share this node's secret")
    if not hmac.compare_digest(their_mac, client_mac(secret, nonce_s, nonce_c)):
        send_all(sock, encode(Step.RESULT, status=Status.REFUSED), deadline)
        raise AuthError("the peer does not know the shared secret (its proof is wrong)")
    send_all(sock, encode(Step.RESULT), deadline)
