"""Wire dtypes: send parameters as float32, float16 or bfloat16; always compute in float32.

A node converts its float32 snapshot to its configured ``wire_dtype`` as it sends, and a
receiver converts whatever dtype the header names back to float32 as it receives, so peers with
different wire dtypes still talk. Conversion runs chunk by chunk through a scratch buffer of
:data:`CHUNK_ELEMENTS` elements, so it never allocates anything the size of the model.

Error added by one round trip (float32 -> wire -> float32), per element ``x``:

- ``float16``: round to nearest even with an 11-bit significand: ``|error| <= 2**-11 * |x|`` for
  ``6.1e-5 <= |x| <= 65504``, ``|error| <= 2**-25`` below that range. Values beyond 65504 become
  infinite (and a receiver refuses non-finite parameters), so use it for weights well within
  that range.
- ``bfloat16``: round to nearest even with an 8-bit significand: ``|error| <= 2**-8 * |x|`` over
  float32's whole normal range (``|error| <= 2**-134`` for float32 subnormals). NaN stays NaN.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["CHUNK_ELEMENTS", "WireDType", "decode_into", "encode_chunks", "wire_dtype"]

CHUNK_ELEMENTS = 1 << 16
"""Elements converted per chunk (256 KiB of float32)."""


class WireDType(enum.IntEnum):
    """Element type of a PARAMS payload; the wire header's dtype byte."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire."""
        return 4 if self is WireDType.FLOAT32 else 2


def wire_dtype(name: str) -> WireDType:
    """Look up a wire dtype by its config name (``float32``, ``float16`` or ``bfloat16``).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    try:
        return WireDType[name.upper()]
    except KeyError:
        known = ", ".join(member.name.lower() for member in WireDType)
        raise ValueError(f"unknown wire dtype {name!r}; known: {known}") from None


def _to_bfloat16(src: np.ndarray, out: np.ndarray) -> None:
    """Round float32 ``src`` to bfloat16 bit patterns in uint16 ``out`` (nearest even)."""
    bits = src.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits  # wraps only for NaN patterns, fixed below
    rounded >>= 16
    out[:] = rounded
    nan = np.isnan(src)
    if nan.any():
        out[nan] = (bits[nan] >> 16) | 0x0040  # keep sign and payload, force a quiet NaN


def _from_bfloat16(src: np.ndarray, out: np.ndarray) -> None:
    wide = out.view(np.uint32)
    wide[:] = src
    wide <<= 16


def encode_chunks(
    params: np.ndarray, dtype: WireDType, scratch: np.ndarray
) -> Iterator[memoryview]:
    """Yield ``params`` converted to ``dtype``, chunk by chunk, as bytes ready to send.

    Args:
        params: 1-D float32 array.
        dtype: the wire dtype to send.
        scratch: a uint8 buffer of at least ``CHUNK_ELEMENTS * dtype.itemsize`` bytes; each
            yielded chunk lives in it until the next one is requested.

    Yields:
        For float32, one view of ``params`` itself (no copy); otherwise consecutive chunks.
    """
    if dtype is WireDType.FLOAT32:
        yield params.data.cast("B")
        return
    encode = _ENCODE[dtype]
    for start in range(0, params.size, CHUNK_ELEMENTS):
        chunk = params[start : start + CHUNK_ELEMENTS]
        out = scratch[: chunk.size * 2].view(np.uint16)
        encode(chunk, out)
        yield out.data.cast("B")


def decode_into(
    receive: Callable[[memoryview], None],
    dtype: WireDType,
    out: np.ndarray,
    scratch: np.ndarray,
) -> None:
    """Receive a payload of ``out.size`` elements of ``dtype`` and convert it into ``out``.

    Args:
        receive: fills the whole memoryview it is given (for example from a socket).
        dtype: the payload's dtype, from its header.
        out: 1-D float32 destination.
        scratch: a uint8 buffer of at least ``CHUNK_ELEMENTS * 2`` bytes.
    """
    if dtype is WireDType.FLOAT32:
        receive(out.data.cast("B"))
        return
    decode = _DECODE[dtype]
    for start in range(0, out.size, CHUNK_ELEMENTS):
        chunk = out[start : start + CHUNK_ELEMENTS]
        raw = scratch[: chunk.size * 2]
        receive(raw.data)
        decode(raw.view(np.uint16), chunk)


def _to_float16(src: np.ndarray, out: np.ndarray) -> None:
    with np.errstate(over="ignore"):  # beyond 65504 becomes inf, as documented
        out.view(np.float16)[:] = src


def _from_float16(src: np.ndarray, out: np.ndarray) -> None:
    out[:] = src.view(np.float16)


_ENCODE: dict[WireDType, Callable[[np.ndarray, np.ndarray], None]] = {
    WireDType.FLOAT16: _to_float16,
    WireDType.BFLOAT16: _to_bfloat16,
}
_DECODE: dict[WireDType, Callable[[np.ndarray, np.ndarray], None]] = {
    WireDType.FLOAT16: _from_float16,
    WireDType.BFLOAT16: _from_bfloat16,
}
