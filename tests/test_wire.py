"""The wire format: every header field is checked, and the parser fails only with ProtocolError."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpwa_core.errors import ProtocolError
from dpwa_core.wire import (
    FLAG_IF_IDLE,
    FLAG_SHM,
    HEADER,
    MAX_TEXT_PAYLOAD,
    SHM_ANSWER,
    VERSION,
    DType,
    MessageType,
    ShmAnswer,
    decode_header,
    encode_header,
    recv_exact,
    send_all,
)

FIELDS = dict(
    magic=b"DPWA",
    version=VERSION,
    type=2,
    flags=0,
    dtype=1,
    slices=0,
    slice=0,
    clock=5.0,
    loss=0.25,
    size=10,
    hash=0xABCDEF,
    length=40,
)


def pack(**overrides: object) -> bytes:
    fields = {**FIELDS, **overrides}
    return HEADER.pack(*fields.values())


def test_header_is_52_bytes_little_endian() -> None:
    data = encode_header(MessageType.PARAMS, clock=3.0, loss=0.5, size=2, shape_hash=7, length=8)
    assert len(data) == 52
    assert data[:4] == b"DPWA"
    assert data[4] == VERSION == 5 and data[5] == 2
    assert struct.unpack_from("<d", data, 12)[0] == 3.0
    assert struct.unpack_from("<Q", data, 44)[0] == 8


def test_round_trip() -> None:
    data = encode_header(
        MessageType.PARAMS, clock=12.5, loss=0.125, size=3, shape_hash=2**64 - 1, length=12
    )
    header = decode_header(data)
    assert header.type is MessageType.PARAMS
    assert (header.clock, header.loss, header.size, header.shape_hash, header.length) == (
        12.5,
        0.125,
        3,
        2**64 - 1,
        12,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(magic=b"HTTP"), "bad magic"),
        (dict(version=1), "protocol version 1"),
        (dict(type=0), "unknown message type 0"),
        (dict(type=13), "unknown message type 13"),
        (dict(flags=1), "unknown flags"),
        (dict(flags=8, type=1, length=0), "unknown flags 0x0008"),
        (dict(dtype=5), "unknown payload dtype"),
        (dict(dtype=2), "does not hold 10 float16"),
        (dict(type=8, length=40), "SHM_PARAMS payload is 40 bytes"),
        (dict(slice=5), "slice 5 of a whole-model message"),
        (dict(slices=2, slice=2), "slice 2 of 2 is not a slice"),
        (dict(slices=11), "slice 0 of 11 is not a slice of a 10-element model"),
        (dict(slices=2, length=20, type=3), "NOT_READY cannot be about a slice"),
        (dict(clock=float("nan")), "clock"),
        (dict(clock=-1.0), "clock"),
        (dict(clock=float("inf")), "clock"),
        (dict(loss=float("nan")), "loss"),
        (dict(loss=float("-inf")), "loss"),
        (dict(length=2**63), "does not hold 10 float32"),
        (dict(length=39), "does not hold 10 float32"),
        (dict(type=1, length=1), "PULL carries no payload"),
        (dict(type=3, length=4), "NOT_READY carries no payload"),
        (dict(type=4, length=MAX_TEXT_PAYLOAD + 1), "layout description"),
    ],
)
def test_every_bad_field_is_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_header(pack(**overrides))


def test_short_header() -> None:
    with pytest.raises(ProtocolError, match="header is 51 bytes"):
        decode_header(pack()[:-1])


@given(st.binary(min_size=HEADER.size, max_size=HEADER.size))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    try:
        header = decode_header(data)
    except ProtocolError:
        return
    assert header.length <= max(MAX_TEXT_PAYLOAD, 4 * header.size)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.sampled_from(list(MessageType)))
def test_any_valid_header_decodes(size: int, length: int, kind: MessageType) -> None:
    data = pack(type=int(kind), size=size, length=length)
    try:
        header = decode_header(data)
    except ProtocolError:
        return
    assert header.size == size and header.type is kind


def test_recv_exact_times_out_on_a_silent_peer() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"abc")
        buf = memoryview(bytearray(10))
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="received 3 of 10"):
            recv_exact(a, buf, time.monotonic() + 0.2)
        assert time.monotonic() - start < 1.0


def test_recv_exact_reports_a_closed_connection() -> None:
    a, b = socket.socketpair()
    with a:
        b.sendall(b"abcd")
        b.close()
        with pytest.raises(ConnectionError, match="after 4 of 10"):
            recv_exact(a, memoryview(bytearray(10)), time.monotonic() + 1)


def test_send_all_then_recv_exact_moves_a_large_buffer() -> None:
    a, b = socket.socketpair()
    payload = bytes(range(256)) * 4096
    out = bytearray(len(payload))

    t = threading.Thread(target=send_all, args=(a, memoryview(payload), time.monotonic() + 5))
    with a, b:
        t.start()
        recv_exact(b, memoryview(out), time.monotonic() + 5)
        t.join()
    assert out == payload


@pytest.mark.parametrize(
    "kind",
    [MessageType.AUTH_REQUIRED, MessageType.NO_AUTH, MessageType.TLS_REQUIRED, MessageType.BUSY],
)
def test_refusals_carry_no_payload(kind: MessageType) -> None:
    assert decode_header(encode_header(kind)).type is kind
    with pytest.raises(ProtocolError, match=f"{kind.name} carries no payload"):
        decode_header(encode_header(kind, length=1))


def test_pull_flags_and_narrow_params_decode() -> None:
    pull = decode_header(encode_header(MessageType.PULL, size=10, flags=FLAG_SHM | FLAG_IF_IDLE))
    assert pull.flags == FLAG_SHM | FLAG_IF_IDLE
    params = decode_header(
        encode_header(MessageType.PARAMS, size=10, length=20, dtype=DType.BFLOAT16)
    )
    assert params.dtype is DType.BFLOAT16 and params.length == 20
    int8 = decode_header(encode_header(MessageType.PARAMS, size=300, length=308, dtype=DType.INT8))
    assert int8.dtype is DType.INT8  # 300 values and 2 block scales
    with pytest.raises(ProtocolError, match="does not hold 300 int8 elements"):
        decode_header(encode_header(MessageType.PARAMS, size=300, length=300, dtype=DType.INT8))


def test_shm_answer_round_trip_and_checks() -> None:
    answer = ShmAnswer(1, 42, bytes(range(16)), "dpwa-12-0123456789abcdef")
    assert ShmAnswer.decode(answer.encode()) == answer
    bad = [
        (SHM_ANSWER.pack(2, 0, bytes(16), b"dpwa-1-x"), "slot 2"),
        (SHM_ANSWER.pack(0, 3, bytes(16), b"dpwa-1-x"), "odd"),
        (SHM_ANSWER.pack(0, 0, bytes(16), b""), "name"),
        (SHM_ANSWER.pack(0, 0, bytes(16), b"a\0b"), "name"),
        (SHM_ANSWER.pack(0, 0, bytes(16), b"../\xff"), "name"),
    ]
    for data, message in bad:
        with pytest.raises(ProtocolError, match=message):
            ShmAnswer.decode(data)
