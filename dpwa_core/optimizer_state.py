"""The layout of an optimizer's state: its tensors, in order, carried as one flat float32 buffer.

A node that catches up from a peer, or resumes from a checkpoint, can take the optimizer's
state (momentum, Adam's moments, step counters) as well as the model. The state moves like the
model does: as one flat float32 vector, described by its own :class:`OptimizerLayout` whose
fingerprint is compared before a single value is used. The adapters build the layout
(:meth:`dpwa_core.adapters.Adapter.optimizer_layout`) and copy the state out and back in.

Everything is carried as float32. Integer counters (Adam's step in Keras and optax, Keras's
``iterations``) are exact up to 2**24 steps; a counter beyond that is refused rather than
rounded, and a value that comes back for an integer tensor must be a whole number.

This module imports no framework.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from dpwa_core.errors import AdapterError

__all__ = [
    "sign_violation",
    "MAX_EXACT_INTEGER",
    "OptT",
    "OptimizerLayout",
    "check_integers",
    "optimizer_output_flat",
    "validate_optimizer_flat",
]

MAX_EXACT_INTEGER = 2**24
"""The largest integer magnitude float32 holds exactly: counters are carried up to this."""

OptT = TypeVar("OptT")
"""An optimizer (or optax state): :meth:`~dpwa_core.adapters.Adapter.optimizer_from_flat`
returns the type it was given (the same object for PyTorch and Keras, a new one for optax)."""

_DESCRIBE_TENSORS = 6  # names spelled out in a description before eliding the rest
_DESCRIBE_KIND = 120  # characters of the kind shown (optax kinds hold a whole tree structure)
_HASH_TAG = "dpwa.optimizer.v1"  # keeps these hashes apart from model layout hashes


@dataclass(frozen=True)
class OptimizerLayout:
    """The ordered tensors of an optimizer's state, carried as one flat float32 buffer.

    Args:
        kind: what produced the state, e.g. ``"torch.optim.Adam"``,
            ``"keras.optimizers.Adam"``, or ``"optax"`` and the state's tree structure.
        names: one unique name per tensor, in buffer order, e.g. ``"3.exp_avg"`` (the
            parameter's index in the model, then the state's key).
        shapes: one tuple of non-negative ints per tensor; ``()`` for a scalar.

    Raises:
        ValueError: ``kind`` is empty, names repeat, or names and shapes differ in number.

    Example:
        >>> layout = OptimizerLayout("torch.optim.SGD", ("0.momentum_buffer",), ((3, 2),))
        >>> layout.size, layout.nbytes
        (6, 24)
    """

    kind: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __init__(self, kind: str, names: Iterable[str], shapes: Iterable[Sequence[int]]) -> None:
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"an optimizer layout needs a non-empty kind, got {kind!r}")
        names = tuple(str(name) for name in names)
        normalized = []
        for shape in shapes:
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"a layout shape cannot have a negative dimension: {dims}")
            normalized.append(dims)
        if len(names) != len(normalized):
            raise ValueError(
                f"an optimizer layout needs one name per shape: {len(names)} names, "
                f"{len(normalized)} shapes"
            )
        if len(set(names)) != len(names):
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"optimizer state names must be unique, repeated: {repeated}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", tuple(normalized))

    @property
    def size(self) -> int:
        """Total number of float32 elements (0 for a stateless optimizer such as plain SGD)."""
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def nbytes(self) -> int:
        """Size of the flat float32 buffer in bytes."""
        return 4 * self.size

    @property
    def shape_hash(self) -> int:
        """A 64-bit hash of the kind, the names and the shapes (not the values)."""
        text = json.dumps(
            [_HASH_TAG, self.kind, list(self.names), [list(s) for s in self.shapes]],
            separators=(",", ":"),
            ensure_ascii=True,
        )
        digest = hashlib.blake2b(text.encode("ascii"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    @property
    def fingerprint(self) -> tuple[int, int]:
        """``(size, shape_hash)``: what the wire and checkpoints carry to compare layouts."""
        return self.size, self.shape_hash

    def describe(self) -> str:
        """A short human-readable summary, for log lines and error messages.

        Example:
            >>> layout = OptimizerLayout("torch.optim.Adam", ("0.step", "0.exp_avg"), ((), (2,)))
            >>> print(layout.describe())  # doctest: +ELLIPSIS
            torch.optim.Adam: 3 elements, shape hash ..., 2 tensors [0.step:scalar, 0.exp_avg:2]
        """
        kind = self.kind
        if len(kind) > _DESCRIBE_KIND:
            kind = kind[: _DESCRIBE_KIND - 3] + "..."
        shown = ", ".join(
            f"{name}:{'x'.join(str(d) for d in shape) or 'scalar'}"
            for name, shape in zip(
                self.names[:_DESCRIBE_TENSORS], self.shapes[:_DESCRIBE_TENSORS], strict=True
            )
        )
        more = len(self.names) - _DESCRIBE_TENSORS
        if more > 0:
            shown += f", ... {more} more"
        return (
            f"{kind}: {self.size} elements, shape hash {self.shape_hash:016x}, "
            f"{len(self.names)} tensors [{shown}]"
        )


def validate_optimizer_flat(
    flat: object, layout: OptimizerLayout, *, name: str = "flat"
) -> npt.NDArray[np.float32]:
    """Check a buffer of optimizer state before anything is written from it.

    Args:
        flat: the candidate buffer.
        layout: the optimizer's layout, which the buffer must match.
        name: what to call the buffer in error messages.

    Returns:
        ``flat`` itself, typed as a float32 array.

    Raises:
        AdapterError: ``flat`` is not a 1-D float32 numpy array of ``layout.size`` elements, or
            holds NaN or infinite values.
    """
    if not isinstance(flat, np.ndarray):
        raise AdapterError(
            f"optimizer state {name} must be a numpy float32 array, got {type(flat).__name__}"
        )
    if flat.dtype != np.float32:
        raise AdapterError(
            f"optimizer state {name} must have dtype float32, got {flat.dtype}; "
            f"convert it with {name}.astype(np.float32)"
        )
    if flat.ndim != 1:
        raise AdapterError(f"optimizer state {name} must be 1-D, got shape {flat.shape}")
    if flat.size != layout.size:
        raise AdapterError(
            f"optimizer state {name} has {flat.size} elements but the optimizer has "
            f"{layout.size} ({layout.describe()}); both sides must use the same optimizer on "
            "the same model"
        )
    if not np.isfinite(flat).all():
        bad = int(np.size(flat) - np.count_nonzero(np.isfinite(flat)))
        raise AdapterError(
            f"optimizer state {name} holds {bad} NaN or infinite values; nothing was written"
        )
    return flat


def optimizer_output_flat(out: object | None, layout: OptimizerLayout) -> npt.NDArray[np.float32]:
    """The buffer an ``optimizer_to_flat(..., out=out)`` call fills: ``out`` checked, or new.

    Args:
        out: ``None``, or the caller's writable, C-contiguous, 1-D float32 array.
        layout: the layout it must hold.

    Raises:
        AdapterError: ``out`` does not fit ``layout`` or cannot be written.
    """
    if out is None:
        return np.empty(layout.size, dtype=np.float32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.ndim != 1
        or out.size != layout.size
        or not (out.flags.writeable and out.flags.c_contiguous)
    ):
        got = (
            f"{out.dtype} array of shape {out.shape}"
            if isinstance(out, np.ndarray)
            else type(out).__name__
        )
        raise AdapterError(
            f"out must be a writable, C-contiguous float32 array of {layout.size} elements "
            f"({layout.describe()}), got {got}; allocate it with "
            f"np.empty({layout.size}, dtype=np.float32)"
        )
    return out


def check_integers(values: np.ndarray, dtype: object, where: str) -> None:
    """Check that ``values`` can travel through float32 for an integer (or bool) tensor.

    Called on the way out with the tensor's own values (a counter beyond 2**24 would be
    rounded) and on the way in with the buffer's values (which must be whole numbers in the
    dtype's range). Floating-point dtypes pass unchecked.

    Args:
        values: the values, as a numpy array.
        dtype: the tensor's numpy dtype (or anything ``np.dtype`` accepts).
        where: the tensor's name, for the error message.

    Raises:
        AdapterError: a value is not a whole number, lies outside ``[-2**24, 2**24]`` or
            outside the dtype's range.
    """
    kind = np.dtype(dtype)  # type: ignore[call-overload]
    if kind.kind not in "biu" or values.size == 0:
        return
    wide = values.astype(np.float64)
    low, high = -MAX_EXACT_INTEGER, MAX_EXACT_INTEGER
    if kind.kind == "b":
        low, high = 0, 1
    elif kind.kind == "u":
        low = 0
    if kind.kind != "b":
        info = np.iinfo(kind)
        low, high = max(low, int(info.min)), min(high, int(info.max))
    if not (np.all(wide == np.round(wide)) and wide.min() >= low and wide.max() <= high):
        raise AdapterError(
            f"optimizer state {where!r} ({kind}) holds values float32 cannot carry exactly "
            f"(whole numbers in [{low}, {high}] only, got {wide.min():g}..{wide.max():g})"
        )


def sign_violation(received: np.ndarray, own: np.ndarray, layout: OptimizerLayout) -> str | None:
    """The first tensor of a peer's optimizer state whose sign ours rules out, or None.

    A tensor that is ``>= 0`` everywhere in our own state (second moments such as Adam's
    ``exp_avg_sq``, counters) must be ``>= 0`` in the peer's, and one that is ``> 0``
    everywhere (a step count) must be ``> 0``: a negative second moment makes Adam's
    ``sqrt`` NaN, and a step of 0 divides its bias correction by zero, so one hostile
    sponsor could otherwise make the model non-finite at the next step.

    Args:
        received: the peer's state, in ``layout``.
        own: this node's state, in the same layout.
        layout: the optimizer layout both follow.

    Returns:
        ``"<name>: ..."`` naming the tensor and the rule, or None when every tensor passes.
    """
    offset = 0
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        count = math.prod(shape)
        if count:
            mine, theirs = own[offset : offset + count], received[offset : offset + count]
            low, their_low = float(mine.min()), float(theirs.min())
            if low > 0 and their_low <= 0:
                return f"{name}: ours is > 0 everywhere, the peer's has {their_low:g}"
            if low >= 0 and their_low < 0:
                return f"{name}: ours is >= 0 everywhere, the peer's has {their_low:g}"
        offset += count
    return None
