"""Overflow-safe ``lerp_`` for torch tensors: finite in, finite out, a chunk at a time.

``torch.lerp`` computes ``a + w * (b - a)`` (``b - (b - a) * (1 - w)`` from ``w`` 0.5 on); for
finite float32 ``a`` and ``b`` the only step that can overflow is ``b - a`` (both far out, of
opposite signs: a peer sending -3e38 and +3e38), and the result is then Inf or NaN.

On the CPU, :func:`lerp_` first bounds the peer's values with numpy (the sum of squares of each
block finite): then every ``|b| < 2**64``, so ``b - a`` cannot overflow for any finite ``a``
(``2**64`` is far below half a unit in the last place of the float32 maximum), and the blend is
one ``torch.lerp_`` over the whole tensor, bit for bit as before (one parallel region: many
small torch calls cost a time slice each on a loaded machine). When the bound fails (a peer's
values beyond 1.8e19), the tensor is blended a chunk of 1 Mi elements at a time: chunks within
the bound by ``lerp_``, the others in float64, rounded back. On other devices, where reading a
bound back would wait for the device, every chunk is blended as halves,
``2 * lerp(a / 2, b / 2, w)``: the difference of the halves cannot overflow, and the result
equals ``lerp(a, b, w)`` bit for bit wherever the halves are normal numbers.

:func:`add_` (``a += w * b``, how a staleness-corrected pull is blended) rests on the same bound:
when every ``|b| < 2**64`` the sum rounds to at most the float32 maximum, so it is one
``add_``; otherwise ``b`` is first bounded to ``±2**64`` (NaN to 0: it moves nothing).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["add_", "bounded", "lerp_"]

_CHUNK = 1024 * 1024
"""Elements per chunk (4 MiB of float32)."""

_BOUND = 2.0**64
"""Peer values below this in magnitude cannot make ``peer - local`` overflow float32."""


def lerp_(
    target: torch.Tensor, end: torch.Tensor, weight: float, values: np.ndarray | None = None
) -> torch.Tensor:
    """``target.lerp_(end, weight)`` that never turns finite values into Inf or NaN.

    Args:
        target: a float32 or float64 tensor, blended in place (any shape and strides).
        end: a tensor of ``target``'s shape, dtype and device (the peer's values).
        weight: in ``[0, 1]``, already validated.
        values: the peer's values as a 1-D float32 numpy array (any order), when at hand: if
            they are all within ``±2**64`` (checked with numpy, a block at a time), a CPU blend
            is one ``lerp_`` over the whole tensor, as fast as before; else chunk by chunk.

    Returns:
        ``target``.
    """
    if weight == 0:
        return target  # inf * 0 would be NaN; taking nothing is exact
    if weight == 1:
        return target.copy_(end)
    cpu = target.device.type == "cpu"
    if cpu and (target.dtype == torch.float64 or (values is not None and bounded(values))):
        return target.lerp_(end, weight)  # one pass, one parallel region: nothing can overflow
    if target.dim() == 0:
        target, end = target.view(1), end.view(1)
    if target.is_contiguous() and end.is_contiguous():
        target, end = target.view(-1), end.view(-1)
        dim = 0
    else:  # chunk along the peer's outermost dimension in memory, for locality
        dim = max(range(end.dim()), key=lambda d: (end.stride(d), -d))
    length = target.shape[dim]
    inner = max(1, target.numel() // length) if length else 1
    step = max(1, _CHUNK // inner)
    for start in range(0, length, step):
        size = min(step, length - start)
        part = target.narrow(dim, start, size)
        other = end.narrow(dim, start, size)
        if not cpu:
            _halves_(part, other, weight)
        elif target.dtype == torch.float64 or _bounded(other):
            part.lerp_(other, weight)  # float64 cannot overflow on float32-range values
        else:
            _wide_(part, other, weight)
    return target


def add_(
    target: torch.Tensor, values: torch.Tensor, weight: float, array: np.ndarray | None = None
) -> torch.Tensor:
    """``target.add_(values, alpha=weight)`` that never turns finite values into Inf or NaN.

    Args:
        target: a float32 or float64 tensor, updated in place.
        values: a tensor of ``target``'s shape, dtype and device (the peer's lead).
        weight: in ``[0, 1]``, already validated.
        array: ``values`` as a 1-D float32 numpy array, when at hand: if it is within
            ``±2**64`` (checked a block at a time) the update is one ``add_``.

    Returns:
        ``target``.
    """
    if weight == 0:
        return target
    if target.device.type == "cpu" and array is not None and bounded(array):
        return target.add_(values, alpha=weight)
    safe = torch.nan_to_num(values, nan=0.0).clamp_(-_BOUND, _BOUND)
    return target.add_(safe, alpha=weight)


def bounded(values: np.ndarray) -> bool:
    """Whether every value of a 1-D float32 array lies strictly within ``±2**64``.

    The sum of squares of a block is finite exactly when no value reaches ``2**64`` (or when
    several add up past the float32 range, which only sends the blend the slow way).
    """
    if values.dtype != np.float32 or values.ndim != 1:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, values.size, _CHUNK):
            block = values[start : start + _CHUNK]
            if not math.isfinite(float(np.dot(block, block))):
                return False
    return True


def _bounded(values: torch.Tensor) -> bool:
    """Whether every value of a CPU tensor lies strictly within ``±2**64``."""
    if values.dim() == 1 and values.is_contiguous() and values.dtype == torch.float32:
        flat = values.numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            return math.isfinite(float(np.dot(flat, flat)))  # < float32 max => |v| < 2**64
    low, high = torch.aminmax(values)
    return float(low) > -_BOUND and float(high) < _BOUND


def _wide_(part: torch.Tensor, other: torch.Tensor, weight: float) -> None:
    """Blend a CPU chunk in float64 (halves for float64) and round it back, clamped to range."""
    if part.dtype == torch.float64:
        _halves_(part, other, weight)
        return
    blended = torch.lerp(part.double(), other.double(), weight)
    info = torch.finfo(part.dtype)
    part.copy_(blended.clamp_(info.min, info.max))


def _halves_(part: torch.Tensor, other: torch.Tensor, weight: float) -> None:
    """``part = 2 * lerp(part / 2, other / 2, weight)``: no step of it can overflow."""
    half = other * 0.5
    part.mul_(0.5).lerp_(half, weight).mul_(2.0)
