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

from dpwa_core.wire import recv_exact, send_all
from dpwa_core.wire_dtype import (
    CHUNK_ELEMENTS,
    WireDType,
    decode_into,
    encode_chunks,
    wire_dtype,
)

SCRATCH = np.empty(CHUNK_ELEMENTS * 4, np.uint8)


def round_trip(params: np.ndarray, dtype: WireDType) -> np.ndarray:
    encoded = b"".join(bytes(chunk) for chunk in encode_chunks(params, dtype, SCRATCH))
    assert len(encoded) == params.size * dtype.itemsize
    view = memoryview(encoded)
    offset = 0

    def receive(into: memoryview) -> None:
        nonlocal offset
        into[:] = view[offset : offset + len(into)]
        offset += len(into)

    out = np.full(params.size, np.nan, np.float32)
    decode_into(receive, dtype, out, np.empty(CHUNK_ELEMENTS * 2, np.uint8))
    assert offset == len(encoded)
    return out


def test_lookup_by_config_name() -> None:
    assert wire_dtype("bfloat16") is WireDType.BFLOAT16
    assert wire_dtype("Float16").itemsize == 2
    with pytest.raises(ValueError, match="known: float32, float16, bfloat16"):
        wire_dtype("int8")


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
            np.empty(CHUNK_ELEMENTS * 2, np.uint8),
        )

    receiver = threading.Thread(target=receive)
    receiver.start()
    scratch = np.empty(CHUNK_ELEMENTS * 2, np.uint8)
    for chunk in encode_chunks(params, dtype, scratch):
        send_all(left, chunk, time.monotonic() + 10)
    receiver.join(10)
    left.close()
    right.close()
    tolerance = {WireDType.FLOAT32: 0.0, WireDType.FLOAT16: 2**-11, WireDType.BFLOAT16: 2**-8}
    assert np.allclose(out, params, rtol=tolerance[dtype], atol=2**-24)
