"""The server side of a node: answers peers' pulls with the published snapshot.

One listener thread accepts connections; each connection gets a thread that waits for PULL
requests and answers them from the pinned snapshot, so a slow peer only slows its own
connection. Connections are persistent: a peer sends the next PULL on the same socket.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from dpwa_core._log import OncePerPeer, get_logger
from dpwa_core.errors import ProtocolError
from dpwa_core.layout import Layout, describe_fingerprint
from dpwa_core.snapshot import SnapshotBuffer
from dpwa_core.wire import (
    HEADER,
    MAX_TEXT_PAYLOAD,
    MessageType,
    decode_header,
    encode_header,
    recv_exact,
    send_all,
)

__all__ = ["Server"]

_log = get_logger("server")
_ACCEPT_POLL = 0.1  # seconds; bounds how long close() waits for the listener thread


class Server:
    """Serve the published snapshot on ``(host, port)``.

    Args:
        host: address to bind.
        port: port to bind (0 picks a free one).
        timeout: seconds a peer has to finish sending a request, and we to send an answer.
        max_connections: connections served at once; more are refused with a log line.
        idle_timeout: seconds an idle persistent connection is kept open.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        *,
        max_connections: int = 256,
        idle_timeout: float = 120.0,
    ) -> None:
        self.timeout = timeout
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._source: tuple[Layout, SnapshotBuffer] | None = None
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._rejections = OncePerPeer(_log)
        self.served = 0
        self.bytes_out = 0
        self.rejected = 0
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
        listener.listen(128)
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

    def close(self) -> None:
        """Stop accepting, drop every connection, and free the port."""
        self._closed.set()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)
        self._thread.join(timeout=2 * _ACCEPT_POLL + 0.5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(_ACCEPT_POLL)  # e.g. out of file descriptors: back off, keep serving
                continue
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                self.rejected += 1
                self._rejections.warning(
                    addr[0],
                    "full",
                    "refused %s: already serving %d connections",
                    peer,
                    self.max_connections,
                )
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._serve, args=(conn, peer), name=f"dpwa-conn-{peer}", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        host = peer.rsplit(":", 1)[0]
        header = memoryview(bytearray(HEADER.size))
        try:
            while not self._closed.is_set():
                # Idle peers may wait long for their next pull; a started header must finish fast.
                conn.settimeout(self.idle_timeout)
                try:
                    if conn.recv_into(header[:1], 1) == 0:
                        return
                except TimeoutError:
                    _log.debug("closed idle connection from %s", peer)
                    return
                recv_exact(conn, header[1:], time.monotonic() + self.timeout)
                request = decode_header(header)
                if request.type is not MessageType.PULL:
                    raise ProtocolError(f"expected a PULL request, got {request.type.name}")
                if not self._answer(conn, request.size, request.shape_hash, peer):
                    return
        except ProtocolError as exc:
            self.rejected += 1
            self._rejections.warning(host, str(exc), "closed connection from %s: %s", peer, exc)
        except TimeoutError:
            self._rejections.warning(
                host, "timeout", "closed connection from %s: request or answer timed out", peer
            )
        except OSError as exc:
            _log.debug("connection from %s ended: %s", peer, exc)
        except Exception:  # a bug must cost one connection, never the server
            _log.exception("closed connection from %s after an unexpected error", peer)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _answer(self, conn: socket.socket, size: int, shape_hash: int, peer: str) -> bool:
        """Answer one PULL; False when the connection must close."""
        source = self._source
        if source is None:
            send_all(conn, encode_header(MessageType.NOT_READY), time.monotonic() + self.timeout)
            return True
        layout, snapshots = source
        if (size, shape_hash) != layout.fingerprint:
            ours = layout.describe()
            self.rejected += 1
            self._rejections.warning(
                peer.rsplit(":", 1)[0],
                "layout",
                "refused pull from %s: layout mismatch: theirs %s; ours %s",
                peer,
                describe_fingerprint(size, shape_hash),
                ours,
            )
            text = ours.encode()[:MAX_TEXT_PAYLOAD]
            reply = encode_header(
                MessageType.LAYOUT_MISMATCH,
                size=layout.size,
                shape_hash=layout.shape_hash,
                length=len(text),
            )
            send_all(conn, reply + text, time.monotonic() + self.timeout)
            return False
        with snapshots.pinned() as snapshot:
            deadline = time.monotonic() + self.timeout
            if snapshot is None:
                send_all(conn, encode_header(MessageType.NOT_READY), deadline)
                return True
            reply = encode_header(
                MessageType.PARAMS,
                clock=snapshot.clock,
                loss=snapshot.loss,
                size=layout.size,
                shape_hash=layout.shape_hash,
                length=layout.nbytes,
            )
            send_all(conn, reply, deadline)
            send_all(conn, snapshot.params.data.cast("B"), deadline)
        with self._lock:
            self.served += 1
            self.bytes_out += HEADER.size + layout.nbytes
        return True


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its own thread
        conn.shutdown(socket.SHUT_RDWR)
