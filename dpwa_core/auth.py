"""Shared-secret authentication: a mutual handshake that binds who talks to whom, then a MAC on
every message of the connection.

docs/PROTOCOL.md ("Shared-secret handshake") describes every byte. In short, on a new
connection, with ``T = client name | server name | nonce_c | nonce_s`` (the transcript)::

    client -> server  HELLO      nonce_c, client name, the server name it dialled
    server -> client  CHALLENGE  nonce_s, HMAC(secret, "dpwa-v2 server" | T)
    client -> server  PROOF      HMAC(secret, "dpwa-v2 client" | T)
    server -> client  RESULT     HMAC(secret, "dpwa-v2 result" | T | status)

Both nonces are 32 fresh random bytes, so a recorded exchange proves nothing on a new connection;
MACs are compared in constant time. Both proofs cover both names and both nonces, and each side
signs with its own label, so a handshake relayed to another node (the server's name differs), to
the client's own server (the client's name is the server's), or reflected back is refused. A
client that finds the server's MAC wrong says so instead of sending its own, so it never signs
for an impostor. The secret itself never crosses the wire and is never logged.

Then both sides derive one key per direction from the secret and the transcript, and every later
message (header and payload) is followed by ``HMAC(key, sequence | header | payload)``
(:class:`MessageMac`), so bytes after the handshake can be neither changed, swapped, replayed nor
reordered without the receiver refusing them. Confidentiality is TLS's job (``tls``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

from dpwa_core.errors import AuthError
from dpwa_core.secret import AuthSettings, file_is_private, load_secret
from dpwa_core.wire import HEADER, MAGIC, MessageType, decode_header, recv_exact, send_all

__all__ = [
    "AUTH_MAGIC",
    "AUTH_VERSION",
    "MAC_SIZE",
    "MAX_NAME_BYTES",
    "NONCE_SIZE",
    "PREFIX",
    "AuthSettings",
    "MessageMac",
    "Session",
    "Status",
    "Step",
    "check_name",
    "client_handshake",
    "decode_prefix",
    "encode",
    "file_is_private",
    "load_secret",
    "server_handshake",
]

AUTH_MAGIC = b"DPWH"
"""First four bytes of every handshake message; a wire header starts with ``DPWA`` instead."""
AUTH_VERSION = 2
"""Version 1 bound neither names nor later messages; a version-1 peer is refused."""
NONCE_SIZE = 32
MAC_SIZE = 32
MAX_NAME_BYTES = 64
"""Node names travel NUL-padded in 64-byte fields: at most 64 bytes of UTF-8, no NUL."""
PREFIX = struct.Struct("<4sBBH")
"""magic, version, step, status: the 8 bytes every handshake message starts with."""

_LABELS = {
    "server": b"dpwa-v2 server\x00",
    "client": b"dpwa-v2 client\x00",
    "result": b"dpwa-v2 result\x00",
    "session": b"dpwa-v2 session\x00",
}
_DIRECTIONS = (b"client to server", b"server to client")


class Step(enum.IntEnum):
    """Which handshake message this is; the prefix's sixth byte."""

    HELLO = 1
    """Client to server: the client's nonce, its name and the name of the server it dialled."""
    CHALLENGE = 2
    """Server to client: the server's nonce and its MAC, or a refusal of the names."""
    PROOF = 3
    """Client to server: the client's MAC, or a refusal of the server's."""
    RESULT = 4
    """Server to client: whether the client's MAC was accepted, itself authenticated."""


class Status(enum.IntEnum):
    """The prefix's status field: 0 unless a side refuses the other."""

    OK = 0
    REFUSED = 1
    """A MAC is wrong: the secrets differ."""
    UNKNOWN_CLIENT = 2
    """CHALLENGE: the server does not accept the client's name (not a member, or its own)."""
    WRONG_SERVER = 3
    """CHALLENGE: the client dialled another node's name than the server's."""


_BODY = {
    Step.HELLO: NONCE_SIZE + 2 * MAX_NAME_BYTES,
    Step.CHALLENGE: NONCE_SIZE + MAC_SIZE,
    Step.PROOF: MAC_SIZE,
    Step.RESULT: MAC_SIZE,
}


def check_name(name: str) -> bytes:
    """``name`` as its handshake field: UTF-8, at most :data:`MAX_NAME_BYTES`, no NUL.

    Raises:
        ValueError: the name is empty, too long or holds a NUL character.
    """
    raw = name.encode("utf-8")
    if not raw or len(raw) > MAX_NAME_BYTES or b"\0" in raw:
        raise ValueError(
            f"node name {name[:80]!r} cannot be used with auth: a name must be 1 to "
            f"{MAX_NAME_BYTES} bytes of UTF-8 without NUL characters"
        )
    return raw.ljust(MAX_NAME_BYTES, b"\0")


