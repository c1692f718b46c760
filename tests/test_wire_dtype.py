"""Wire dtypes: rounding, error bounds, chunking, and a round trip through a real socket."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dpwa_core.errors import ProtocolError
from dpwa_core.wire import recv_exact, send_all
from dpwa_core.wire_dtype import (
    CHUNK_ELEMENTS,
    INT8_BLOCK,
    INT8_MAX_SCALE,
    SCRATCH_BYTES,
    WireDType,
    decode_into,
    encode_chunks,
    wire_dtype,
    wire_dtype_for,
)

SCRATCH = np.empty(SCRATCH_BYTES, np.uint8)


def encode(params: np.ndarray, dtype: WireDType) -> bytes:
    encoded = b"".join(bytes(chunk) for chunk in encode_chunks(params, dtype, SCRATCH))
    assert len(encoded) == dtype.payload_bytes(params.size)
    return encoded


def decode(encoded: bytes, dtype: WireDType, size: int) -> np.ndarray:
    view = memoryview(encoded)
    offset = 0

    def receive(into: memoryview) -> None:
        nonlocal offset
        into[:] = view[offset : offset + len(into)]
        offset += len(into)

    out = np.full(size, np.nan, np.float32)
    decode_into(receive, dtype, out, np.empty(SCRATCH_BYTES, np.uint8))
    assert offset == len(encoded)
    return out


def round_trip(params: np.ndarray, dtype: WireDType) -> np.ndarray:
    return decode(encode(params, dtype), dtype, params.size)


def block_absmax(params: np.ndarray) -> np.ndarray:
    """Each value's block's largest magnitude, in float64."""
    wide = np.abs(params.astype(np.float64))
    blocks = [wide[i : i + INT8_BLOCK].max() for i in range(0, wide.size, INT8_BLOCK)]
    return np.repeat(blocks, INT8_BLOCK)[: params.size]


def test_lookup_by_config_name() -> None:
    assert wire_dtype("bfloat16") is WireDType.BFLOAT16
    assert wire_dtype("Float16").itemsize == 2
    assert wire_dtype("int8") is WireDType.INT8
    with pytest.raises(ValueError, match="known: float32, float16, bfloat16, int8"):
        wire_dtype("int4")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", WireDType.FLOAT32),
        ("127.3.4.5", WireDType.FLOAT32),
        ("::1", WireDType.FLOAT32),
        ("[::1]", WireDType.FLOAT32),
        ("::ffff:127.0.0.1", WireDType.FLOAT32),
        ("10.77.0.2", WireDType.INT8),
        ("192.168.1.9", WireDType.INT8),
        ("fe80::1", WireDType.INT8),
        ("not-an-address", WireDType.INT8),
    ],
)
def test_auto_sends_int8_between_hosts_and_float32_over_loopback(
    host: str, expected: WireDType
) -> None:
    assert wire_dtype_for("auto", host) is expected
    assert wire_dtype_for("bfloat16", host) is WireDType.BFLOAT16  # a named dtype is kept
    with pytest.raises(ValueError, match="unknown wire dtype"):
        wire_dtype_for("int4", host)


@pytest.mark.parametrize("size", [1, 255, 256, 257, CHUNK_ELEMENTS, CHUNK_ELEMENTS + 1])
def test_int8_payload_is_values_plus_one_scale_per_block(size: int) -> None:
    blocks = -(-size // INT8_BLOCK)
    assert WireDType.INT8.payload_bytes(size) == size + 4 * blocks
    assert WireDType.BFLOAT16.payload_bytes(size) == 2 * size


def test_float32_is_exact_and_sent_without_a_copy() -> None:
    params = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    (chunk,) = encode_chunks(params, WireDType.FLOAT32, SCRATCH)
    assert np.shares_memory(np.frombuffer(chunk, np.float32), params)
    assert np.array_equal(round_trip(params, WireDType.FLOAT32), params)


finite32 = hnp.arrays(
    np.float32,
    st.integers(1, 300),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=200, deadline=None)
@given(finite32)
def test_bfloat16_error_bound_over_float32_range(params: np.ndarray) -> None:
    back = round_trip(params, WireDType.BFLOAT16)
    finite = np.isfinite(back)  # values within half an ulp of float32's max may round to inf
    error = np.abs(back[finite].astype(np.float64) - params[finite])
    bound = np.maximum(2.0**-8 * np.abs(params[finite].astype(np.float64)), 2.0**-134)
    assert np.all(error <= bound)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 300),
        elements=st.floats(-65000, 65000, width=32, allow_nan=False),
    )
)
def test_float16_error_bound_within_its_range(params: np.ndarray) -> None:
    back = round_trip(params, WireDType.FLOAT16).astype(np.float64)
    bound = np.maximum(2.0**-11 * np.abs(params.astype(np.float64)), 2.0**-25)
    assert np.all(np.abs(back - params) <= bound)


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 3 * INT8_BLOCK + 7),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_int8_error_bound_relative_to_each_block_absmax(params: np.ndarray) -> None:
    back = round_trip(params, WireDType.INT8).astype(np.float64)
    absmax = block_absmax(params)
    assert np.all(np.isfinite(back))
    tiny = absmax < 127 * 2.0**-126  # such blocks are sent as zeros
    bound = np.where(tiny, absmax, absmax / 254 * (1 + 2.0**-22))
    assert np.all(np.abs(back - params) <= bound)


def test_int8_extremes_of_a_block_and_zero_blocks_are_exact() -> None:
    params = np.zeros(3 * INT8_BLOCK, np.float32)
    params[0], params[1] = 3.5, -3.5  # block 0: its absmax both ways; block 1 stays zero
    params[2 * INT8_BLOCK :] = np.linspace(-1e30, 1e30, INT8_BLOCK)
    back = round_trip(params, WireDType.INT8)
    assert back[0] == 3.5 and back[1] == -3.5
    assert not back[INT8_BLOCK : 2 * INT8_BLOCK].any()
    assert back[2 * INT8_BLOCK] == pytest.approx(-1e30, rel=2**-20)


def test_int8_nonfinite_block_gets_a_scale_every_receiver_refuses() -> None:
    params = np.ones(2 * INT8_BLOCK, np.float32)
    params[INT8_BLOCK + 3] = np.inf
    encoded = encode(params, WireDType.INT8)
    with pytest.raises(ProtocolError, match="int8 block 1 has scale nan"):
        decode(encoded, WireDType.INT8, params.size)


@pytest.mark.parametrize("scale", [-1.0, np.inf, np.nan, INT8_MAX_SCALE * 1.01])
def test_int8_hostile_scales_are_refused_before_any_value_is_written(scale: float) -> None:
    size = CHUNK_ELEMENTS + 2 * INT8_BLOCK  # the bad scale is in the second chunk
    encoded = bytearray(encode(np.ones(size, np.float32), WireDType.INT8))
    second = 4 * (CHUNK_ELEMENTS // INT8_BLOCK) + CHUNK_ELEMENTS  # where chunk 2 starts
    encoded[second + 4 : second + 8] = np.float32(scale).tobytes()
    out = np.full(size, 7.0, np.float32)
    view, offset = memoryview(bytes(encoded)), 0

    def receive(into: memoryview) -> None:
        nonlocal offset
        into[:] = view[offset : offset + len(into)]
        offset += len(into)

    with pytest.raises(ProtocolError, match=f"int8 block {CHUNK_ELEMENTS // INT8_BLOCK + 1} "):
        decode_into(receive, WireDType.INT8, out, np.empty(SCRATCH_BYTES, np.uint8))
    assert np.all(out[:CHUNK_ELEMENTS] == 1.0) and np.all(out[CHUNK_ELEMENTS:] == 7.0)


def test_int8_largest_legal_scale_stays_finite() -> None:
    size = INT8_BLOCK
    encoded = bytearray(np.float32(INT8_MAX_SCALE).tobytes() + b"\x81" * size)  # q = -127
    back = decode(bytes(encoded), WireDType.INT8, size)
    assert np.all(np.isfinite(back)) and back[0] < -3e38


def test_bfloat16_rounds_to_nearest_even_like_a_reference() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    params = bits.view(np.float32)
    params = params[np.isfinite(params)]
    ours = round_trip(params, WireDType.BFLOAT16)
    reference = params.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(ours, reference, equal_nan=True)


def test_special_values() -> None:
    params = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, 65504, 70000], np.float32)
    bf = round_trip(params, WireDType.BFLOAT16)
    assert np.isnan(bf[0]) and bf[1] == np.inf and bf[2] == -np.inf
    assert np.signbit(bf[4]) and bf[5] == pytest.approx(1e30, rel=2**-8)
    half = round_trip(params, WireDType.FLOAT16)
    assert np.isnan(half[0]) and half[6] == 65504 and half[7] == np.inf


def test_chunk_boundaries() -> None:
    size = 2 * CHUNK_ELEMENTS + 3
    params = np.arange(size, dtype=np.float32) % 251 - 125
    for dtype in (WireDType.FLOAT16, WireDType.BFLOAT16):
        assert np.array_equal(round_trip(params, dtype), params)  # small integers are exact
    quantized = round_trip(params, WireDType.INT8)
    assert np.all(np.abs(quantized - params) <= 125 / 254 * (1 + 2**-22))


@pytest.mark.parametrize("dtype", list(WireDType))
def test_through_a_real_socket(dtype: WireDType) -> None:
    params = np.random.default_rng(2).standard_normal(CHUNK_ELEMENTS + 17).astype(np.float32)
    left, right = socket.socketpair()
    out = np.empty_like(params)

    def receive() -> None:
        decode_into(
            lambda into: recv_exact(right, into, time.monotonic() + 10),
            dtype,
            out,
            np.empty(SCRATCH_BYTES, np.uint8),
        )

    receiver = threading.Thread(target=receive)
    receiver.start()
    scratch = np.empty(SCRATCH_BYTES, np.uint8)
    for chunk in encode_chunks(params, dtype, scratch):
        send_all(left, chunk, time.monotonic() + 10)
    receiver.join(10)
    left.close()
    right.close()
    if dtype is WireDType.INT8:
        assert np.all(np.abs(out - params) <= block_absmax(params) / 254 * (1 + 2**-22))
        return
    tolerance = {WireDType.FLOAT32: 0.0, WireDType.FLOAT16: 2**-11, WireDType.BFLOAT16: 2**-8}
    assert np.allclose(out, params, rtol=tolerance[dtype], atol=2**-24)
