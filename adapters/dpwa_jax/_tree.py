"""Which leaves of a JAX pytree go into the flat buffer, and in which order.

Three kinds of pytree are told apart:

- a **flax.linen variables dict** (``model.init(...)``'s output): a mapping with a ``"params"``
  collection whose values are all mappings. The ``params`` and ``batch_stats`` collections are
  merged module by module, so a BatchNorm's ``scale, bias, mean, var`` sit together, as torch's
  ``weight, bias, running_mean, running_var`` and Keras's ``gamma, beta, moving_mean,
  moving_variance`` do. Other collections (``intermediates``, ``cache``, ...) stay out.
- any other **dict / list / tuple** of arrays (a flax ``params`` dict alone included): dict
  insertion order, list and tuple order, depth first.
- a single array.

Only floating-point leaves are packed; integer leaves and PRNG keys stay out, untouched.

Creation order and jax's sorted dicts: ``model.init`` returns dicts in module creation order,
but every jax tree operation (``jax.tree_util.tree_map``, ``jax.grad``, optax updates) rebuilds
dicts with *sorted* keys, which puts ``Dense_10`` before ``Dense_2`` and ``bias`` before
``kernel``. So the order of a tree is remembered, per set of leaf paths and shapes, from the
first tree of that structure the adapter sees (normally the ``init`` output handed to
``connect``), and reused for every later tree of the same structure whatever its dict order.
:func:`remember_order` sets it explicitly (``remember_order(model, rng, x)`` reads it from an
abstract ``model.init``) when the parameters come from a checkpoint. A tree seen for the first
time whose dict keys are already in sorted order gets a best guess: known leaf names first
(``kernel``/``embedding``/``scale``, then ``bias``, ``mean``, ``var``), then flax's generated
names ``Type_N`` by type and number ``N`` (right for a stack of one layer type, not for types
interleaved: use :func:`remember_order` there).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from dpwa_core.errors import AdapterError
from dpwa_core.layout import Layout

__all__ = ["LeafPlan", "is_jax_tree", "plan_for", "rebuild", "remember_order"]

Path = tuple[Any, ...]
"""Where a leaf sits: the keys and indices from the root (collection name first for flax)."""

MERGED_COLLECTIONS = ("params", "batch_stats")
"""flax collections that hold weights, merged per module in this order."""

_LEAF_RANK = {"kernel": 0, "embedding": 0, "scale": 0, "bias": 1, "mean": 2, "var": 3}
_GENERATED = re.compile(r"^(.*)_(\d+)$")
_MAX_REMEMBERED = 256  # distinct tree structures whose order is kept

_orders: OrderedDict[frozenset[tuple[Path, tuple[int, ...]]], tuple[Path, ...]] = OrderedDict()
_orders_lock = threading.Lock()


@dataclass(frozen=True)
class LeafPlan:
    """The floating-point leaves of one pytree, in buffer order.

    Attributes:
        paths: where each leaf sits in the tree.
        leaves: the leaves themselves (jax arrays).
        offsets: where each leaf starts in the buffer, plus the total size at the end.
        layout: the leaves' shapes.
    """

    paths: tuple[Path, ...]
    leaves: tuple[jax.Array, ...]
    offsets: tuple[int, ...]
    layout: Layout


def is_flax_variables(tree: object) -> bool:
    """Tell whether ``tree`` looks like ``flax.linen.Module.init``'s output."""
    return (
        isinstance(tree, Mapping)
        and "params" in tree
        and all(isinstance(key, str) and isinstance(v, Mapping) for key, v in tree.items())
    )


def is_jax_tree(tree: object) -> bool:
    """Tell whether ``tree`` is a jax array, or a dict/list/tuple tree of jax arrays holding at
    least one floating-point array."""
    try:
        entries = list(_walk(tree, (), _is_array))
    except AdapterError:
        return False
    return any(_is_float(leaf) for _, leaf in entries)


def plan_for(tree: object) -> LeafPlan:
    """Return the floating-point leaves of ``tree`` in buffer order.

    Raises:
        AdapterError: ``tree`` holds something other than jax arrays, dicts, lists and tuples.
    """
    entries = [(path, leaf) for path, leaf in _entries(tree, _is_array) if _is_float(leaf)]
    entries = _apply_memory(entries)
    offsets = [0]
    for _, leaf in entries:
        offsets.append(offsets[-1] + int(leaf.size))
    return LeafPlan(
        paths=tuple(path for path, _ in entries),
        leaves=tuple(leaf for _, leaf in entries),
        offsets=tuple(offsets),
        layout=Layout(tuple(leaf.shape) for _, leaf in entries),
    )


def remember_order(template: object, *init_args: Any, **init_kwargs: Any) -> None:
    """Fix the buffer order for every tree with the same leaves as ``template``.

    Use it when the first tree the adapter sees may already have been through a jax tree
    operation (parameters restored from a checkpoint, for instance). Either pass a tree whose
    dicts are in creation order (``model.init(...)``'s output, before any tree operation), or a
    flax module with its ``init`` arguments: ``remember_order(model, rng, x)`` runs
    ``model.init`` abstractly (``jax.eval_shape``: no computation, no memory) and reads the order
    inside the trace, before jax sorts the result.

    Args:
        template: a pytree like the one that will be averaged (leaves may be jax arrays or
            ``jax.ShapeDtypeStruct``), or a flax module.
        *init_args: with a module: the arguments of ``module.init`` (rng, sample input, ...).
        **init_kwargs: with a module: keyword arguments of ``module.init``.

    Raises:
        AdapterError: ``template`` is not a pytree of arrays (or a module with init arguments).
    """
    if init_args or init_kwargs:
        init = getattr(template, "init", None)
        if not callable(init):
            raise AdapterError(
                "remember_order(module, *args) needs a module with an init method; pass a tree "
                "alone otherwise"
            )
        captured: list[object] = []

        def traced_init(*args: Any, **kwargs: Any) -> Any:
            variables = init(*args, **kwargs)
            captured.append(variables)  # still in creation order: jax has not sorted it yet
            return variables

        jax.eval_shape(traced_init, *init_args, **init_kwargs)
        template = captured[0]

    def shaped(value: object) -> bool:
        return hasattr(value, "shape") and hasattr(value, "dtype")

    entries = [
        (path, leaf)
        for path, leaf in _entries(template, shaped, sort_guess=False)
        if _is_float(leaf)
    ]
    if not entries:
        raise AdapterError("remember_order needs a pytree with floating-point arrays")
    key = frozenset((path, tuple(leaf.shape)) for path, leaf in entries)
    with _orders_lock:
        _store(key, tuple(path for path, _ in entries))


