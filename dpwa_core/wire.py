"""The wire format: one fixed 52-byte header, then raw little-endian parameters.

With ``auth``, every message is followed by a 32-byte tag (:class:`dpwa_core.auth.MessageMac`).

docs/PROTOCOL.md describes every byte. Nothing received is unpickled or evaluated: a message is
decoded with :mod:`struct`, every field is checked before it is used, and a payload is received
straight into a buffer the receiver allocated for its own layout, so a peer cannot make us
allocate more by lying about a length.
"""

from __future__ import annotations

import enum
import math
import socket
import struct
import time
from typing import NamedTuple

from dpwa_core.errors import ProtocolError
from dpwa_core.wire_dtype import WireDType

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_TEXT_PAYLOAD",
    "MAX_SLICES",
    "MIN_TRANSFER_RATE",
    "VERSION",
    "FLAG_IF_IDLE",
    "FLAG_SHM",
    "FLAG_STATE",
    "SHM_ANSWER",
    "DType",
    "Header",
    "MessageType",
    "ShmAnswer",
    "VersionError",
    "decode_header",
    "encode_header",
    "recv_exact",
    "send_all",
    "slice_bounds",
    "transfer_deadline",
]

MAGIC = b"DPWA"
VERSION = 5
"""Version 5 adds slices (a PULL for one slice of the model, answered with that slice); version
4 the STATE flag (optimizer state at catch-up) and STATUS; version 3 the int8 dtype, the IF_IDLE
flag and BUSY; version 2 tags every message after an ``auth`` handshake. Other versions are
refused."""
HEADER = struct.Struct("<4sBBHBBHddQQQ")
"""magic, version, type, flags, dtype, slices, slice, clock, loss, size, hash, length."""
MAX_SLICES = 64
"""The most slices a model may be cut into for one pull (the header's ``slices`` byte)."""
MAX_TEXT_PAYLOAD = 64 * 1024
"""Largest text a LAYOUT_MISMATCH or STATUS_REPLY message may carry."""
FLAG_SHM = 0x0001
"""PULL flag: the client can read the answer from shared memory (see :mod:`dpwa_core.shm`)."""
FLAG_IF_IDLE = 0x0002
"""PULL flag: answer BUSY instead of parameters when already sending parameters to a peer."""
FLAG_STATE = 0x0004
"""PULL flag: answer the optimizer state (the layout in the request is the client's optimizer
layout, :class:`~dpwa_core.optimizer_state.OptimizerLayout`), not the parameters; always float32
over TCP, the other flags are ignored."""
_KNOWN_FLAGS = FLAG_SHM | FLAG_IF_IDLE | FLAG_STATE
SHM_ANSWER = struct.Struct("<B7xQ16s64s")
"""SHM_PARAMS payload: slot, pad, sequence, token, segment name (NUL-padded ASCII)."""


class MessageType(enum.IntEnum):
    """What a message is; the header's third byte."""

    PULL = 1
    """Client asks for the server's latest snapshot; carries the client's layout, no payload."""
    PARAMS = 2
    """Server's snapshot: its clock and loss in the header, the parameters as payload."""
    NOT_READY = 3
    """Server has published no snapshot yet; no payload."""
    LAYOUT_MISMATCH = 4
    """Server refuses: layouts differ. Payload: the server's layout, UTF-8 text."""
    AUTH_REQUIRED = 5
    """Server refuses a PULL sent without the handshake: it requires auth. No payload."""
    NO_AUTH = 6
    """Server refuses a handshake: it has no auth configured. No payload."""
    TLS_REQUIRED = 7
    """Server refuses plain TCP: it requires TLS. Sent unencrypted; no payload."""
    SHM_PARAMS = 8
    """Server's snapshot is in shared memory: clock and loss in the header, where to read it
    (:data:`SHM_ANSWER`) as payload. Only sent to a PULL flagged :data:`FLAG_SHM`."""
    UNSUPPORTED_VERSION = 9
    """Server refuses a request of another protocol version. Sent in the server's version, so a
    peer of another release reports both versions. No payload."""
    BUSY = 10
    """Server is sending parameters over TCP to another peer: ask someone else. Only sent to a
    PULL flagged :data:`FLAG_IF_IDLE`. No payload."""
    STATUS = 11
    """Client asks for the server's status (``dpwa status``); no payload, never parameters."""
    STATUS_REPLY = 12
    """Server's status: a UTF-8 JSON object of at most :data:`MAX_TEXT_PAYLOAD` bytes
    (:mod:`dpwa_core.status` lists and checks its fields)."""


class VersionError(ProtocolError):
    """The peer speaks another protocol version (another dpwa release)."""


_EMPTY = frozenset(
    {
        MessageType.PULL,
        MessageType.NOT_READY,
        MessageType.AUTH_REQUIRED,
        MessageType.NO_AUTH,
        MessageType.TLS_REQUIRED,
        MessageType.UNSUPPORTED_VERSION,
        MessageType.BUSY,
        MessageType.STATUS,
    }
)


