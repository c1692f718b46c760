"""An optax state as one flat float32 buffer, and back as a new state.

What is carried: every leaf of the optax state pytree, in ``jax.tree_util`` order (Adam's
``count``, ``mu`` and ``nu``; SGD's momentum ``trace``; hyperparameters that
``optax.inject_hyperparams`` keeps in the state are leaves too, so they travel as well). Leaves
are named by their tree path (``"[0].mu['w']"``), and the kind is ``"optax "`` followed by the
state's tree structure, which names the state classes (``ScaleByAdamState``) and the params'
keys: another transformation or another model gives another fingerprint. States without
leaves (plain SGD) have size 0.

Integer leaves (``count``) are carried as float32, exact up to 2**24, and come back in their own
dtype; every leaf comes back with its shape, dtype and device (or sharding).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpwa_core.errors import AdapterError
from dpwa_core.optimizer_state import (
    OptimizerLayout,
    check_integers,
    optimizer_output_flat,
    validate_optimizer_flat,
)

__all__ = ["optimizer_from_flat", "optimizer_layout", "optimizer_to_flat"]


def optimizer_layout(opt_state: object, params: object) -> OptimizerLayout:
    """The layout of an optax state (see the module docstring); ``params`` is not needed."""
    names, leaves, treedef = _leaves(opt_state)
    return _layout(treedef, names, leaves)


def optimizer_to_flat(opt_state: object, params: object, out: np.ndarray | None = None) -> Any:
    """Copy the optax state's leaves into one float32 vector (``out`` when given)."""
    names, leaves, treedef = _leaves(opt_state)
    out = optimizer_output_flat(out, _layout(treedef, names, leaves))
    start = 0
    for name, leaf in zip(names, leaves, strict=True):
        values = np.asarray(leaf)  # fetches a device array; views a CPU one
        stop = start + values.size
        check_integers(values, values.dtype, name)
        np.copyto(out[start:stop].reshape(values.shape), values, casting="unsafe")
        start = stop
    return out


def optimizer_from_flat(opt_state: Any, params: object, flat: object) -> Any:
    """A new optax state like ``opt_state`` holding ``flat``'s values, after checking all of it."""
    names, leaves, treedef = _leaves(opt_state)
    checked = validate_optimizer_flat(flat, _layout(treedef, names, leaves))
    parts = []
    start = 0
    for name, leaf in zip(names, leaves, strict=True):
        shape, dtype = _shape(leaf), _dtype(leaf)
        stop = start + int(np.prod(shape, dtype=np.int64))
        check_integers(checked[start:stop], dtype, name)
        parts.append(checked[start:stop].reshape(shape))
        start = stop
    new = [_like(values, leaf) for values, leaf in zip(parts, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def _leaves(opt_state: object) -> tuple[list[str], list[Any], Any]:
    """``(names, leaves, treedef)`` of an optax state, refusing what float32 cannot carry."""
    if _is_transformation(opt_state):
        raise AdapterError(
            "the jax adapter carries an optax state, got the GradientTransformation itself; "
            "pass its state (opt_state = optimizer.init(params)), and keep the state the "
            "adapter returns"
        )
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    names, leaves = [], []
    for path, leaf in paths_and_leaves:
        name = jax.tree_util.keystr(path)
        if isinstance(leaf, bool | int | float):
            pass
        elif not isinstance(leaf, jax.Array | np.ndarray | np.generic):
            raise AdapterError(
                f"the optax state leaf {name!r} is a {type(leaf).__module__}."
                f"{type(leaf).__qualname__}; only arrays and numbers can be carried"
            )
        elif (
            jnp.issubdtype(leaf.dtype, jax.dtypes.extended)
            or np.dtype(leaf.dtype).kind not in "biuf"
        ):
            raise AdapterError(
                f"the optax state leaf {name!r} has dtype {leaf.dtype}; only real "
                "floating-point and integer arrays can be carried as float32 (random keys "
                "cannot)"
            )
        names.append(name)
        leaves.append(leaf)
    return names, leaves, treedef


def _is_transformation(value: object) -> bool:
    return callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))


def _layout(treedef: Any, names: list[str], leaves: list[Any]) -> OptimizerLayout:
    return OptimizerLayout(f"optax {treedef}", names, (_shape(leaf) for leaf in leaves))


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(leaf))


def _dtype(leaf: Any) -> np.dtype[Any]:
    if isinstance(leaf, bool):
        return np.dtype(np.bool_)
    if isinstance(leaf, int):
        return np.dtype(np.int64)
    if isinstance(leaf, float):
        return np.dtype(np.float64)
    found: np.dtype[Any] = np.dtype(leaf.dtype)
    return found


def _like(values: np.ndarray, leaf: Any) -> Any:
    """``values`` as a leaf like ``leaf``: its type, dtype and, for jax arrays, placement."""
    if isinstance(leaf, bool | int | float):
        return type(leaf)(values.item())
    # np.array copies: the flat buffer is often reused by the next pull, and jax on the CPU
    # may keep using a host array's memory instead of copying it.
    owned = np.array(values, dtype=_dtype(leaf))
    if isinstance(leaf, np.ndarray | np.generic):
        return owned if isinstance(leaf, np.ndarray) else owned[()]
    try:
        return jax.device_put(owned, leaf.sharding)
    except Exception as exc:  # a deleted or donated array has no usable sharding
        raise AdapterError(
            f"cannot place a {owned.shape} optax state leaf like the old one: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