def rebuild(tree: Any, new_leaves: Mapping[Path, Any], path: Path = ()) -> Any:
    """Return a copy of ``tree``'s containers with the leaves at ``new_leaves``' paths replaced.

    Containers keep their type and key order; leaves not named (integer counters, other flax
    collections) are kept as they are.
    """
    if isinstance(tree, Mapping):
        items = {key: rebuild(value, new_leaves, (*path, key)) for key, value in tree.items()}
        kind: Any = type(tree)
        return items if kind is dict else kind(items)
    if isinstance(tree, tuple | list):
        values = [rebuild(value, new_leaves, (*path, index)) for index, value in enumerate(tree)]
        if isinstance(tree, list):
            return values if type(tree) is list else type(tree)(values)
        if hasattr(tree, "_fields"):  # a namedtuple
            return type(tree)(*values)
        return type(tree)(values)
    return new_leaves.get(path, tree)


def _entries(
    tree: object, is_leaf: Callable[[object], bool], *, sort_guess: bool = True
) -> list[tuple[Path, Any]]:
    """All leaves of ``tree`` in walk order (flax collections merged per module)."""
    if not is_flax_variables(tree):
        return list(_walk(tree, (), is_leaf, sort_guess))
    assert isinstance(tree, Mapping)
    # Merge the collections into one nested dict keyed by module path; a module's place is
    # where it first appears (params before batch_stats), its leaves follow collection order.
    merged: dict[Any, Any] = {}
    for collection in MERGED_COLLECTIONS:
        if collection not in tree:
            continue
        for path, leaf in _walk(tree[collection], (collection,), is_leaf, sort_guess):
            node = merged
            for key in path[1:-1]:
                node = node.setdefault(("module", key), {})
            node[("leaf", path)] = leaf
    return list(_merged_leaves(merged))


def _merged_leaves(node: dict[Any, Any]) -> Iterator[tuple[Path, Any]]:
    for (kind, key), value in node.items():
        if kind == "leaf":
            yield key, value
        else:
            yield from _merged_leaves(value)


def _walk(
    tree: object, path: Path, is_leaf: Callable[[object], bool], sort_guess: bool = True
) -> Iterator[tuple[Path, Any]]:
    if isinstance(tree, Mapping):
        for key in _ordered_keys(tree) if sort_guess else list(tree):
            yield from _walk(tree[key], (*path, key), is_leaf, sort_guess)
    elif isinstance(tree, tuple | list):
        for index, value in enumerate(tree):
            yield from _walk(value, (*path, index), is_leaf, sort_guess)
    elif tree is None:
        return
    elif is_leaf(tree):
        yield path, tree
    else:
        where = "/".join(str(key) for key in path) or "the root"
        raise AdapterError(
            f"the jax adapter expects a pytree of jax arrays (dicts, lists, tuples), but "
            f"{where} holds a {type(tree).__module__}.{type(tree).__qualname__}; convert it "
            "with jnp.asarray or keep it out of the tree you pass to dpwa"
        )


def _ordered_keys(mapping: Mapping[Any, Any]) -> list[Any]:
    keys = list(mapping)
    if len(keys) < 2 or not all(isinstance(key, str) for key in keys) or keys != sorted(keys):
        return keys  # insertion order is creation order
    # Already sorted: most likely rebuilt by a jax tree operation. Best guess at creation order.
    return sorted(keys, key=_natural_key)


def _natural_key(key: str) -> tuple[int, str, int]:
    rank = _LEAF_RANK.get(key)
    if rank is not None:
        return rank, "", 0
    match = _GENERATED.match(key)
    if match:
        return len(_LEAF_RANK), match.group(1), int(match.group(2))
    return len(_LEAF_RANK), key, -1


def _apply_memory(entries: list[tuple[Path, jax.Array]]) -> list[tuple[Path, jax.Array]]:
    """Reorder ``entries`` as the first tree of the same structure was, or remember them."""
    key = frozenset((path, tuple(leaf.shape)) for path, leaf in entries)
    with _orders_lock:
        order = _orders.get(key)
        if order is None:
            _store(key, tuple(path for path, _ in entries))
            return entries
        _orders.move_to_end(key)
    by_path = dict(entries)
    return [(path, by_path[path]) for path in order]


def _store(key: frozenset[tuple[Path, tuple[int, ...]]], order: tuple[Path, ...]) -> None:
    _orders[key] = order
    _orders.move_to_end(key)
    while len(_orders) > _MAX_REMEMBERED:
        _orders.popitem(last=False)


def _is_array(value: object) -> bool:
    return isinstance(value, jax.Array)


def _is_float(leaf: Any) -> bool:
    return bool(jnp.issubdtype(leaf.dtype, jnp.floating))