DType = WireDType
"""Element type of a PARAMS payload (the header's dtype byte); see :mod:`dpwa_core.wire_dtype`."""


class Header(NamedTuple):
    """A decoded and validated header."""

    type: MessageType
    clock: float
    loss: float
    size: int
    shape_hash: int
    length: int
    flags: int = 0
    dtype: WireDType = WireDType.FLOAT32
    slices: int = 0
    """PULL: ask for slice ``slice_index`` of the model cut into this many; PARAMS: the answer
    holds that slice. 0: the whole model."""
    slice_index: int = 0

    @property
    def span(self) -> tuple[int, int]:
        """The element range ``(start, stop)`` the message is about (the whole layout for 0)."""
        if not self.slices:
            return 0, self.size
        return slice_bounds(self.size, self.slices, self.slice_index)


def slice_bounds(size: int, slices: int, index: int) -> tuple[int, int]:
    """Elements ``(start, stop)`` of slice ``index`` of a ``size``-element model cut into
    ``slices`` nearly equal consecutive ranges: ``start = index * size // slices``.

    Raises:
        ValueError: ``slices`` is not in ``[1, min(size, MAX_SLICES)]`` or ``index`` not in
            ``[0, slices)``.
    """
    if not 1 <= slices <= min(size, MAX_SLICES) or not 0 <= index < slices:
        raise ValueError(
            f"slice {index} of {slices} is not a slice of a {size}-element model (at most "
            f"{MAX_SLICES} slices, at most one per element)"
        )
    return index * size // slices, (index + 1) * size // slices


class ShmAnswer(NamedTuple):
    """A decoded SHM_PARAMS payload: where the server's snapshot is."""

    slot: int
    sequence: int
    token: bytes
    name: str

    def encode(self) -> bytes:
        """Pack it as :data:`SHM_ANSWER`."""
        return SHM_ANSWER.pack(self.slot, self.sequence, self.token, self.name.encode("ascii"))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> ShmAnswer:
        """Unpack and check a :data:`SHM_ANSWER` payload.

        Raises:
            ProtocolError: a field is out of range or the name is not printable ASCII.
        """
        slot, sequence, token, raw = SHM_ANSWER.unpack(data)
        name = raw.rstrip(b"\0")
        if slot not in (0, 1):
            raise ProtocolError(f"shared-memory slot {slot} is not 0 or 1")
        if sequence % 2:
            raise ProtocolError(f"shared-memory sequence {sequence} is odd (a write in progress)")
        if not name or b"\0" in name or not all(0x21 <= c < 0x7F for c in name):
            raise ProtocolError(f"shared-memory segment name {bytes(raw[:16])!r}... is invalid")
        return cls(slot, sequence, bytes(token), name.decode("ascii"))


