"""The client side of a node: one thread that pulls a chosen peer's snapshot.

The training thread hands the puller a :class:`Ticket` with a deadline; the puller picks a peer
by flow-control score, sends PULL on a persistent connection (reconnecting when the peer dropped
it) and receives the answer straight into one preallocated buffer. Whoever resolves a ticket
first wins: a pull that finishes after its deadline is dropped, never delivered late. A new
connection is opened with TLS and the shared-secret handshake when the config asks for them,
and an answer holding NaN or Inf is refused unless the config allows it.

With ``transport: auto`` (the default) every PULL offers to read the answer from shared memory.
A co-located peer that keeps its snapshots there answers with the slot's address; the puller maps
the peer's segment once, copies the slot, and checks the slot's sequence counter after the copy.
A torn copy (the peer overwrote the slot meanwhile) is asked again over TCP. A peer whose segment
cannot be mapped here (it runs on another host) is pulled over TCP from then on. Answers sent in
a narrower wire dtype are converted back to float32 chunk by chunk as they arrive.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import json
import math
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from dpwa_core._log import OncePerPeer, get_logger, peer_text, reason_of
from dpwa_core.auth import MAC_SIZE, MessageMac, Session, client_handshake
from dpwa_core.delta import subtract_squared
from dpwa_core.errors import AuthError, ProtocolError
from dpwa_core.layout import Layout, describe_fingerprint
from dpwa_core.peers import Peer, PeerTable
from dpwa_core.shm import SharedSegment
from dpwa_core.state_share import StateLayout
from dpwa_core.wire import (
    FLAG_IF_IDLE,
    FLAG_SHM,
    FLAG_STATE,
    HEADER,
    SHM_ANSWER,
    Header,
    MessageType,
    ShmAnswer,
    decode_header,
    encode_header,
    recv_exact,
    send_all,
    slice_bounds,
)
from dpwa_core.wire_dtype import SCRATCH_BYTES, WireDType, decode_into

__all__ = ["RECEIVE_CHUNK", "Outcome", "Puller", "Ticket", "all_finite"]

SAMPLES_EVERY = 1.0
"""Seconds between two STATUS requests to one peer for its own sample count."""
RECEIVE_CHUNK = 1 << 18
"""Float32 elements received, copied and checked at a time (1 MiB: large enough that the
per-chunk overhead vanishes, small enough that a chunk is still in cache when it is checked)."""

_log = get_logger("puller")


class Outcome(enum.Enum):
    """How a pull ended."""

    OK = "ok"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    NOT_READY = "not_ready"
    """The peer is up but has published nothing yet: no parameters, no penalty."""


@dataclass
class Ticket:
    """One requested pull: the deadline, and the outcome once resolved."""

    deadline: float
    clock: float
    loss: float
    join: tuple[str, ...] = ()
    """For a join round (``start: shared``), the peers to ask in turn until one has a model;
    empty for an ordinary pull from a peer chosen by score."""
    step: int = 0
    """The node's step count when the pull was requested (for ``steps_behind``)."""
    delta: bool = False
    """Staleness-corrected (:mod:`dpwa_core.delta`): the puller's ``reference`` holds our model
    at the request, and a valid answer is turned into ``peer - reference`` (after clipping)."""
    alive: set[str] = field(default_factory=set)
    """Peers that answered NOT_READY during a join round: up, but with no model yet."""
    asked: set[str] = field(default_factory=set)
    """Peers a join round got any answer or error from (not those a deadline cut off)."""
    busy: set[str] = field(default_factory=set)
    """Peers that answered BUSY during a join round: they have a model but were sending."""
    slices: int = 0
    """Staleness-corrected pulls only: ask a peer reached over TCP for slice ``slice_index``
    of the model cut into this many (:func:`~dpwa_core.wire.slice_bounds`); 0 or 1: the whole
    model. A co-located peer (shared memory) is pulled whole, unless :attr:`partial`."""
    slice_index: int = 0
    partial: bool = False
    """The node filled the ``reference`` on the asked slice only: the pull must be that slice,
    so it goes over TCP even to a co-located peer."""
    span: tuple[int, int] | None = None
    """Set by the puller: the element range the answer covered; None for the whole model."""
    over_tcp: bool = False
    """Set by the puller: the answer came over TCP, not from shared memory."""
    if_idle: bool = False
    """Ask a join round's peers with IF_IDLE, so a busy sponsor is skipped, not shared."""
    state: bool = False
    """Pull the optimizer state (:data:`~dpwa_core.wire.FLAG_STATE`) from ``join[0]`` into the
    puller's ``state_buffer``, not the parameters."""
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    peer: str = ""
    peer_clock: float = 0.0
    peer_loss: float = 0.0
    elapsed: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, outcome: Outcome, peer: str = "", **fields: float) -> bool:
        """Record the outcome unless one was recorded already; True when this call won."""
        with self._lock:
            if self.outcome is not None:
                return False
            self.outcome, self.peer = outcome, peer
            for key, value in fields.items():
                setattr(self, key, value)
        self.done.set()
        return True


