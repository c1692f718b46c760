"""Staleness-corrected blending: blend the peer's lead over our own past, not over our present.

A non-blocking pull runs under many training steps. The peer's snapshot is the peer as it was
when we asked (time ``t0``); blending it into the model as it is when the answer lands
(``local_now = local_t0 + progress``) with factor ``f`` gives ``(1-f) * local_now + f * peer_t0``,
which throws away ``f`` of our own progress since ``t0``: at ``f = 0.5`` and a pull every 20
steps, half of every 20 steps' work. So a non-blocking pull keeps a copy of our model at ``t0``
(the *reference*) and blends

    local_now + f * (peer_t0 - local_t0)

which is the blend that would have happened at ``t0`` with our steps since then replayed on top.
The puller turns its receive buffer into ``peer_t0 - local_t0`` (after clipping it, see
:mod:`dpwa_core.robust`); the training thread adds ``local_now`` back when it blends, so the
adapters blend toward ``local_now + (peer_t0 - local_t0)`` with their ordinary interpolation.

Both passes work a block at a time (no model-sized temporary) and saturate: finite in, finite
out, a block whose float32 result would overflow is recomputed in float64 and clamped to
float32's range.
"""

from __future__ import annotations

import numpy as np

__all__ = ["add_inplace", "subtract_inplace"]

_CHUNK = 64 * 1024
_MAX = float(np.finfo(np.float32).max)


def subtract_inplace(out: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``out -= other`` for 1-D float32 arrays, saturating at float32's range; returns ``out``."""
    return _combine(out, other, -1.0)


def add_inplace(out: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``out += other`` for 1-D float32 arrays, saturating at float32's range; returns ``out``."""
    return _combine(out, other, 1.0)


def _combine(out: np.ndarray, other: np.ndarray, sign: float) -> np.ndarray:
    if out.shape != other.shape:
        raise ValueError(f"cannot combine arrays of shapes {out.shape} and {other.shape}")
    scratch = np.empty(min(_CHUNK, out.size), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, out.size, _CHUNK):
            mine, theirs = out[start : start + _CHUNK], other[start : start + _CHUNK]
            result = scratch[: mine.size]
            if sign > 0:
                np.add(mine, theirs, out=result)
            else:
                np.subtract(mine, theirs, out=result)
            if not np.isfinite(result).all():
                # Overflowed (or a NaN came in): redo the block in float64 and clamp.
                wide = mine.astype(np.float64) + sign * theirs.astype(np.float64)
                np.clip(wide, -_MAX, _MAX, out=wide)
                result[...] = wide
            mine[...] = result
    return out