def encode_header(
    kind: MessageType,
    *,
    clock: float = 0.0,
    loss: float = 0.0,
    size: int = 0,
    shape_hash: int = 0,
    length: int = 0,
    flags: int = 0,
    dtype: WireDType = WireDType.FLOAT32,
    slices: int = 0,
    slice_index: int = 0,
) -> bytes:
    """Pack one header.

    Args:
        kind: the message type.
        clock: the sender's clock (samples trained).
        loss: the sender's last reported loss.
        size: number of float32 elements of the sender's layout.
        shape_hash: 64-bit hash of the sender's layout shapes.
        length: number of payload bytes that follow the header.
        flags: PULL flags, e.g. :data:`FLAG_SHM`.
        dtype: element type of a PARAMS payload.
        slices: PULL and PARAMS: the model is cut into this many slices and the message is
            about slice ``slice_index`` (:func:`slice_bounds`); 0 for the whole model.
        slice_index: which slice.

    Returns:
        The :data:`HEADER`-sized bytes.
    """
    return HEADER.pack(
        MAGIC,
        VERSION,
        kind,
        flags,
        dtype,
        slices,
        slice_index,
        clock,
        loss,
        size,
        shape_hash,
        length,
    )


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Unpack and validate one header.

    Checks magic, version, type, flags, dtype and slice, that clock and loss are finite and
    clock is not negative, and that the payload length fits the message type (for PARAMS of a
    slice, that slice's). Whether a
    PARAMS length matches the receiver's layout is checked by the receiver, which knows it.

    Args:
        data: exactly :data:`HEADER` ``.size`` bytes.

    Returns:
        The decoded :class:`Header`.

    Raises:
        VersionError: the version is not :data:`VERSION`.
        ProtocolError: naming the first field that is wrong.
    """
    if len(data) != HEADER.size:
        raise ProtocolError(f"header is {len(data)} bytes, expected {HEADER.size}")
    magic, version, kind, flags, dtype, slices, index, clock, loss, size, shape_hash, length = (
        HEADER.unpack(data)
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a dpwa peer")
    if version != VERSION:
        raise VersionError(
            f"the peer speaks protocol version {version}, this node speaks {VERSION}: run the "
            "same dpwa release on every node"
        )
    try:
        message_type = MessageType(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None
    if flags & ~_KNOWN_FLAGS or (flags and message_type is not MessageType.PULL):
        raise ProtocolError(f"unknown flags 0x{flags:04x} on {message_type.name}")
    try:
        element = WireDType(dtype)
    except ValueError:
        raise ProtocolError(f"unknown payload dtype {dtype}") from None
    if slices == 0 and index != 0:
        raise ProtocolError(f"slice {index} of a whole-model message (slices 0)")
    if slices and message_type not in (MessageType.PULL, MessageType.PARAMS):
        raise ProtocolError(f"{message_type.name} cannot be about a slice")
    start, stop = 0, size
    if slices:
        try:
            start, stop = slice_bounds(size, slices, index)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
    if not math.isfinite(clock) or clock < 0:
        raise ProtocolError(f"clock {clock!r} is not a finite non-negative number")
    if not math.isfinite(loss):
        raise ProtocolError(f"loss {loss!r} is not finite")
    if message_type in _EMPTY and length != 0:
        raise ProtocolError(f"{message_type.name} carries no payload, header says {length} bytes")
    if message_type is MessageType.LAYOUT_MISMATCH and length > MAX_TEXT_PAYLOAD:
        raise ProtocolError(f"layout description of {length} bytes exceeds {MAX_TEXT_PAYLOAD}")
    if message_type is MessageType.STATUS_REPLY and length > MAX_TEXT_PAYLOAD:
        raise ProtocolError(f"status of {length} bytes exceeds {MAX_TEXT_PAYLOAD}")
    if message_type is MessageType.PARAMS and length != element.payload_bytes(stop - start):
        raise ProtocolError(
            f"payload of {length} bytes does not hold {stop - start} {element.name.lower()} "
            "elements"
        )
    if message_type is MessageType.SHM_PARAMS and length != SHM_ANSWER.size:
        raise ProtocolError(f"SHM_PARAMS payload is {length} bytes, expected {SHM_ANSWER.size}")
    return Header(
        message_type, clock, loss, size, shape_hash, length, flags, element, slices, index
    )


MIN_TRANSFER_RATE = 125_000
"""Bytes per second (1 Mbit/s) below which a parameter transfer is given up as stalled."""


def recv_exact(
    sock: socket.socket, view: memoryview, deadline: float, idle: float | None = None
) -> None:
    """Fill ``view`` from ``sock``, giving up at ``deadline`` (a ``time.monotonic()`` value).

    Receives straight into the caller's buffer; never allocates a payload-sized object.

    Args:
        sock: the connection.
        view: where the bytes go; filled completely or not at all.
        deadline: when to give up, whatever the progress.
        idle: also give up when no byte arrives for this many seconds (a stalled peer), so a
            far deadline that lets a slow link finish does not let a dead one hold the call.

    Raises:
        TimeoutError: the deadline passed first, or the peer sent nothing for ``idle`` seconds.
        ConnectionError: the peer closed the connection part-way.
    """
    got, total = 0, len(view)
    while got < total:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"received {got} of {total} bytes before the deadline")
        sock.settimeout(remaining if idle is None else min(remaining, idle))
        try:
            n = sock.recv_into(view[got:], total - got)
        except TimeoutError:
            if idle is not None and deadline - time.monotonic() > 0:
                raise TimeoutError(
                    f"received {got} of {total} bytes, then nothing for {idle:g} s"
                ) from None
            raise TimeoutError(f"received {got} of {total} bytes before the deadline") from None
        if n == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {total} bytes")
        got += n


def send_all(
    sock: socket.socket, data: bytes | memoryview, deadline: float, idle: float | None = None
) -> None:
    """Send all of ``data`` (a memoryview is sent without a copy), giving up at ``deadline``.

    Args:
        sock: the connection.
        data: what to send.
        deadline: when to give up, whatever the progress.
        idle: also give up when the peer takes no byte for this many seconds.

    Raises:
        TimeoutError: the deadline passed first, or the peer took nothing for ``idle`` seconds.
        OSError: the connection failed.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed before sending")
    if idle is None or idle >= remaining:
        # Since Python 3.5 a socket timeout bounds the whole sendall, not each chunk.
        sock.settimeout(remaining)
        sock.sendall(data)
        return
    view = memoryview(data).cast("B")
    sent, total = 0, len(view)
    while sent < total:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"sent {sent} of {total} bytes before the deadline")
        sock.settimeout(min(remaining, idle))
        try:
            sent += sock.send(view[sent:])
        except TimeoutError:
            raise TimeoutError(f"sent {sent} of {total} bytes, then the peer took none") from None


def transfer_deadline(start: float, nbytes: int, timeout: float) -> float:
    """When a transfer of ``nbytes`` that began at ``start`` must end at the latest.

    ``timeout`` plus the time the bytes need at :data:`MIN_TRANSFER_RATE`: a 10 MB model gets
    80 s, enough for a 10 Mbit/s link shared by three pullers, while ``idle`` timeouts (no byte
    for ``timeout`` seconds) catch a dead peer long before.
    """
    return start + timeout + nbytes / MIN_TRANSFER_RATE
