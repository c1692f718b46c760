"""Wire dtypes: send parameters as float32, float16, bfloat16 or int8; always compute in float32.

A node converts its float32 snapshot to its configured ``wire_dtype`` as it sends, and a
receiver converts whatever dtype the header names back to float32 as it receives, so peers with
different wire dtypes still talk. ``auto`` (the default) sends int8 to peers on other hosts and
float32 to peers connected through a loopback address, where bytes cost nothing but the
conversion would (see :func:`wire_dtype_for`). Conversion runs chunk by chunk through a
scratch buffer of :data:`CHUNK_ELEMENTS` elements, so it never allocates anything the size of
the model.

Error added by one round trip (float32 -> wire -> float32), per element ``x``:

- ``float16``: round to nearest even with an 11-bit significand: ``|error| <= 2**-11 * |x|`` for
  ``6.1e-5 <= |x| <= 65504``, ``|error| <= 2**-25`` below that range. Values beyond 65504 become
  infinite (and a receiver refuses non-finite parameters), so use it for weights well within
  that range.
- ``bfloat16``: round to nearest even with an 8-bit significand: ``|error| <= 2**-8 * |x|`` over
  float32's whole normal range (``|error| <= 2**-134`` for float32 subnormals). NaN stays NaN.
- ``int8``: blockwise absmax quantization. Each block of :data:`INT8_BLOCK` consecutive values
  is sent as one float32 ``scale = absmax / 127`` and one int8 ``q = round(x / scale)`` per
  value, so ``|error| <= scale / 2 = absmax / 254`` for every value of the block, plus float32
  rounding (a relative ``2**-22``); a block whose absmax is below ``127 * 2**-126`` (1.5e-36) is
  sent as zeros. That is a little over a quarter of float32's bytes. A block holding NaN or Inf
  gets a NaN scale, which every receiver refuses. A receiver checks every scale (finite, not
  negative, at most :data:`INT8_MAX_SCALE`) before it uses the block.

An int8 payload is a sequence of chunks of :data:`CHUNK_ELEMENTS` values (the last one shorter):
each chunk is its blocks' float32 scales, little-endian, followed by its int8 values. Chunks
are whole blocks, so the payload of ``n`` values is ``n + 4 * ceil(n / INT8_BLOCK)`` bytes.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterator

import numpy as np

from dpwa_core.errors import ProtocolError

__all__ = [
    "CHUNK_ELEMENTS",
    "INT8_BLOCK",
    "INT8_MAX_SCALE",
    "SCRATCH_BYTES",
    "WireDType",
    "decode_into",
    "encode_chunks",
    "wire_dtype",
    "wire_dtype_for",
]

CHUNK_ELEMENTS = 1 << 16
"""Elements converted per chunk (256 KiB of float32)."""
INT8_BLOCK = 256
"""Values that share one float32 scale in an ``int8`` payload."""
INT8_MAX_SCALE = float(np.nextafter(np.float32(np.finfo(np.float32).max / 127), np.float32(0)))
"""The largest scale sent or accepted: ``127 * scale`` is still a finite float32."""
_TINY = float(np.finfo(np.float32).tiny)
_BLOCKS = CHUNK_ELEMENTS // INT8_BLOCK  # blocks per whole chunk
_INT8_CHUNK_BYTES = 4 * _BLOCKS + CHUNK_ELEMENTS  # one chunk's scales and values
SCRATCH_BYTES = _INT8_CHUNK_BYTES + 4 * CHUNK_ELEMENTS + 4 * _BLOCKS
"""Size of the uint8 buffer :func:`encode_chunks` and :func:`decode_into` need for any dtype."""


class WireDType(enum.IntEnum):
    """Element type of a PARAMS payload; the wire header's dtype byte."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    INT8 = 4

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire (for ``int8``, not counting its block scales)."""
        return _ITEMSIZE[self]

    def payload_bytes(self, size: int) -> int:
        """Bytes of a PARAMS payload of ``size`` elements in this dtype."""
        if self is WireDType.INT8:
            return size + 4 * -(-size // INT8_BLOCK)
        return size * self.itemsize


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


def wire_dtype_for(name: str, host: str) -> WireDType:
    """What a node configured with ``wire_dtype: name`` sends to a peer connected from ``host``.

    Args:
        name: the config value: ``auto`` or a dtype name (see :func:`wire_dtype`).
        host: the peer's address as the server sees it, e.g. ``"10.0.0.7"`` or ``"::1"``.

    Returns:
        For ``auto``: float32 when ``host`` is a loopback address, int8 otherwise (a host
        name that is not an address counts as another host). Otherwise the named dtype.

    Raises:
        ValueError: unknown name.
    """
    if name != "auto":
        return wire_dtype(name)
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return WireDType.INT8
    mapped = getattr(address, "ipv4_mapped", None)
    return WireDType.FLOAT32 if (mapped or address).is_loopback else WireDType.INT8


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
        scratch: a uint8 buffer of at least :data:`SCRATCH_BYTES` bytes; each yielded chunk
            lives in it until the next one is requested.

    Yields:
        For float32, one view of ``params`` itself (no copy); otherwise consecutive chunks.
    """
    if dtype is WireDType.FLOAT32:
        yield params.data.cast("B")
        return
    if dtype is WireDType.INT8:
        for start in range(0, params.size, CHUNK_ELEMENTS):
            yield _to_int8(params[start : start + CHUNK_ELEMENTS], scratch)
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
    landed: Callable[[int, int], object] | None = None,
) -> None:
    """Receive a payload of ``out.size`` elements of ``dtype`` and convert it into ``out``.

    Args:
        receive: fills the whole memoryview it is given (for example from a socket).
        dtype: the payload's dtype, from its header.
        out: 1-D float32 destination.
        scratch: a uint8 buffer of at least :data:`SCRATCH_BYTES` bytes.
        landed: called with ``(start, stop)`` after ``out[start:stop]`` was converted, while
            it is in cache (not for ``float32``, which lands in ``out`` in one receive).

    Raises:
        ProtocolError: an ``int8`` block scale is not finite, negative or above
            :data:`INT8_MAX_SCALE` (checked before the block is written to ``out``).
    """
    if dtype is WireDType.FLOAT32:
        receive(out.data.cast("B"))
        return
    if dtype is WireDType.INT8:
        for start in range(0, out.size, CHUNK_ELEMENTS):
            chunk = out[start : start + CHUNK_ELEMENTS]
            blocks = -(-chunk.size // INT8_BLOCK)
            raw = scratch[: 4 * blocks + chunk.size]
            receive(raw.data)
            _from_int8(raw, blocks, chunk, start)
            if landed is not None:
                landed(start, start + chunk.size)
        return
    decode = _DECODE[dtype]
    for start in range(0, out.size, CHUNK_ELEMENTS):
        chunk = out[start : start + CHUNK_ELEMENTS]
        raw = scratch[: chunk.size * 2]
        receive(raw.data)
        decode(raw.view(np.uint16), chunk)
        if landed is not None:
            landed(start, start + chunk.size)


def _to_float16(src: np.ndarray, out: np.ndarray) -> None:
    with np.errstate(over="ignore"):  # beyond 65504 becomes inf, as documented
        out.view(np.float16)[:] = src


def _from_float16(src: np.ndarray, out: np.ndarray) -> None:
    out[:] = src.view(np.float16)


def _split(size: int) -> tuple[int, int]:
    """``(values in whole blocks, whole blocks)`` of a chunk of ``size`` values."""
    whole = size // INT8_BLOCK
    return whole * INT8_BLOCK, whole


def _to_int8(src: np.ndarray, scratch: np.ndarray) -> memoryview:
    """Quantize one chunk into the front of ``scratch``; the bytes to send (scales, values)."""
    size = src.size
    blocks = -(-size // INT8_BLOCK)
    full, whole = _split(size)
    out = scratch[: 4 * blocks + size]
    scales = out[: 4 * blocks].view("<f4")
    values = out[4 * blocks :].view(np.int8)
    work_at = _INT8_CHUNK_BYTES
    work = scratch[work_at : work_at + 4 * size].view(np.float32)
    inverse = scratch[work_at + 4 * CHUNK_ELEMENTS :][: 4 * blocks].view(np.float32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        np.abs(src, out=work)
        if whole:
            np.max(work[:full].reshape(whole, INT8_BLOCK), axis=1, out=scales[:whole])
        if full < size:
            scales[whole] = work[full:].max()
        scales /= 127
        scales[scales == np.inf] = np.nan  # a block holding Inf: refused like one holding NaN
        np.minimum(scales, INT8_MAX_SCALE, out=scales)  # NaN stays NaN
        scales[scales < _TINY] = 0  # below float32's normal range 1 / scale would overflow
        np.divide(1.0, scales, out=inverse)
        inverse[~(scales > 0)] = 0  # an all-zero block; a NaN scale marks a non-finite block
        if whole:
            np.multiply(
                src[:full].reshape(whole, INT8_BLOCK),
                inverse[:whole, None],
                out=work[:full].reshape(whole, INT8_BLOCK),
            )
        if full < size:
            np.multiply(src[full:], inverse[whole], out=work[full:])
        np.rint(work, out=work)
        np.clip(work, -127, 127, out=work)
        np.copyto(values, work, casting="unsafe")
    return out.data.cast("B")


def _from_int8(raw: np.ndarray, blocks: int, out: np.ndarray, offset: int) -> None:
    """Check one received chunk's scales, then write its values into ``out``."""
    scales = raw[: 4 * blocks].view("<f4")
    if not (np.all(scales >= 0) and np.all(scales <= INT8_MAX_SCALE)):  # False for NaN too
        bad = int(np.flatnonzero(~((scales >= 0) & (scales <= INT8_MAX_SCALE)))[0])
        raise ProtocolError(
            f"int8 block {offset // INT8_BLOCK + bad} has scale {float(scales[bad])!r}; a "
            f"scale must be finite, not negative and at most {INT8_MAX_SCALE:.4g}"
        )
    values = raw[4 * blocks :].view(np.int8)
    full, whole = _split(out.size)
    with np.errstate(over="ignore"):  # only q = -128 at the largest scale: refused as Inf later
        if whole:
            np.multiply(
                values[:full].reshape(whole, INT8_BLOCK),
                scales[:whole, None],
                out=out[:full].reshape(whole, INT8_BLOCK),
            )
        if full < out.size:
            np.multiply(values[full:], scales[whole], out=out[full:])


_ITEMSIZE = {WireDType.FLOAT32: 4, WireDType.FLOAT16: 2, WireDType.BFLOAT16: 2, WireDType.INT8: 1}
_ENCODE: dict[WireDType, Callable[[np.ndarray, np.ndarray], None]] = {
    WireDType.FLOAT16: _to_float16,
    WireDType.BFLOAT16: _to_bfloat16,
}
_DECODE: dict[WireDType, Callable[[np.ndarray, np.ndarray], None]] = {
    WireDType.FLOAT16: _from_float16,
    WireDType.BFLOAT16: _from_bfloat16,
}
