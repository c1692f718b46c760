"""Staleness-corrected blending: blend the peer's lead over our own past, not over our present.

A non-blocking pull runs under many training steps. The peer's snapshot is the peer as it was
when we asked (time ``t0``); blending it into the model as it is when the answer lands
(``local_now = local_t0 + progress``) with factor ``f`` gives ``(1-f) * local_now + f * peer_t0``,
which throws away ``f`` of our own progress since ``t0``: at ``f = 0.5`` and a pull every 20
steps, half of every 20 steps' work. So a non-blocking pull keeps a copy of our model at ``t0``
(the *reference*) and blends

    local_now + f * (peer_t0 - local_t0)

which is the blend that would have happened at ``t0`` with our steps since then replayed on top.
The puller turns its receive buffer into ``peer_t0 - local_t0``, the *lead*, a chunk at a time
as the answer lands (:func:`subtract_squared`, which also sums the lead's squares, so clipping
it, see :mod:`dpwa_core.robust`, needs no pass of its own). Since ``local_now`` is the model
itself, the blend is one pass on the training thread: ``local += f * lead``
(:func:`add_scaled_inplace`, or an adapter's ``add_scaled``), on the slice's elements only for a
slice pull (:mod:`dpwa_core.slices`). A caller that wants a vector to blend toward instead
gets ``local_now + lead`` (``Node.collect`` with ``current``), which the adapters blend with
their ordinary interpolation.

Both passes work a block at a time (no model-sized temporary) and saturate: finite in, finite
out, a block whose float32 result would overflow is recomputed in float64 and clamped to
float32's range.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["add_inplace", "add_scaled_inplace", "subtract_inplace", "subtract_squared"]

_CHUNK = 64 * 1024
_MAX = float(np.finfo(np.float32).max)


def subtract_inplace(out: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``out -= other`` for 1-D float32 arrays, saturating at float32's range; returns ``out``."""
    subtract_squared(out, other, np.empty(min(_CHUNK, out.size), np.float32))
    return out


def subtract_squared(out: np.ndarray, other: np.ndarray, scratch: np.ndarray) -> float:
    """``out -= other`` like :func:`subtract_inplace`, returning the result's sum of squares.

    One pass while the block is in cache: how the puller turns each chunk of an answer into the
    lead as it lands. ``scratch`` is float32 of at least ``min(out.size, 64 Ki)`` elements. The
    sum is exact in float64 terms when float32 would overflow, and NaN when a NaN came in.

    Raises:
        ValueError: the shapes differ or ``scratch`` is too small.
    """
    if out.shape != other.shape:
        raise ValueError(f"cannot subtract arrays of shapes {out.shape} and {other.shape}")
    if scratch.dtype != np.float32 or scratch.size < min(out.size, _CHUNK):
        raise ValueError(
            f"scratch must be float32 of at least {min(out.size, _CHUNK)} elements, got "
            f"{scratch.dtype} of {scratch.size}"
        )
    squares = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, out.size, _CHUNK):
            mine, theirs = out[start : start + _CHUNK], other[start : start + _CHUNK]
            result = scratch[: mine.size]
            np.subtract(mine, theirs, out=result)
            chunk = float(np.dot(result, result))
            if not math.isfinite(chunk):
                # Overflowed (or a NaN came in): the block in float64, clamped.
                wide = mine.astype(np.float64)
                wide -= theirs
                chunk = float(np.dot(wide, wide))
                np.clip(wide, -_MAX, _MAX, out=wide)
                result[...] = wide
            mine[...] = result
            squares += chunk
    return squares


def add_inplace(out: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``out += other`` for 1-D float32 arrays, saturating at float32's range; returns ``out``."""
    if out.shape != other.shape:
        raise ValueError(f"cannot combine arrays of shapes {out.shape} and {other.shape}")
    scratch = np.empty(min(_CHUNK, out.size), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, out.size, _CHUNK):
            mine, theirs = out[start : start + _CHUNK], other[start : start + _CHUNK]
            result = scratch[: mine.size]
            np.add(mine, theirs, out=result)
            if not np.isfinite(result).all():
                # Overflowed (or a NaN came in): redo the block in float64 and clamp.
                wide = mine.astype(np.float64) + theirs.astype(np.float64)
                np.clip(wide, -_MAX, _MAX, out=wide)
                result[...] = wide
            mine[...] = result
    return out


def add_scaled_inplace(out: np.ndarray, values: np.ndarray, factor: float) -> np.ndarray:
    """``out += factor * values`` for 1-D float32 arrays, saturating; returns ``out``.

    A block at a time, like :func:`add_inplace`: finite in, finite out (a block whose float32
    result would overflow is recomputed in float64 and clamped to float32's range, and an element
    that would be NaN keeps its value), and factor 0 leaves ``out`` as it is. The factor is
    rounded to float32, as the arrays are.

    Raises:
        ValueError: the shapes differ or ``out`` is read-only.
    """
    if out.shape != values.shape:
        raise ValueError(f"cannot combine arrays of shapes {out.shape} and {values.shape}")
    if not out.flags.writeable:
        raise ValueError("the array to add into is read-only")
    if factor == 0:
        return out
    weight = np.float32(factor)
    scratch = np.empty(min(_CHUNK, out.size), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, out.size, _CHUNK):
            mine, theirs = out[start : start + _CHUNK], values[start : start + _CHUNK]
            result = scratch[: mine.size]
            np.multiply(theirs, weight, out=result)
            result += mine
            if not np.isfinite(result).all():
                wide = mine.astype(np.float64) + float(factor) * theirs.astype(np.float64)
                np.clip(wide, -_MAX, _MAX, out=wide)
                np.copyto(wide, mine, where=np.isnan(wide))  # a NaN value moves nothing
                result[...] = wide
            mine[...] = result
    return out