def _decode_name(field: bytes) -> str | None:
    """A received name field, or None when it is not one :func:`check_name` would make."""
    raw = field.rstrip(b"\0")
    if not raw or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class MessageMac:
    """Authenticates the messages of one direction of one connection, in order.

    Each message's tag is ``HMAC-SHA256(key, sequence | message bytes)``, where ``sequence``
    counts this direction's messages from 0 as a little-endian uint64: a message cannot be
    replayed, dropped or moved without the next tag failing.

    Args:
        key: this direction's key, derived in the handshake.
    """

    def __init__(self, key: bytes) -> None:
        self._base = hmac.new(key, digestmod=hashlib.sha256)
        self._sequence = 0

    def begin(self) -> hmac.HMAC:
        """Start the next message's MAC; feed it the header, then the payload, in order."""
        mac = self._base.copy()
        mac.update(self._sequence.to_bytes(8, "little"))
        self._sequence += 1
        return mac

    def tag(self, *parts: bytes | bytearray | memoryview) -> bytes:
        """The next message's tag over ``parts``, for short messages."""
        mac = self.begin()
        for part in parts:
            mac.update(part)
        return mac.digest()

    def check(self, tag: bytes | bytearray | memoryview, *parts: bytes | memoryview) -> None:
        """Check a received short message's tag (see :meth:`verify`)."""
        mac = self.begin()
        for part in parts:
            mac.update(part)
        self.verify(mac, tag)

    @staticmethod
    def verify(mac: hmac.HMAC, tag: bytes | bytearray | memoryview) -> None:
        """Check a received tag against the MAC of what was received.

        Raises:
            AuthError: the tag is wrong: the message was changed, replayed or reordered.
        """
        if not hmac.compare_digest(mac.digest(), bytes(tag)):
            raise AuthError(
                "message authentication failed: the bytes after the handshake were changed, "
                "replayed or reordered on the way"
            )


@dataclass
class Session:
    """An authenticated connection: the peer's proven name and one MAC per direction."""

    peer: str
    """The name the peer proved (the client's name on a server, the dialled one on a client)."""
    send: MessageMac
    """Tags the messages we send."""
    receive: MessageMac
    """Checks the messages we receive."""


