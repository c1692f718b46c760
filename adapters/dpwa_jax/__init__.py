"""dpwa adapter for JAX pytrees, including flax.linen parameter dicts.

Importing this package imports jax; ``dpwa_core`` loads it only when asked for ``"jax"`` (or its
alias ``"flax"``) or when jax is already imported and a pytree is passed to detection.

JAX arrays are immutable, so :meth:`JaxAdapter.from_flat` and :meth:`JaxAdapter.interpolate`
return a *new* pytree (same containers, same dtypes, same devices) and the training loop keeps
the returned one: ``params = gossip.update_wait(loss, params)``.

What goes into the buffer and in which order is described in :mod:`dpwa_jax._tree` and
docs/LAYOUT.md: flax's ``params`` and ``batch_stats`` merged per module in creation order, or a
plain pytree's leaves in dict insertion / list order; floating-point leaves only, shapes as they
are (flax's Dense kernel is already ``(in, out)`` and its Conv kernel HWIO, the canonical
layout).

Example:
    >>> import jax.numpy as jnp
    >>> from dpwa_core.adapters import get_adapter
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> adapter = get_adapter("jax")
    >>> adapter.layout(params).shapes
    ((3, 2), (2,))
    >>> new = adapter.from_flat(params, adapter.to_flat(params) * 2)
    >>> float(new["w"][0, 0]), float(params["w"][0, 0])
    (2.0, 1.0)
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from dpwa_core.adapters import (
    Adapter,
    FlatArray,
    StateT,
    output_flat,
    validate_factor,
    validate_flat,
)
from dpwa_core.errors import AdapterError
from dpwa_core.layout import Layout
from dpwa_core.optimizer_state import OptimizerLayout, OptT
from dpwa_jax import _optimizer
from dpwa_jax._tree import is_jax_tree, plan_for, rebuild, remember_order

__all__ = ["JaxAdapter", "remember_order"]


class JaxAdapter(Adapter):
    """Maps a pytree of jax arrays to a flat float32 buffer and back, returning new pytrees.

    Accepted: a flax.linen variables dict (``{"params": ..., "batch_stats": ...}``), any nest
    of dicts, lists and tuples of jax arrays, or one jax array. Leaves keep their dtype
    (bf16/fp16/fp64 are converted to and from float32) and their device or sharding.

    Example:
        >>> import jax.numpy as jnp
        >>> adapter = JaxAdapter()
        >>> adapter.layout([jnp.ones((2, 3)), jnp.ones(3), jnp.arange(4)]).shapes
        ((2, 3), (3,))
    """

    framework_name: ClassVar[str] = "jax"
    install_hint: ClassVar[str] = "pip install 'dpwa[jax]'"

    def handles(self, state: object) -> bool:
        """Tell whether ``state`` is a jax array or a dict/list/tuple tree of jax arrays.

        Args:
            state: any object.

        Returns:
            True when every leaf is a jax array and at least one is floating-point.
        """
        return is_jax_tree(state)

    def layout(self, state: object) -> Layout:
        """Return the shapes of the floating-point leaves of ``state``, in buffer order.

        Args:
            state: a pytree of jax arrays.

        Returns:
            The layout; leaf shapes are taken as they are (the canonical layout for flax).

        Raises:
            AdapterError: ``state`` holds something other than jax arrays and containers.
        """
        return plan_for(state).layout

    def to_flat(self, state: object, out: FlatArray | None = None) -> FlatArray:
        """Copy the floating-point leaves into one float32 vector.

        Args:
            state: a pytree of jax arrays.
            out: optional writable, C-contiguous float32 array of ``layout(state).size``
                elements to fill instead of allocating one.

        Returns:
            ``out`` when given, else a new array.

        Raises:
            AdapterError: ``out`` does not fit, or ``state`` is not handled.
        """
        plan = plan_for(state)
        out = output_flat(out, plan.layout)
        for index, leaf in enumerate(plan.leaves):
            start, stop = plan.offsets[index], plan.offsets[index + 1]
            # np.asarray views a CPU array without copying (and fetches a device one), so each
            # leaf is copied once, straight into its slice, converting its dtype on the way.
            np.copyto(out[start:stop].reshape(leaf.shape), np.asarray(leaf), casting="unsafe")
        return out

    def from_flat(self, state: StateT, flat: FlatArray) -> StateT:
        """Return a new pytree like ``state`` holding the values of ``flat``.

        Args:
            state: a pytree of jax arrays; it is not modified.
            flat: 1-D float32 array of ``layout(state).size`` elements. It is copied: changing
                it afterwards does not change the returned arrays.

        Returns:
            A new pytree with the same containers; floating-point leaves hold ``flat``'s values
            in their own dtype and on their own device, other leaves are the same objects.

        Raises:
            AdapterError: ``flat`` has the wrong type, dtype, shape or size.
        """
        plan = plan_for(state)
        validate_flat(flat, plan.layout)
        new: dict[Any, jax.Array] = {}
        for index, leaf in enumerate(plan.leaves):
            start, stop = plan.offsets[index], plan.offsets[index + 1]
            new[plan.paths[index]] = _put(flat[start:stop].reshape(leaf.shape), leaf)
        return cast(StateT, rebuild(state, new))

    def interpolate(self, state: StateT, peer: FlatArray, factor: float) -> StateT:
        """Return ``(1 - factor) * state + factor * peer`` as a new pytree.

        The blend runs on each leaf's device, in float32 (float64 for float64 leaves), and the
        result keeps each leaf's dtype and placement. Finite in, finite out: the blend is
        clamped to the finite range (see ``_lerp``), narrower leaves to their own.

        Args:
            state: a pytree of jax arrays; it is not modified.
            peer: the peer's 1-D float32 vector of ``layout(state).size`` elements.
            factor: how much of the peer to take, in ``[0, 1]``.

        Returns:
            The blended pytree.

        Raises:
            AdapterError: ``peer`` or ``factor`` is invalid.
        """
        plan = plan_for(state)
        validate_flat(peer, plan.layout, name="peer")
        weight = validate_factor(factor)
        peers = []
        for index, leaf in enumerate(plan.leaves):
            start, stop = plan.offsets[index], plan.offsets[index + 1]
            peers.append(_put(peer[start:stop].reshape(leaf.shape), leaf, np.float32))
        leaves = list(plan.leaves)
        if len({frozenset(leaf.devices()) for leaf in leaves}) == 1:
            blended = _lerp(leaves, peers, np.float32(weight))  # one compiled call for all
        else:  # leaves on different devices cannot share one computation
            blended = [
                _lerp([leaf], [end], np.float32(weight))[0]
                for leaf, end in zip(leaves, peers, strict=True)
            ]
        return cast(StateT, rebuild(state, dict(zip(plan.paths, blended, strict=True))))

    def optimizer_layout(self, optimizer: object, state: object) -> OptimizerLayout:
        """Describe an optax state's leaves, in ``jax.tree_util`` order.

        Leaves are named by their tree path (``"[0].mu['w']"``); the kind is ``"optax "`` and
        the state's tree structure, so another transformation or another model gives another
        fingerprint. A state without leaves (plain SGD) has size 0.

        Args:
            optimizer: the optax state (``opt_state = tx.init(params)``), not the
                transformation.
            state: the params pytree (not needed: the state's structure names its params).

        Returns:
            The layout.

        Raises:
            AdapterError: ``optimizer`` is a transformation, or has leaves that are not real
                arrays or numbers (random keys).
        """
        return _optimizer.optimizer_layout(optimizer, state)

    def optimizer_to_flat(
        self, optimizer: object, state: object, out: FlatArray | None = None
    ) -> FlatArray:
        """Copy an optax state's leaves into one float32 vector.

        Args:
            optimizer: the optax state.
            state: the params pytree.
            out: optional writable, C-contiguous float32 array of the layout's size.

        Returns:
            ``out`` when given, else a new array.

        Raises:
            AdapterError: as for :meth:`optimizer_layout`; ``out`` does not fit; an integer
                leaf (``count``) is beyond 2**24.
        """
        flat: FlatArray = _optimizer.optimizer_to_flat(optimizer, state, out)
        return flat

    def optimizer_from_flat(self, optimizer: OptT, state: object, flat: FlatArray) -> OptT:
        """Return a new optax state like ``optimizer`` holding ``flat``'s values.

        Every leaf keeps its shape, dtype and device; integer leaves must come back as whole
        numbers. The whole buffer is checked first.

        Args:
            optimizer: the optax state; it is not modified.
            state: the params pytree.
            flat: 1-D, finite float32 array of the layout's size.

        Returns:
            The new optax state (keep it: ``opt_state = adapter.optimizer_from_flat(...)``).

        Raises:
            AdapterError: ``flat`` is invalid, or as for :meth:`optimizer_layout`.
        """
        result: OptT = _optimizer.optimizer_from_flat(optimizer, state, flat)
        return result


def _put(values: np.ndarray, like: jax.Array, dtype: Any = None) -> jax.Array:
    """Copy host values to where ``like`` lives (its device or sharding), in ``like``'s dtype.

    ``jax.device_put`` may keep using a numpy array's memory instead of copying it (it does on
    the CPU for 64-byte aligned arrays), and the flat vector is often a buffer dpwa reuses for
    the next pull. So the values are first copied into a 64-byte aligned array of their own
    (converting the dtype in the same pass), which jax on the CPU then adopts without a second
    copy.
    """
    owned = _aligned_empty(values.shape, like.dtype if dtype is None else dtype)
    np.copyto(owned, values, casting="unsafe")
    try:
        placed: jax.Array = jax.device_put(owned, like.sharding)
        return placed
    except Exception as exc:  # a deleted or donated array has no usable sharding
        raise AdapterError(
            f"cannot place a {values.shape} array like the model's leaf: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    aligned: np.ndarray = raw[offset : offset + nbytes].view(dtype).reshape(shape)
    return aligned


@partial(jax.jit, donate_argnums=())
def _lerp(leaves: list[jax.Array], peers: list[jax.Array], weight: jax.Array) -> list[jax.Array]:
    """``leaf * (1 - w) + peer * w`` per leaf, clamped to the finite range: never Inf or NaN.

    Each product is at most its input in magnitude, so both terms are finite and their sum can
    only overflow where both inputs lie near the same end of the range; the convex combination
    is then within rounding of that end, which the clamp returns. Narrower leaves (float16,
    bfloat16) are blended in float32 and clamped into their own range.
    """
    result = []
    for leaf, end in zip(leaves, peers, strict=True):
        compute = jnp.promote_types(leaf.dtype, jnp.float32)
        mixed = leaf.astype(compute) * (1 - weight).astype(compute) + end.astype(
            compute
        ) * weight.astype(compute)
        limit = jnp.asarray(jnp.finfo(leaf.dtype).max, compute)
        result.append(jnp.clip(mixed, -limit, limit).astype(leaf.dtype))
    return result