@dataclass
class _Link:
    """A kept-alive connection to a peer: the socket, where it goes, and its auth session."""

    sock: socket.socket
    address: tuple[str, int]
    session: Session | None = None


class _NotReady(Exception):
    """The peer has published nothing yet."""


class _Busy(Exception):
    """The peer is sending parameters to someone else (answer to an IF_IDLE pull)."""


class _NonFinite(Exception):
    """The peer's parameters hold NaN or Inf."""


def all_finite(values: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """Whether every element of ``values`` is finite, with a bounded scratch mask.

    Checks :data:`RECEIVE_CHUNK` elements at a time, so the mask never
    grows with the model and a chunk that was just received or copied is checked while it is
    still in cache.

    Args:
        values: a 1-D float array.
        mask: a bool buffer of at least ``min(values.size, RECEIVE_CHUNK)`` elements to reuse.
    """
    step = RECEIVE_CHUNK
    if mask is None:
        mask = np.empty(min(values.size, step), np.bool_)
    for start in range(0, values.size, step):
        chunk = values[start : start + step]
        out = mask[: chunk.size]
        np.isfinite(chunk, out=out)
        if not out.all():
            return False
    return True


class Puller:
    """Pulls peers' snapshots into one receive buffer on a background thread.

    Args:
        name: this node's name, for log lines.
        peers: the peer table to choose from and to score.
        layout: this node's layout; answers with another layout are refused.
        secret: the shared secret to prove on every new connection, or None.
        tls: a client TLS context to wrap every new connection in, or None.
        reject_nonfinite: refuse answers whose parameters hold NaN or Inf.
        transport: ``auto``, ``tcp`` or ``shm`` (see :class:`~dpwa_core.config.Config`).
        on_received: called on the puller's thread with the receive buffer and the peer's name
            once the answer to a pull that is not staleness-corrected is in and valid, before
            the pull is handed out (the node clips it there, see
            :mod:`dpwa_core.robust`).
        on_lead: called on the puller's thread for a staleness-corrected pull once its answer
            is in and valid: with the buffer (the slice that came, for a slice pull:
            ``ticket.span``) turned into the peer's lead over the reference as it landed (its
            sum of squares in :attr:`lead_squares`), the peer's name, the ticket, and the
            peer's clock and loss (the node clips the lead and adds its drift correction there,
            see :mod:`dpwa_core.robust` and :mod:`dpwa_core.drift`).
        idle: seconds a connection may stay silent (connecting, handshaking, or part-way
            through an answer) before the pull is given up, whatever its deadline; None: only
            the deadline counts.
    """

    def __init__(
        self,
        name: str,
        peers: PeerTable,
        layout: Layout,
        *,
        secret: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        reject_nonfinite: bool = True,
        transport: str = "auto",
        on_received: Callable[[np.ndarray, str], object] | None = None,
        on_lead: Callable[[np.ndarray, str, Ticket, float, float], object] | None = None,
        idle: float | None = None,
    ) -> None:
        self.name = name
        self.idle = idle
        self._on_received = on_received
        self._on_lead = on_lead
        self.transport = transport
        self.pulls_shm = 0
        """Pulls copied from a co-located peer's shared memory."""
        self.torn_shm = 0
        """Shared-memory copies the peer overwrote meanwhile (then pulled over TCP)."""
        self._segments: dict[str, SharedSegment] = {}
        self._no_shm: set[tuple[str, int]] = set()  # peers whose segments are not on this host
        self._shm_payload = memoryview(bytearray(SHM_ANSWER.size))
        self._scratch: np.ndarray | None = None
        self._mask = np.empty(min(layout.size, RECEIVE_CHUNK), np.bool_)
        self._finite = True  # whether the last answer received held only finite values
        self.layout = layout
        self._secret = secret
        self._tls = tls
        self.reject_nonfinite = reject_nonfinite
        self.rejected_nonfinite = 0
        """Answers refused because their parameters held NaN or Inf."""
        self.buffer = np.empty(layout.size, np.float32)
        self.state: StateLayout | None = None
        """The optimizer layout a state pull asks for (set with :meth:`set_state`)."""
        self.state_buffer = np.empty(0, np.float32)
        """Where a state pull lands."""
        self.reference: np.ndarray | None = None
        """Our model at a staleness-corrected pull's request (allocated at the first one; the
        node writes it while no pull is in flight)."""
        self.lead_squares = math.nan
        """``||lead||**2`` of the last staleness-corrected pull, summed as its chunks landed."""
        self._lead_scratch = np.empty(min(layout.size, RECEIVE_CHUNK), np.float32)
        self._header = memoryview(bytearray(HEADER.size))
        self._peers = peers
        self._conns: dict[str, _Link] = {}
        self._queue: queue.SimpleQueue[Ticket | None] = queue.SimpleQueue()
        self._warn = OncePerPeer(_log)
        self._failing: dict[str, int] = {}  # peer -> failed pulls since its last success
        self.on_samples: Callable[[str, int], object] | None = None
        """Called on the puller's thread with a peer's name and the samples it trained itself
        (asked every :data:`SAMPLES_EVERY` seconds after a pull from it), for swarm progress."""
        self._asked_samples: dict[str, float] = {}  # peer -> when its count was last asked
        self.bytes_in = 0
        self.pulls_busy = 0
        """Peers that answered BUSY (sending to someone else), so another one was asked."""
        self.pulls_shared = 0
        """Pulls that asked a busy peer anyway, every peer having answered BUSY."""
        self.pull_s = 0.0
        """Seconds with a pull in flight, from its start to its outcome."""
        self.wait_s = 0.0
        """Seconds from sending a PULL to the answer's header: the peer's snapshot wait."""
        self.post_s = 0.0
        """Seconds from an answer's last byte to its lead being ready (clip, lead, drift)."""
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"dpwa-puller-{name}", daemon=True)
        self._thread.start()

    def set_state(self, layout: StateLayout) -> None:
        """Make state pulls ask for ``layout``; call while no pull is in flight."""
        self.state = layout
        self.state_buffer = np.empty(layout.size, np.float32)
        largest = max(layout.size, self.layout.size)
        self._mask = np.empty(min(largest, RECEIVE_CHUNK), np.bool_)

    def submit(self, ticket: Ticket) -> None:
        """Queue a pull; the ticket is resolved by its deadline at the latest."""
        self._queue.put(ticket)

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread and close its sockets, cutting short a pull in flight."""
        self._closing = True
        self._queue.put(None)
        # Shutting the sockets down wakes a blocked send or receive at once; the thread then
        # sees the sentinel and closes them itself.
        for link in list(self._conns.values()):
            with contextlib.suppress(OSError):
                link.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (ticket := self._queue.get()) is not None:
            start = time.monotonic()
            try:
                self._pull(ticket)
            except Exception:  # never let one bad pull kill the thread
                _log.exception("%s: unexpected error during a pull", self.name)
                ticket.resolve(Outcome.FAILED)
            self.pull_s += time.monotonic() - start
        for link in list(self._conns.values()):
            link.sock.close()
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()

    def _pull(self, ticket: Ticket) -> None:
        if time.monotonic() >= ticket.deadline:
            ticket.resolve(Outcome.TIMED_OUT)
            return
        self._drop_forgotten()
        if ticket.state:
            self._pull_state(ticket)
            return
        if ticket.join:
            self._join(ticket)
            return
        # A peer already sending to someone else says BUSY and the next one drawn is asked, so
        # pullers spread over idle servers. When every peer is busy, the first one asked (the
        # schedule's, or the likeliest by score) is asked again unconditionally; a lone peer at
        # once.
        first = peer = self._peers.next_peer()
        tried: list[str] = []
        while peer is not None:
            tried.append(peer.name)
            following = self._peers.choose(exclude=tried)
            try:
                outcome, fields = self._try(
                    peer, ticket, if_idle=following is not None or peer is not first
                )
            except _Busy:
                self.pulls_busy += 1
                peer = following
                continue
            ticket.resolve(outcome, peer.name, **fields)
            if outcome is Outcome.OK:
                self._ask_samples(peer)
            return
        if first is None:
            ticket.resolve(Outcome.FAILED)
            return
        if tried[1:]:
            self.pulls_shared += 1  # every peer said BUSY: this one's uplink is shared
        outcome, fields = self._try(first, ticket)
        ticket.resolve(outcome, first.name, **fields)
        if outcome is Outcome.OK:
            self._ask_samples(first)

    def _join(self, ticket: Ticket) -> None:
        """Ask the ticket's peers in turn; the first that has a model answers the round."""
        for name in ticket.join:
            peer = self._peers.get(name)
            if peer is None or self._closing:
                continue
            if time.monotonic() >= ticket.deadline:
                break
            try:
                outcome, fields = self._try(peer, ticket, if_idle=ticket.if_idle)
            except _Busy:
                self.pulls_busy += 1
                ticket.asked.add(name)
                ticket.busy.add(name)
                continue
            ticket.asked.add(name)
            if outcome is Outcome.OK:
                ticket.resolve(outcome, name, **fields)
                return
            if outcome is Outcome.NOT_READY:
                ticket.alive.add(name)
        ticket.resolve(Outcome.NOT_READY)

    def _ask_samples(self, peer: Peer) -> None:
        """Every few seconds, ask a peer just pulled for how many samples it trained itself.

        One STATUS request on the kept-alive connection, after the pull was handed out (so
        the trainer never waits for it); the count goes to ``on_samples`` for the swarm's
        progress (:mod:`dpwa_core.swarm`). Anything wrong closes the connection, quietly: the
        next pull opens a new one.
        """
        link = self._conns.get(peer.name)
        now = time.monotonic()
        if self.on_samples is None or link is None:
            return
        if now - self._asked_samples.get(peer.name, -math.inf) < SAMPLES_EVERY:
            return
        self._asked_samples[peer.name] = now
        deadline = now + min(self.idle or 2.0, 2.0)
        try:
            self._send(link, encode_header(MessageType.STATUS), deadline)
            recv_exact(link.sock, self._header, deadline)
            mac = link.session.receive.begin() if link.session is not None else None
            if mac is not None:
                mac.update(self._header)
            header = decode_header(self._header)
            if header.type is not MessageType.STATUS_REPLY:
                raise ProtocolError(f"expected STATUS_REPLY, got {header.type.name}")
            payload = bytearray(header.length)  # bounded by MAX_TEXT_PAYLOAD in decode_header
            recv_exact(link.sock, memoryview(payload), deadline, self.idle)
            if mac is not None:
                mac.update(payload)
                tag = bytearray(MAC_SIZE)
                recv_exact(link.sock, memoryview(tag), deadline, self.idle)
                MessageMac.verify(mac, tag)
            answer = json.loads(payload.decode("utf-8"))
        except (ProtocolError, OSError, ValueError) as exc:
            self._close(peer.name)
            _log.debug("%s: no sample count from %s: %s", self.name, peer.name, exc)
            return
        samples = answer.get("samples") if isinstance(answer, dict) else None
        if isinstance(samples, int) and not isinstance(samples, bool) and 0 <= samples < 2**63:
            self.on_samples(peer.name, samples)

    def _pull_state(self, ticket: Ticket) -> None:
        """Pull the optimizer state of the peer ``ticket.join[0]`` into ``state_buffer``.

        A one-off at catch-up: the peer is not scored for it, and what went wrong is logged
        once per peer and reason.
        """
        name = ticket.join[0]
        peer = self._peers.get(name)
        if peer is None or self.state is None:
            ticket.resolve(Outcome.FAILED, name)
            return
        try:
            link = self._request(peer, ticket, FLAG_STATE)
            header = self._receive_answer(link, ticket.deadline, False, into=self.state)
            if not self._finite:
                raise ProtocolError("its optimizer state holds NaN or Inf")
        except _NotReady:
            ticket.resolve(Outcome.NOT_READY, name)
            return
        except TimeoutError:
            self._close(name)
            self._warn.warning(
                name, "state-timeout", "%s: optimizer state pull from %s timed out", self.name, name
            )
            ticket.resolve(Outcome.TIMED_OUT, name)
            return
        except (ProtocolError, OSError) as exc:
            self._close(name)
            if not self._closing:
                self._warn.warning(
                    name,
                    "state-"
                    + (type(exc).__name__ if isinstance(exc, OSError) else reason_of(str(exc))),
                    "%s: could not take %s's optimizer state: %s",
                    self.name,
                    name,
                    exc,
                )
            ticket.resolve(Outcome.FAILED, name)
            return
        ticket.resolve(Outcome.OK, name, peer_clock=header.clock, peer_loss=header.loss)

    def _try(
        self, peer: Peer, ticket: Ticket, if_idle: bool = False
    ) -> tuple[Outcome, dict[str, float]]:
        """Pull from ``peer`` into the buffer; the outcome and, on success, the answer's fields.

        Scores the peer and logs what went wrong (bounded per peer). With ``if_idle`` the peer
        may answer BUSY instead, which raises :class:`_Busy` (no penalty).
        """
        start, shm = time.monotonic(), self.pulls_shm
        try:
            clock, loss = self._exchange(peer, ticket, FLAG_IF_IDLE if if_idle else 0)
        except TimeoutError:
            self._close(peer.name)
            self._peers.record_timeout(peer.name)
            self._failing[peer.name] = self._failing.get(peer.name, 0) + 1
            self._warn.warning(
                peer.name, "timeout", "%s: pull from %s timed out", self.name, peer.name
            )
            return Outcome.TIMED_OUT, {}
        except _NotReady:
            return Outcome.NOT_READY, {}
        except _NonFinite:
            self.rejected_nonfinite += 1
            self._peers.record_failure(peer.name)
            self._failing[peer.name] = self._failing.get(peer.name, 0) + 1
            self._warn.warning(
                peer.name,
                "nonfinite",
                "%s: refused parameters from %s: they contain NaN or Inf (reject_nonfinite)",
                self.name,
                peer.name,
            )
            return Outcome.FAILED, {}
        except (ProtocolError, OSError) as exc:
            self._close(peer.name)
            if self._closing:  # our own close() cut the pull short; the peer did nothing wrong
                return Outcome.FAILED, {}
            self._peers.record_failure(peer.name)
            self._failing[peer.name] = self._failing.get(peer.name, 0) + 1
            reason = type(exc).__name__ if isinstance(exc, OSError) else reason_of(str(exc))
            self._warn.warning(
                peer.name, reason, "%s: pull from %s failed: %s", self.name, peer.name, exc
            )
            return Outcome.FAILED, {}
        received = time.monotonic()
        elapsed = received - start  # the transfer, not what on_received does
        reference = self._reference(ticket)
        first, stop = ticket.span or (0, self.buffer.size)
        part = self.buffer[first:stop]
        if reference is None:
            if self._on_received is not None and not ticket.join:  # a joiner copies its sponsor
                self._on_received(part, peer.name)
        else:
            # The peer's lead over our past self, made as a TCP answer landed; a copy from
            # shared memory is turned here. Outside a slice the buffer is stale until the node
            # fills it with our model (Node._add_current); nothing reads it before.
            if not ticket.over_tcp:
                self.lead_squares = subtract_squared(part, reference, self._lead_scratch)
            if self._on_lead is not None and not ticket.join:
                self._on_lead(part, peer.name, ticket, clock, loss)
        self.post_s += time.monotonic() - received
        # Each peer's average TCP pull time, for stats (a shared-memory read is no link).
        self._peers.record_success(peer.name, elapsed if self.pulls_shm == shm else None)
        failed = self._failing.pop(peer.name, 0)
        if failed:
            # Say so once, and let the next outage warn again (within the log budget).
            self._warn.recovered(
                peer.name,
                "%s: %s answers again after %d failed pulls",
                self.name,
                peer.name,
                failed,
            )
        return Outcome.OK, {"peer_clock": clock, "peer_loss": loss, "elapsed": elapsed}

    def over_tcp(self, addresses: Iterable[tuple[str, int]]) -> bool:
        """Whether a pull from any of these peers goes over TCP: shared memory is off, or each
        one's segment was found not to be on this host (any thread may ask)."""
        if self.transport == "tcp":
            return True
        no_shm = self._no_shm
        return self.transport != "shm" and all(address in no_shm for address in addresses)

    def _soon(self, deadline: float) -> float:
        """The deadline for a step that should be quick (connecting, a header): ``idle``."""
        if self.idle is None:
            return deadline
        return min(deadline, time.monotonic() + self.idle)

    def _reference(self, ticket: Ticket) -> np.ndarray | None:
        """What a staleness-corrected pull's answer is turned into a lead over (its span's
        part of :attr:`reference`); None for any other pull."""
        if not ticket.delta or self.reference is None:
            return None
        first, stop = ticket.span or (0, self.buffer.size)
        return self.reference[first:stop]

    def _exchange(self, peer: Peer, ticket: Ticket, flags: int = 0) -> tuple[float, float]:
        """Send PULL with ``flags``, receive the answer; returns the peer's (clock, loss)."""
        offer_shm = (
            self.transport != "tcp" and peer.address not in self._no_shm and not ticket.partial
        )
        ticket.span, ticket.over_tcp = None, True
        if ticket.delta and not ticket.join and ticket.slices > 1 and not offer_shm:
            ticket.span = slice_bounds(self.layout.size, ticket.slices, ticket.slice_index)
        link = self._request(peer, ticket, flags | (FLAG_SHM if offer_shm else 0))
        lead = self._reference(ticket)
        for _ in range(3):
            header = self._receive_answer(
                link, ticket.deadline, offer_shm, flags & FLAG_IF_IDLE, span=ticket.span, lead=lead
            )
            if header.type is MessageType.PARAMS:
                break
            self.bytes_in += HEADER.size + SHM_ANSWER.size
            if self._read_shm(peer, ShmAnswer.decode(self._shm_payload), ticket.deadline):
                self.pulls_shm += 1
                ticket.over_tcp = False
                break
            # Torn or not mappable here: ask again, over TCP unless shared memory is required.
            offer_shm = self.transport == "shm"
            request = self._encode_request(ticket, FLAG_SHM if offer_shm else 0)
            self._send(link, request, ticket.deadline)
            recv_exact(link.sock, self._header, self._soon(ticket.deadline))
            flags = 0  # asked again unconditionally: BUSY is no answer to that
        else:
            raise ProtocolError("the peer's shared-memory snapshot was overwritten during 3 copies")
        if not self._finite:
            raise _NonFinite
        return header.clock, header.loss

    def _receive_answer(
        self,
        link: _Link,
        deadline: float,
        offer_shm: bool,
        if_idle: int = 0,
        into: StateLayout | None = None,
        span: tuple[int, int] | None = None,
        lead: np.ndarray | None = None,
    ) -> Header:
        """Receive the rest of the answer whose header is in ``self._header``, check its tag.

        ``span`` is the slice the request asked for (None: the whole model); a PARAMS answer
        must hold exactly that. With ``lead`` (the reference of a staleness-corrected pull) a
        PARAMS payload is turned into the lead over it as it lands.

        Nothing of the answer is acted on before its tag (with ``auth``) has been checked; a
        PARAMS payload lands in the receive buffer (``state_buffer`` when ``into`` is the
        optimizer layout of a state pull), which is handed out only after that.
        """
        layout: StateLayout = self.layout if into is None else into
        conn, session = link.sock, link.session
        mac = session.receive.begin() if session is not None else None
        if mac is not None:
            mac.update(self._header)
        header = decode_header(self._header)
        text = b""
        if header.type is MessageType.PARAMS:
            self._check_fingerprint(header, layout)
            if header.span != (span or (0, layout.size)):
                raise ProtocolError(
                    f"answer holds elements {header.span[0]}:{header.span[1]}, asked for "
                    f"{'all' if span is None else f'{span[0]}:{span[1]}'}"
                )
            if into is None:
                first, stop = header.span
                self._receive_params(
                    conn, header, deadline, mac, self.buffer[first:stop], lead=lead
                )
            elif header.dtype is not WireDType.FLOAT32:
                raise ProtocolError(f"optimizer state sent as {header.dtype.name}, not float32")
            else:
                self._receive_params(conn, header, deadline, mac, self.state_buffer, check=True)
        elif header.type is MessageType.SHM_PARAMS:
            if not offer_shm:  # only ever sent to a PULL that offered shared memory
                raise ProtocolError("got SHM_PARAMS in answer to a PULL that did not offer it")
            self._check_fingerprint(header, layout)
            recv_exact(conn, self._shm_payload, deadline, self.idle)
            if mac is not None:
                mac.update(self._shm_payload)
        elif header.type is MessageType.BUSY and not if_idle:
            raise ProtocolError("got BUSY in answer to a PULL that did not allow it")
        elif header.type is MessageType.LAYOUT_MISMATCH:
            payload = bytearray(header.length)  # bounded by MAX_TEXT_PAYLOAD in decode_header
            recv_exact(conn, memoryview(payload), deadline, self.idle)
            if mac is not None:
                mac.update(payload)
            text = bytes(payload)
        if mac is not None:
            tag = bytearray(MAC_SIZE)
            recv_exact(conn, memoryview(tag), deadline, self.idle)
            MessageMac.verify(mac, tag)
            self.bytes_in += MAC_SIZE
        self._check_answer(header, text, layout)
        return header

    def _send(self, link: _Link, message: bytes, deadline: float) -> None:
        """Send one short message, tagged when the connection has a session."""
        if link.session is not None:
            message += link.session.send.tag(message)
        send_all(link.sock, message, deadline)

    def _encode_request(self, ticket: Ticket, flags: int) -> bytes:
        layout = self.state if flags & FLAG_STATE and self.state is not None else self.layout
        size, shape_hash = layout.fingerprint
        sliced = ticket.span is not None and not flags & FLAG_STATE
        return encode_header(
            MessageType.PULL,
            clock=ticket.clock,
            loss=ticket.loss,
            size=size,
            shape_hash=shape_hash,
            flags=flags,
            slices=ticket.slices if sliced else 0,
            slice_index=ticket.slice_index if sliced else 0,
        )

    def _request(self, peer: Peer, ticket: Ticket, flags: int) -> _Link:
        """Send PULL and receive the answer's header; returns the connection."""
        request = self._encode_request(ticket, flags)
        for attempt in range(2):
            link, fresh = self._connection(peer, self._soon(ticket.deadline))
            try:
                sent = time.monotonic()
                self._send(link, request, ticket.deadline)
                recv_exact(link.sock, self._header, self._soon(ticket.deadline))
                self.wait_s += time.monotonic() - sent
                return link
            except ConnectionError:
                self._close(peer.name)
                # A kept-alive socket the peer dropped (restart, idle close): retry once, fresh.
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    def _check_answer(self, header: Header, text: bytes, layout: StateLayout) -> None:
        """Raise unless ``header`` (its tag checked) announces parameters of ``layout``."""
        if header.type is MessageType.NOT_READY:
            raise _NotReady
        if header.type is MessageType.BUSY:
            raise _Busy
        if header.type is MessageType.TLS_REQUIRED:
            raise ProtocolError(
                "the peer requires TLS, but this node has no 'tls' configured; give every node "
                "the cluster's tls section"
            )
        if header.type is MessageType.AUTH_REQUIRED:
            raise AuthError(
                "the peer requires the shared-secret handshake, but this node has no 'auth' "
                "configured; give every node the same auth section"
            )
        if header.type is MessageType.UNSUPPORTED_VERSION:
            raise ProtocolError("the peer refuses this node's protocol version")
        if header.type is MessageType.LAYOUT_MISMATCH:
            what = "layout" if layout is self.layout else "optimizer"
            raise ProtocolError(
                f"{what} mismatch: ours {layout.describe()}; theirs {peer_text(text)}"
            )
        if header.type not in (MessageType.PARAMS, MessageType.SHM_PARAMS):
            raise ProtocolError(f"expected PARAMS, got {header.type.name}")

    def _check_fingerprint(self, header: Header, layout: StateLayout) -> None:
        """Raise unless ``header`` holds values of ``layout`` (checked before the payload)."""
        if (header.size, header.shape_hash) != layout.fingerprint:
            theirs = describe_fingerprint(header.size, header.shape_hash)
            what = "layout" if layout is self.layout else "optimizer"
            raise ProtocolError(f"{what} mismatch: ours {layout.describe()}; theirs {theirs}")

    def _receive_params(
        self,
        conn: socket.socket,
        header: Header,
        deadline: float,
        mac: hmac.HMAC | None,
        buffer: np.ndarray,
        check: bool | None = None,
        lead: np.ndarray | None = None,
    ) -> None:
        """Receive a PARAMS payload into ``buffer``, converting a narrower wire dtype.

        Received chunk by chunk, each fed to ``mac`` with ``auth``, then, while it is in
        cache, checked for NaN and Inf when ``check`` (default: ``reject_nonfinite``) is on,
        and with ``lead`` (same size as ``buffer``) turned into ``chunk - lead`` (its squares
        summed into :attr:`lead_squares`). Nothing here is acted on: the caller hands the
        buffer out only once the tag is checked.
        """
        check = self.reject_nonfinite if check is None else check
        self._finite = True
        squares = 0.0

        def landed(start: int, stop: int) -> None:
            nonlocal squares
            chunk = buffer[start:stop]
            if check and self._finite:
                self._finite = all_finite(chunk, self._mask)
            if lead is not None:
                squares += subtract_squared(chunk, lead[start:stop], self._lead_scratch)

        if header.dtype is WireDType.FLOAT32:
            for start in range(0, buffer.size, RECEIVE_CHUNK):
                chunk = buffer[start : start + RECEIVE_CHUNK]
                view = chunk.data.cast("B")
                recv_exact(conn, view, deadline, self.idle)
                if mac is not None:
                    mac.update(view)
                landed(start, start + chunk.size)
        else:
            if self._scratch is None:
                self._scratch = np.empty(SCRATCH_BYTES, np.uint8)

            def receive(view: memoryview) -> None:
                recv_exact(conn, view, deadline, self.idle)
                if mac is not None:
                    mac.update(view)

            decode_into(receive, header.dtype, buffer, self._scratch, landed)
        if lead is not None:
            self.lead_squares = squares
        self.bytes_in += HEADER.size + header.length

    def _check_chunk(self, chunk: np.ndarray) -> None:
        """Check a chunk just copied from shared memory for NaN and Inf while it is hot."""
        if self.reject_nonfinite and self._finite:
            self._finite = all_finite(chunk, self._mask)

    def _read_shm(self, peer: Peer, answer: ShmAnswer, deadline: float) -> bool:
        """Copy the peer's announced slot into the buffer; False when torn or not mappable."""
        segment = self._segments.get(peer.name)
        if segment is None or (segment.name, segment.token) != (answer.name, answer.token):
            if segment is not None:  # the peer restarted with a new segment
                segment.close()
                del self._segments[peer.name]
            size, shape_hash = self.layout.fingerprint
            try:
                segment = SharedSegment.attach(
                    answer.name, answer.token, size, shape_hash, deadline=deadline
                )
            except TimeoutError:
                raise  # the pull's deadline, not a sign that the peer is elsewhere
            except (OSError, ValueError) as exc:
                if self.transport == "shm":
                    raise ProtocolError(
                        f"transport is 'shm' but {peer.name}'s shared memory cannot be read "
                        f"here ({exc}); is it on another host? Use transport: auto"
                    ) from None
                self._no_shm.add(peer.address)
                _log.info("%s: pulling %s over TCP: %s", self.name, peer.name, exc)
                return False
            self._segments[peer.name] = segment
        self._finite = True
        copied = segment.read(
            answer.slot, answer.sequence, self.buffer, check=self._check_chunk, deadline=deadline
        )
        if copied is None:
            self.torn_shm += 1
            return False
        return True

    def _connection(self, peer: Peer, deadline: float) -> tuple[_Link, bool]:
        """The kept-alive connection to ``peer``, or a new one; True when new."""
        kept = self._conns.get(peer.name)
        if kept is not None and kept.address == peer.address:
            return kept, False
        self._close(peer.name)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed before connecting")
        conn = socket.create_connection(peer.address, timeout=remaining)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                hostname = peer.host if self._tls.check_hostname else None
                conn = self._tls.wrap_socket(
                    conn, server_hostname=hostname, do_handshake_on_connect=False
                )
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    conn.do_handshake()
                except (ConnectionResetError, ssl.SSLEOFError) as exc:
                    raise ConnectionError(
                        f"the peer closed the connection during the TLS handshake ({exc}); "
                        "does it have the cluster's tls section?"
                    ) from None
            # Registered before the handshake, so close() can cut a stalled one short.
            link = _Link(conn, peer.address)
            self._conns[peer.name] = link
            if self._secret is not None:
                link.session = client_handshake(
                    conn, self._secret, deadline, name=self.name, peer=peer.name
                )
        except BaseException:
            self._close(peer.name)
            conn.close()
            raise
        return link, True

    def _close(self, name: str) -> None:
        kept = self._conns.pop(name, None)
        if kept is not None:
            kept.sock.close()

    def _drop_forgotten(self) -> None:
        """Close the connections and unmap the segments of peers removed from the table."""
        known = set(self._peers.names())
        for name in [n for n in self._conns if n not in known]:
            self._close(name)
        for name in [n for n in self._segments if n not in known]:
            self._segments.pop(name).close()
