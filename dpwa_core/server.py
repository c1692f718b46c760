"""The server side of a node: answers peers' pulls with the published snapshot.

One listener thread accepts connections; each connection gets a thread that waits for PULL
requests and answers them from the pinned snapshot, so a slow peer only slows its own
connection. Connections are persistent: a peer sends the next PULL on the same socket.

Parameters go out in the node's ``wire_dtype``, converted chunk by chunk as they are sent. A
PULL flagged :data:`~dpwa_core.wire.FLAG_SHM` from a co-located peer is answered with where the
pinned snapshot sits in shared memory instead (when the node keeps its snapshots there).

A new connection must finish its opening (TLS handshake when configured, the shared-secret
handshake when configured, and its first request) within ``timeout`` seconds of being accepted;
every later request must arrive whole within :data:`REQUEST_DEADLINE` of its first byte. With
``auth``, the handshake binds the client's and this node's names, and every later message in
both directions carries a tag (:class:`~dpwa_core.auth.MessageMac`).

Connections are capped, in all and per source address. When a newcomer finds no room, a
connection is closed: one still opening, else one whose request has started but not arrived,
else the one idle the longest, else the oldest being answered; within each, first those of
addresses where no configured node lives, then of the address holding the most. So neither
idle, slow nor stalled connections, from one address or many, can lock valid peers out.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpwa_core._log import OncePerPeer, get_logger, reason_of
from dpwa_core.auth import AUTH_MAGIC, MAC_SIZE, Session, check_name, server_handshake
from dpwa_core.errors import AuthError, ProtocolError
from dpwa_core.layout import Layout, describe_fingerprint
from dpwa_core.shm import SharedSegment
from dpwa_core.snapshot import SnapshotBuffer
from dpwa_core.state_share import StateLayout, StateShare
from dpwa_core.wire import (
    FLAG_IF_IDLE,
    FLAG_SHM,
    FLAG_STATE,
    HEADER,
    MAGIC,
    MAX_TEXT_PAYLOAD,
    Header,
    MessageType,
    ShmAnswer,
    VersionError,
    decode_header,
    encode_header,
    recv_exact,
    send_all,
    slice_bounds,
    transfer_deadline,
)
from dpwa_core.wire_dtype import SCRATCH_BYTES, WireDType, encode_chunks, wire_dtype_for

__all__ = ["FRESH_WAIT", "MAX_PER_HOST", "REQUEST_DEADLINE", "Server"]

_log = get_logger("server")
FRESH_WAIT = 0.25
"""Seconds a PULL waits for a lazily publishing trainer's next snapshot (see
:meth:`~dpwa_core.snapshot.SnapshotBuffer.want`) before the previous one is sent."""
_ACCEPT_POLL = 0.1  # seconds; bounds how long close() waits for the listener thread
_TLS_RECORD = 0x16  # first byte of a TLS handshake record
REQUEST_DEADLINE = 0.5
"""Seconds (at most ``timeout``) a request has to arrive whole once its first byte has: a
request is one small message, sent at once."""
MAX_PER_HOST = 32
"""Connections one source address may hold, unless a configured node lives there."""

# What a connection is doing; a newcomer evicts in this order (lower first).
_OPENING, _STARTED, _IDLE, _ANSWERING = range(4)


@dataclass(eq=False)
class _Connection:
    """One accepted connection and where it is in its life."""

    sock: socket.socket
    peer: str
    opened: float
    state: int = _OPENING
    """What it is doing: opening, a request started, idle, or being answered."""
    since: float = 0.0
    """When it entered ``state``."""
    open_done: bool = False
    """The opening (TLS, handshake, first request) is over."""
    session: Session | None = None
    """The handshake's session with ``auth``: every later message is tagged with it."""
    evicted: bool = False
    scratch: np.ndarray | None = None
    """Conversion buffer for answers in a narrower wire dtype, made at the first one."""

    @property
    def host(self) -> str:
        """The source address, without the port."""
        return self.peer.rsplit(":", 1)[0]

    def enter(self, state: int) -> None:
        """Record that the connection now does ``state``."""
        self.state, self.since = state, time.monotonic()