def _transcript(client: bytes, server: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
    return client + server + nonce_c + nonce_s


def _mac(secret: bytes, label: str, transcript: bytes, extra: bytes = b"") -> bytes:
    return hmac.new(secret, _LABELS[label] + transcript + extra, hashlib.sha256).digest()


def _session(secret: bytes, transcript: bytes, peer: str, *, server: bool) -> Session:
    master = _mac(secret, "session", transcript)
    to_server, to_client = (
        MessageMac(hmac.new(master, d, hashlib.sha256).digest()) for d in _DIRECTIONS
    )
    if server:
        return Session(peer, send=to_client, receive=to_server)
    return Session(peer, send=to_server, receive=to_client)


def encode(step: Step, body: bytes = b"", status: Status = Status.OK) -> bytes:
    """Pack one handshake message: the 8-byte prefix, then ``body`` (zeros if empty)."""
    body = body or bytes(_BODY[step])
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
        raise AuthError(
            f"the peer speaks handshake version {version}, this node speaks {AUTH_VERSION}: "
            "run the same dpwa release on every node"
        )
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


def client_handshake(
    sock: socket.socket, secret: bytes, deadline: float, *, name: str, peer: str
) -> Session:
    """Prove to the server ``peer`` that we are ``name`` and know ``secret``, and check it.

    Args:
        sock: a freshly connected socket (or TLS socket); nothing has been sent on it yet.
        secret: the shared secret.
        deadline: ``time.monotonic()`` value by which the handshake must be done.
        name: this node's name.
        peer: the name of the node we dialled; the server must prove that it is that node.

    Returns:
        The connection's :class:`Session`: every later message is tagged with it.

    Raises:
        AuthError: the server does not know the secret, is not ``peer``, refused us, has no auth
            configured, or broke the handshake protocol.
        TimeoutError: the deadline passed.
        ConnectionError: the server closed the connection.
    """
    ours, theirs = check_name(name), check_name(peer)
    nonce_c = secrets.token_bytes(NONCE_SIZE)
    send_all(sock, encode(Step.HELLO, nonce_c + ours + theirs), deadline)
    first = bytearray(PREFIX.size)
    try:
        recv_exact(sock, memoryview(first), deadline)
    except ConnectionError:
        raise ConnectionError(
            "the peer closed the connection at our handshake HELLO: a different dpwa release "
            "(handshake version), no auth there, or it made room for other connections; its "
            "log says which"
        ) from None
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
    status = decode_prefix(first, Step.CHALLENGE)
    body = bytearray(_BODY[Step.CHALLENGE])
    recv_exact(sock, memoryview(body), deadline)
    if status is Status.UNKNOWN_CLIENT:
        raise AuthError(
            f"{peer} refuses the name {name!r}: it is not in that node's config (or is its own)"
        )
    if status is Status.WRONG_SERVER:
        raise AuthError(
            f"the node at {peer}'s address is not {peer}: it refused a handshake for that name"
        )
    nonce_s, their_mac = bytes(body[:NONCE_SIZE]), bytes(body[NONCE_SIZE:])
    transcript = _transcript(ours, theirs, nonce_c, nonce_s)
    if status is not Status.OK or not hmac.compare_digest(
        their_mac, _mac(secret, "server", transcript)
    ):
        # Say so, so the server logs a clear reason, but sign nothing for an impostor.
        send_all(sock, encode(Step.PROOF, status=Status.REFUSED), deadline)
        raise AuthError(
            f"the peer at {peer}'s address could not prove it is {peer} with the shared secret"
        )
    send_all(sock, encode(Step.PROOF, _mac(secret, "client", transcript)), deadline)
    status, result = _receive(sock, Step.RESULT, deadline)
    expected = _mac(secret, "result", transcript, bytes([status]))
    if not hmac.compare_digest(result, expected):
        raise AuthError("the peer's handshake RESULT is not authentic")
    if status is not Status.OK:
        raise AuthError("the peer refused our proof: the secrets differ")
    return _session(secret, transcript, peer, server=False)


def server_handshake(
    sock: socket.socket,
    secret: bytes,
    deadline: float,
    magic: bytes | bytearray,
    *,
    name: str,
    members: Collection[str] = (),
) -> Session:
    """Check that the client knows ``secret`` and is a member, prove that we are ``name``.

    Args:
        sock: the accepted connection, of which the first four bytes (``magic``) are read.
        secret: the shared secret.
        deadline: ``time.monotonic()`` value by which the handshake must be done.
        magic: the four bytes already read; must be :data:`AUTH_MAGIC`.
        name: this node's name; a client that dialled another name is refused.
        members: the names a client may have (the config's nodes); empty accepts any name but
            our own.

    Returns:
        The connection's :class:`Session`; ``session.peer`` is the client's proven name.

    Raises:
        AuthError: the client does not know the secret, claims a name we refuse, dialled
            another node, refused our proof, or broke the protocol.
        TimeoutError: the deadline passed.
        ConnectionError: the client closed the connection.
    """
    hello = bytearray(PREFIX.size + _BODY[Step.HELLO])
    hello[:4] = magic
    view = memoryview(hello)
    recv_exact(sock, view[4 : PREFIX.size], deadline)
    try:
        decode_prefix(view[: PREFIX.size], Step.HELLO)
    except AuthError:
        # Answer in our version: a peer of another release logs both versions, not a timeout.
        send_all(sock, encode(Step.CHALLENGE, status=Status.REFUSED), deadline)
        raise
    recv_exact(sock, view[PREFIX.size :], deadline)
    body = bytes(view[PREFIX.size :])
    nonce_c = body[:NONCE_SIZE]
    ours = check_name(name)
    client_field = body[NONCE_SIZE : NONCE_SIZE + MAX_NAME_BYTES]
    server_field = body[NONCE_SIZE + MAX_NAME_BYTES :]
    client = _decode_name(client_field)
    if server_field != ours:
        send_all(sock, encode(Step.CHALLENGE, status=Status.WRONG_SERVER), deadline)
        dialled = _decode_name(server_field)
        raise AuthError(
            f"the client dialled {'an invalid name' if dialled is None else repr(dialled[:64])}, "
            f"not this node ({name}): a relayed or misdirected handshake"
        )
    if client is None or client == name or (members and client not in members):
        send_all(sock, encode(Step.CHALLENGE, status=Status.UNKNOWN_CLIENT), deadline)
        why = (
            "an invalid name"
            if client is None
            else "this node's own name (a reflected handshake)"
            if client == name
            else f"the name {client[:64]!r}, which is not in this node's config"
        )
        raise AuthError(f"the client claims {why}")
    nonce_s = secrets.token_bytes(NONCE_SIZE)
    transcript = _transcript(client_field, ours, nonce_c, nonce_s)
    send_all(sock, encode(Step.CHALLENGE, nonce_s + _mac(secret, "server", transcript)), deadline)
    status, their_mac = _receive(sock, Step.PROOF, deadline)
    if status is not Status.OK:
        raise AuthError("the peer refused our proof: it does not share this node's secret")
    if not hmac.compare_digest(their_mac, _mac(secret, "client", transcript)):
        refused = _mac(secret, "result", transcript, bytes([Status.REFUSED]))
        send_all(sock, encode(Step.RESULT, refused, Status.REFUSED), deadline)
        raise AuthError(
            f"the client claiming to be {client[:64]!r} does not know the shared secret "
            "(its proof is wrong)"
        )
    send_all(sock, encode(Step.RESULT, _mac(secret, "result", transcript, b"\x00")), deadline)
    return _session(secret, transcript, client, server=True)