class Server:
    """Serve the published snapshot on ``(host, port)``.

    Args:
        host: address to bind.
        port: port to bind (0 picks a free one).
        timeout: seconds a peer has to open a connection (handshakes and first request) and to
            finish each request once started, and we to send an answer.
        max_connections: connections held at once; at the cap, or at ``max_per_host`` for the
            newcomer's address, a connection of the address holding the most is closed to make
            room (see the module's docstring).
        max_per_host: connections one source address may hold, unless it is the address of one
            of ``member_hosts``.
        idle_timeout: seconds an idle persistent connection is kept open.
        secret: the shared secret every connection must prove (see :mod:`dpwa_core.auth`), or
            None to serve anyone who connects.
        tls: a server TLS context (see :mod:`dpwa_core.tls`), or None for plain TCP.
        wire_dtype: the element type parameters are sent as over TCP, or ``"auto"``.
        name: this node's name, which the handshake binds; clients that dialled another name,
            or claim this one, are refused.
        members: the names the handshake accepts from clients (the config's nodes); empty
            accepts any name but our own.
        member_hosts: hosts (names or addresses) of the configured nodes, exempt from
            ``max_per_host``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        *,
        max_connections: int = 256,
        max_per_host: int = MAX_PER_HOST,
        idle_timeout: float = 120.0,
        secret: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        wire_dtype: WireDType | str = WireDType.FLOAT32,
        name: str = "server",
        members: Iterable[str] = (),
        member_hosts: Iterable[str] = (),
    ) -> None:
        self.name = name
        """This node's name: the handshake binds it, and refuses clients that claim it."""
        self.members = set(members)
        """Names the handshake accepts from clients (the config's nodes); empty: any name."""
        if secret is not None:
            for member in (name, *self.members):
                check_name(member)  # raises ValueError for a name the handshake cannot carry
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_per_host = max_per_host
        self._member_hosts = set(member_hosts)
        self._member_addresses: set[str] = set()  # resolved in the listener thread
        self.idle_timeout = idle_timeout
        self._secret = secret
        self._tls = tls
        self._source: tuple[Layout, SnapshotBuffer] | None = None
        self._state: StateShare | None = None
        self._status: Callable[[], dict[str, Any]] | None = None
        self.served_state = 0
        """Optimizer states sent to joining peers."""
        self._closed = threading.Event()
        self._conns: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._rejections = OncePerPeer(_log)
        self.wire_dtype = wire_dtype
        """What this server sends parameters as over TCP: a dtype, or ``"auto"`` (int8 to other
        hosts, float32 to loopback peers: :func:`~dpwa_core.wire_dtype.wire_dtype_for`)."""
        self.served = 0
        self.served_shm = 0
        """Pulls answered with a shared-memory address instead of the parameters."""
        self.bytes_out = 0
        self.rejected = 0
        """Connections closed for a bad request, a failed handshake or a timeout."""
        self.evicted = 0
        """Connections closed to make room for new ones."""
        self.served_busy = 0
        """PULLs flagged IF_IDLE answered BUSY because parameters were going out to a peer."""
        self._sending = 0  # answers streaming parameters over TCP right now
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as exc:
            listener.close()
            raise OSError(
                exc.errno,
                f"cannot listen on {host}:{port}: {exc.strerror}. Is another node already "
                "using this address? Change the node's port in the config.",
            ) from exc
        listener.listen(1024)  # a burst of connections waits here instead of being dropped
        listener.settimeout(_ACCEPT_POLL)
        self._listener = listener
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"dpwa-server-{self.address[1]}", daemon=True
        )
        self._thread.start()

    def set_source(self, layout: Layout, snapshots: SnapshotBuffer) -> None:
        """Start answering pulls from ``snapshots``, whose parameters follow ``layout``."""
        self._source = (layout, snapshots)

    def set_status(self, status: Callable[[], dict[str, Any]]) -> None:
        """Answer STATUS requests (``dpwa status``) with ``status()`` as JSON."""
        self._status = status

    def set_state(self, share: StateShare | None) -> None:
        """Answer STATE pulls (a joiner's catch-up) from ``share``; None answers NOT_READY."""
        self._state = share

    @property
    def connections(self) -> int:
        """Connections open right now."""
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        """Stop accepting, drop every connection, free the port, and end the threads."""
        self._closed.set()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn.sock)
        self._thread.join(timeout=2 * _ACCEPT_POLL + 0.5)
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        end = time.monotonic() + 0.3  # shut-down sockets end their threads at once
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))

    def add_member(self, name: str, host: str) -> None:
        """Accept handshakes from ``name`` too, and exempt ``host`` from the per-host cap."""
        if self._secret is not None:
            check_name(name)
        with self._lock:
            if self.members:
                self.members.add(name)
            self._member_addresses.update(_addresses(host))

    def _accept_loop(self) -> None:
        addresses = {a for host in self._member_hosts for a in _addresses(host)}
        with self._lock:
            self._member_addresses |= addresses
        while not self._closed.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(_ACCEPT_POLL)  # e.g. out of file descriptors: back off, keep serving
                continue
            now = time.monotonic()
            conn = _Connection(sock, f"{addr[0]}:{addr[1]}", now, since=now)
            if not self._admit(conn):
                sock.close()
                continue
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve, args=(conn,), name=f"dpwa-conn-{conn.peer}", daemon=True
            )
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _admit(self, conn: _Connection) -> bool:
        """Make room for ``conn`` if a cap is reached; False when nothing could be closed."""
        victim = None
        full = False
        host = conn.host
        with self._lock:
            held = sum(1 for c in self._conns if c.host == host)
            per_host = held >= self.max_per_host and host not in self._member_addresses
            if per_host or len(self._conns) >= self.max_connections:
                victim = self._victim(host if per_host else None)
                if victim is None:
                    self.rejected += 1
                    full = True
                else:
                    victim.evicted = True
                    self._conns.discard(victim)
                    self.evicted += 1
            if not full:
                self._conns.add(conn)
        if full:
            self._rejections.warning(
                host,
                "full",
                "refused %s: all %d connections%s are being answered",
                conn.peer,
                self.max_per_host if per_host else self.max_connections,
                f" from {host}" if per_host else "",
            )
            return False
        if victim is not None:
            _shutdown(victim.sock)
            self._rejections.warning(
                victim.host,
                "evicted",
                "closed %s connection from %s to make room for %s: %d connections open",
                ("an opening", "a stalled", "an idle", "an answered")[victim.state],
                victim.peer,
                conn.peer,
                len(self._conns),
            )
        return True

    def _victim(self, host: str | None) -> _Connection | None:
        """The connection to close for a newcomer (the lock is held), or None.

        From ``host`` when given (it holds its cap), else from anyone: one still opening
        (anyone can make them), else one whose request started but did not arrive, else the
        longest idle, else the oldest being answered. Within each, addresses of no configured
        node go first, then the address holding the most. A peer's kept-alive connection is
        idle or answered and its openings are short, so stalling connections go first, from
        one address or many.
        """
        conns = [c for c in self._conns if host is None or c.host == host]
        if not conns:
            return None
        held: dict[str, int] = {}
        for c in self._conns:
            held[c.host] = held.get(c.host, 0) + 1
        members = self._member_addresses
        return min(conns, key=lambda c: (c.state, c.host in members, -held[c.host], c.since))

    def _serve(self, conn: _Connection) -> None:
        peer = conn.peer
        host = peer.rsplit(":", 1)[0]
        try:
            self._open(conn)
            self._loop(conn)
        except _Done:
            pass
        except ProtocolError as exc:  # AuthError included
            if conn.evicted or self._closed.is_set():
                _log.debug("connection from %s ended: %s", peer, exc)
            else:
                self._reject(host, f"closed connection from {peer}: {exc}", reason_of(str(exc)))
        except TimeoutError:
            stage = "its request or our answer" if conn.open_done else "its opening"
            self._reject(
                host, f"closed connection from {peer}: {stage} took too long", f"timeout:{stage}"
            )
        except ssl.SSLError as exc:
            if conn.evicted or self._closed.is_set() or isinstance(exc, ssl.SSLEOFError):
                _log.debug("TLS connection from %s ended: %s", peer, exc)
            else:
                self._reject(
                    host,
                    f"closed connection from {peer}: TLS failed: {exc.reason or exc}. Does the "
                    "peer have the cluster's tls section and a certificate signed by its CA?",
                    f"tls:{exc.reason}",
                )
        except OSError as exc:
            _log.debug("connection from %s ended: %s", peer, exc)
        except Exception:  # a bug must cost one connection, never the server
            _log.exception("closed connection from %s after an unexpected error", peer)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.sock.close()

    def _reject(self, host: str, text: str, reason: str) -> None:
        with self._lock:
            self.rejected += 1
        self._rejections.warning(host, reason, "%s", text)

    def _open(self, conn: _Connection) -> None:
        """TLS, then the handshake, then the first request, all by one deadline."""
        deadline = conn.opened + self.timeout
        if self._tls is not None:
            conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
            first = conn.sock.recv(1, socket.MSG_PEEK)
            if first and first[0] != _TLS_RECORD:
                if first[0] == MAGIC[0]:  # a dpwa peer without TLS: tell it, in plain text
                    self._refuse(conn.sock, MessageType.TLS_REQUIRED)
                raise ProtocolError(
                    "the peer does not speak TLS, but this node requires it; give every node "
                    "the cluster's tls section"
                )
            tls_sock = self._tls.wrap_socket(
                conn.sock, server_side=True, do_handshake_on_connect=False
            )
            with self._lock:
                conn.sock = tls_sock  # close() and eviction must shut this one down
                evicted = conn.evicted
            if evicted:
                raise ConnectionError("evicted")
            tls_sock.settimeout(max(0.001, deadline - time.monotonic()))
            tls_sock.do_handshake()
        header = memoryview(bytearray(HEADER.size))
        recv_exact(conn.sock, header[:4], deadline)
        magic = bytes(header[:4])
        if magic == AUTH_MAGIC:
            if self._secret is None:
                self._refuse(conn.sock, MessageType.NO_AUTH)
                raise AuthError(
                    "the peer sent an auth handshake, but this node has no 'auth' configured; "
                    "give every node the same auth section"
                )
            conn.session = server_handshake(
                conn.sock, self._secret, deadline, magic, name=self.name, members=self.members
            )
            conn.open_done = True
            return  # the first request follows like any later one
        if magic == MAGIC:
            recv_exact(conn.sock, header[4:], deadline)
            try:
                request = decode_header(header)
            except VersionError:
                self._refuse(conn.sock, MessageType.UNSUPPORTED_VERSION)
                raise
            if self._secret is not None:
                self._refuse(conn.sock, MessageType.AUTH_REQUIRED)
                raise AuthError(
                    "the peer sent a request without authenticating; this node requires the "
                    "shared-secret handshake: give the peer the same 'auth' section"
                )
            conn.open_done = True
            self._handle(conn, request)
            return
        if magic[0] == _TLS_RECORD and self._tls is None:
            raise ProtocolError("the peer speaks TLS, but this node has no 'tls' configured")
        raise ProtocolError(f"bad magic {magic!r}, expected {MAGIC!r}: not a dpwa peer")

    def _loop(self, conn: _Connection) -> None:
        """Answer requests on an opened connection until it closes."""
        session = conn.session
        message = memoryview(bytearray(HEADER.size + (MAC_SIZE if session else 0)))
        header = message[: HEADER.size]
        while not self._closed.is_set() and not conn.evicted:
            # Idle peers may wait long for their next pull; a started request must finish fast.
            conn.enter(_IDLE)
            conn.sock.settimeout(self.idle_timeout)
            try:
                got = conn.sock.recv_into(message[:1], 1)
            except TimeoutError:
                _log.debug("closed idle connection from %s", conn.peer)
                return
            if got == 0:
                return
            conn.enter(_STARTED)
            recv_exact(conn.sock, message[1:], time.monotonic() + self._request_deadline)
            if session is not None:
                session.receive.check(message[HEADER.size :], header)
            self._handle(conn, decode_header(header))

    @property
    def _request_deadline(self) -> float:
        return min(self.timeout, REQUEST_DEADLINE)

    def _handle(self, conn: _Connection, request: Header) -> None:
        if request.type is MessageType.STATUS:
            conn.enter(_ANSWERING)
            self._answer_status(conn)
            return
        if request.type is not MessageType.PULL:
            raise ProtocolError(f"expected a PULL request, got {request.type.name}")
        conn.enter(_ANSWERING)
        if not self._answer(conn, request):
            raise _Done

    def _refuse(self, sock: socket.socket, kind: MessageType) -> None:
        with contextlib.suppress(OSError):  # best effort: the log line is what matters
            send_all(sock, encode_header(kind), time.monotonic() + min(self.timeout, 1.0))

    def _send(self, connection: _Connection, deadline: float, message: bytes) -> None:
        """Send one whole short message, with its tag when the connection has a session."""
        if connection.session is not None:
            message += connection.session.send.tag(message)
        send_all(connection.sock, message, deadline)

    def _answer(self, connection: _Connection, request: Header) -> bool:
        """Answer one PULL; False when the connection must close."""
        if request.flags & FLAG_STATE:
            return self._answer_state(connection, request)
        size, shape_hash = request.size, request.shape_hash
        source = self._source
        if source is None:
            self._send(
                connection, time.monotonic() + self.timeout, encode_header(MessageType.NOT_READY)
            )
            return True
        layout, snapshots = source
        if (size, shape_hash) != layout.fingerprint:
            self._mismatch(connection, request, layout, "layout")
            return False
        # A slice is always sent over TCP: a co-located peer copies the whole model anyway.
        segment = snapshots.segment if request.flags & FLAG_SHM and not request.slices else None
        if segment is None:
            # The uplink is claimed before the wait for a fresh snapshot, in one step with the
            # check, so two pullers asking at once are never both told it is free.
            with self._lock:
                busy = bool(request.flags & FLAG_IF_IDLE) and self._sending > 0
                if busy:
                    self.served_busy += 1
                else:
                    self._sending += 1
            if busy:
                # Our link is taken: the puller asks an idle peer instead of sharing it.
                busy_reply = encode_header(MessageType.BUSY)
                self._send(connection, time.monotonic() + self.timeout, busy_reply)
                return True
        try:
            sent = self._answer_params(connection, request, layout, snapshots, segment)
        finally:
            if segment is None:
                with self._lock:
                    self._sending -= 1
        if sent is None:
            return True
        if connection.session is not None:
            sent += MAC_SIZE
        with self._lock:
            self.served += 1
            self.bytes_out += sent
        return True

    def _answer_params(
        self,
        connection: _Connection,
        request: Header,
        layout: Layout,
        snapshots: SnapshotBuffer,
        segment: SharedSegment | None,
    ) -> int | None:
        """Send a fresh snapshot (or, with ``segment``, its shared-memory address); the bytes
        sent, or None when there is no snapshot yet (NOT_READY was answered)."""
        # A lazily publishing trainer copies its model at its next step; wait for that copy.
        snapshots.want(wait=min(self.timeout, FRESH_WAIT))
        with snapshots.pinned() as snapshot:
            deadline = time.monotonic() + self.timeout
            if snapshot is None:
                self._send(connection, deadline, encode_header(MessageType.NOT_READY))
                return None
            if segment is not None:
                # Co-located peers copy the pinned slot themselves; only its address goes out.
                answer = ShmAnswer(
                    snapshot.slot,
                    snapshot.sequence,
                    segment.token,
                    segment.name,
                ).encode()
                reply = encode_header(
                    MessageType.SHM_PARAMS,
                    clock=snapshot.clock,
                    loss=snapshot.loss,
                    size=layout.size,
                    shape_hash=layout.shape_hash,
                    length=len(answer),
                )
                with self._lock:  # counted before the peer can see the answer
                    self.served_shm += 1
                self._send(connection, deadline, reply + answer)
                return HEADER.size + len(answer)
            first, stop = request.span
            dtype = self._dtype(connection)
            deadline = transfer_deadline(
                time.monotonic(), dtype.payload_bytes(stop - first), self.timeout
            )
            return self._send_params(
                connection,
                layout,
                snapshot.params,
                (snapshot.clock, snapshot.loss),
                deadline,
                dtype,
                (request.slices, request.slice_index),
            )

    def _dtype(self, connection: _Connection) -> WireDType:
        """The dtype parameters go out in on ``connection``."""
        if isinstance(self.wire_dtype, WireDType):
            return self.wire_dtype
        return wire_dtype_for(self.wire_dtype, connection.host)

    def _mismatch(
        self, connection: _Connection, request: Header, ours: StateLayout, what: str
    ) -> None:
        """Log a refused pull whose fingerprint differs from ``ours`` and answer
        LAYOUT_MISMATCH with our description (``what``: "layout" or "optimizer")."""
        text = ours.describe()
        with self._lock:
            self.rejected += 1
        self._rejections.warning(
            connection.host,
            what,
            "refused %spull from %s: %s mismatch: theirs %s; ours %s",
            "a state " if what == "optimizer" else "",
            connection.peer,
            what,
            describe_fingerprint(request.size, request.shape_hash),
            text,
        )
        payload = text.encode()[:MAX_TEXT_PAYLOAD]
        size, shape_hash = ours.fingerprint
        reply = encode_header(
            MessageType.LAYOUT_MISMATCH, size=size, shape_hash=shape_hash, length=len(payload)
        )
        self._send(connection, time.monotonic() + self.timeout, reply + payload)

    def _answer_status(self, connection: _Connection) -> None:
        """Answer a STATUS request: counters and names as JSON, never parameters."""
        status = self._status() if self._status is not None else {"name": self.name}
        text = json.dumps(status, separators=(",", ":"), allow_nan=False).encode()
        if len(text) > MAX_TEXT_PAYLOAD:  # many peers: their details go first
            status = {k: v for k, v in status.items() if not isinstance(v, dict)}
            text = json.dumps(status, separators=(",", ":"), allow_nan=False).encode()
        reply = encode_header(MessageType.STATUS_REPLY, length=len(text))
        self._send(connection, time.monotonic() + self.timeout, reply + text)

    def _answer_state(self, connection: _Connection, request: Header) -> bool:
        """Answer a STATE pull with our optimizer state (float32); False to close."""
        if request.slices:
            raise ProtocolError("a STATE pull asks for a slice; the optimizer state goes whole")
        share = self._state
        deadline = time.monotonic() + self.timeout
        if share is None or self._source is None:
            self._send(connection, deadline, encode_header(MessageType.NOT_READY))
            return True
        if (request.size, request.shape_hash) != share.layout.fingerprint:
            self._mismatch(connection, request, share.layout, "optimizer")
            return False
        # The training thread copies its optimizer at its next publish; wait for that copy.
        if not share.request(wait=self.timeout):
            self._send(connection, deadline, encode_header(MessageType.NOT_READY))
            return True
        with share.held() as state:
            start = time.monotonic()
            deadline = transfer_deadline(start, state.nbytes, self.timeout)
            sent = self._send_params(
                connection,
                share.layout,
                state,
                (share.clock, share.loss),
                deadline,
                WireDType.FLOAT32,
            )
        if connection.session is not None:
            sent += MAC_SIZE
        with self._lock:
            self.served_state += 1
            self.bytes_out += sent
        return True

    def _send_params(
        self,
        connection: _Connection,
        layout: StateLayout,
        params: np.ndarray,
        clock_loss: tuple[float, float],
        deadline: float,
        dtype: WireDType,
        part: tuple[int, int] = (0, 0),
    ) -> int:
        """Stream ``params`` as PARAMS in ``dtype``, tagged chunk by chunk; the bytes sent.

        ``part`` is ``(slices, slice index)`` of the request: only that slice is sent (``(0,
        0)``: the whole model). ``deadline`` is far enough for a slow link; a peer that takes
        no byte for ``timeout`` seconds is dropped long before it.
        """
        conn, session = connection.sock, connection.session
        idle = self.timeout
        size, shape_hash = layout.fingerprint
        first, stop = slice_bounds(size, *part) if part[0] else (0, size)
        params = params[first:stop]
        reply = encode_header(
            MessageType.PARAMS,
            clock=clock_loss[0],
            loss=clock_loss[1],
            size=size,
            shape_hash=shape_hash,
            length=dtype.payload_bytes(params.size),
            dtype=dtype,
            slices=part[0],
            slice_index=part[1],
        )
        mac = session.send.begin() if session is not None else None
        if mac is not None:
            mac.update(reply)
        send_all(conn, reply, deadline, idle)
        scratch = _EMPTY
        if dtype is not WireDType.FLOAT32:
            if connection.scratch is None:
                connection.scratch = np.empty(SCRATCH_BYTES, np.uint8)
            scratch = connection.scratch
        for chunk in encode_chunks(params, dtype, scratch):
            if mac is None:
                send_all(conn, chunk, deadline, idle)
                continue
            for start in range(0, len(chunk), _MAC_CHUNK):  # tag each piece while it is hot
                piece = chunk[start : start + _MAC_CHUNK]
                mac.update(piece)
                send_all(conn, piece, deadline, idle)
        if mac is not None:
            send_all(conn, mac.digest(), deadline, idle)
        return HEADER.size + dtype.payload_bytes(params.size)


_MAC_CHUNK = 1 << 20  # bytes tagged and sent at a time
_EMPTY = np.empty(0, np.uint8)  # float32 answers are sent straight from the snapshot


class _Done(Exception):
    """The connection is finished on purpose (e.g. after a LAYOUT_MISMATCH answer)."""


def _addresses(host: str) -> set[str]:
    """The IP addresses ``host`` names (itself when it is one); empty when it cannot resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    found = {str(info[4][0]) for info in infos}
    # An IPv4 client reaching an IPv6 listener shows up as ::ffff:a.b.c.d.
    return found | {f"::ffff:{a}" for a in found if ":" not in a}


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its own thread
        conn.shutdown(socket.SHUT_RDWR)
