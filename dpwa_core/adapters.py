"""Adapters map a framework's model to dpwa's flat float32 buffer and back.

dpwa moves parameters as ONE flat float32 vector. An :class:`Adapter` is the small piece that
knows one framework: which tensors go into that vector and in what order (its :class:`Layout`),
how to copy them out (:meth:`Adapter.to_flat`), back in (:meth:`Adapter.from_flat`) and how to
blend a peer's vector into the model (:meth:`Adapter.interpolate`).

Adapters are found through the entry-point group ``dpwa.adapters``; dpwa's own PyTorch adapter
is declared there like any third-party one. :func:`register_adapter` adds one from code.

This module never imports a framework. :func:`detect_adapter` only tries adapters whose framework
the caller has already imported, and :func:`get_adapter` loads exactly the adapter it is asked
for.
"""

from __future__ import annotations

import abc
import importlib.metadata
import math
import numbers
import re
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from dpwa_core.delta import add_scaled_inplace
from dpwa_core.errors import AdapterError
from dpwa_core.layout import Layout
from dpwa_core.optimizer_state import OptimizerLayout, OptT

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "FlatArray",
    "StateT",
    "available_adapters",
    "detect_adapter",
    "get_adapter",
    "lerp_inplace",
    "output_flat",
    "register_adapter",
    "unregister_adapter",
    "validate_factor",
    "validate_flat",
    "validate_span",
]

ENTRY_POINT_GROUP = "dpwa.adapters"

FlatArray = npt.NDArray[np.float32]
"""A 1-D, float32 numpy array: the flat parameter buffer."""

StateT = TypeVar("StateT")
"""A model's state: what :meth:`Adapter.from_flat` and :meth:`Adapter.interpolate` return has
the type they were given (the same object for PyTorch, a new one for immutable frameworks)."""

_GENERIC_HINT = "install the package that provides it"

_LERP_CHUNK = 64 * 1024
"""Elements blended at a time by :func:`lerp_inplace`: its scratch stays in the CPU's cache."""

# One lock guards the three caches below; adapters are looked up from training and gossip
# threads alike, and "one instance per adapter class" must hold across them.
_lock = threading.RLock()
_registered: dict[str, Adapter | type[Adapter]] = {}
_instances: dict[type[Adapter], Adapter] = {}
_detected: dict[type[object], Adapter] = {}


class Adapter(abc.ABC):
    """Maps one framework's models to and from dpwa's flat float32 buffer.

    A subclass sets :attr:`framework_name` to its framework's ``sys.modules`` key and
    implements :meth:`handles`, :meth:`layout`, :meth:`to_flat` and :meth:`from_flat`;
    :meth:`interpolate` has a generic default that a subclass may replace with an in-place one.
    Every method that writes into a model validates its input first, so a rejected buffer
    never leaves the model half-written.

    Example:
        >>> class ListAdapter(Adapter):
        ...     framework_name = "builtins"
        ...     def handles(self, state): return isinstance(state, list)
        ...     def layout(self, state): return Layout.flat(len(state))
        ...     def to_flat(self, state, out=None):
        ...         if out is None:
        ...             out = np.empty(len(state), dtype=np.float32)
        ...         validate_flat(out, self.layout(state), name="out", writable=True)[:] = state
        ...         return out
        ...     def from_flat(self, state, flat):
        ...         state[:] = validate_flat(flat, self.layout(state)).tolist()
        ...         return state
        >>> ListAdapter().interpolate([0.0, 4.0], np.array([2.0, 0.0], np.float32), 0.5)
        [1.0, 2.0]
    """

    framework_name: ClassVar[str]
    """The framework's ``sys.modules`` key, e.g. ``"torch"``: detection tries this adapter only
    when that module is already imported."""

    install_hint: ClassVar[str] = ""
    """What to run when the framework is missing, e.g. ``"pip install 'dpwa[torch]'"``."""

    @abc.abstractmethod
    def handles(self, state: object) -> bool:
        """Tell whether ``state`` is a model (or model state) of this adapter's framework.

        Args:
            state: any object; must not be modified.

        Returns:
            True when the other methods accept ``state``.
        """

    @abc.abstractmethod
    def layout(self, state: object) -> Layout:
        """Describe the tensors of ``state`` that go into the flat buffer, in buffer order.

        Args:
            state: a model this adapter handles.

        Returns:
            The :class:`Layout` in dpwa's canonical shapes (docs/LAYOUT.md), so that the same
            architecture has the same layout in every framework.

        Raises:
            AdapterError: ``state`` is not something this adapter handles.
        """

    @abc.abstractmethod
    def to_flat(self, state: object, out: FlatArray | None = None) -> FlatArray:
        """Copy the model's tensors into one flat float32 vector.

        Args:
            state: a model this adapter handles.
            out: optional 1-D, C-contiguous, writable float32 array of ``layout(state).size``
                elements; when given, the values are written into it without a model-sized
                temporary.

        Returns:
            ``out`` when given, else a new 1-D float32 C-contiguous array.

        Raises:
            AdapterError: ``out`` has the wrong size, dtype or shape, or ``state`` is not
                handled.
        """

    @abc.abstractmethod
    def from_flat(self, state: StateT, flat: FlatArray) -> StateT:
        """Write a flat vector into the model.

        Args:
            state: a model this adapter handles.
            flat: 1-D float32 array of ``layout(state).size`` elements.

        Returns:
            The updated state; the same object when the framework allows in-place updates.

        Raises:
            AdapterError: ``flat`` is invalid; the model is left untouched.
        """

    def prepare(self, state: StateT, *, zero_copy: bool = True) -> StateT:
        """Get a model ready for gossip; :func:`dpwa_core.connect` calls it once.

        Adapters use it to arrange the model so that :meth:`to_flat`, :meth:`from_flat` and
        :meth:`interpolate` move as little memory as possible (the PyTorch adapter makes a CPU
        model's parameters views into one flat buffer). This default changes nothing.

        Args:
            state: a model this adapter handles.
            zero_copy: False asks the adapter to leave the model's memory as it is.

        Returns:
            The state to train and gossip with (``state`` itself, for in-place frameworks).
        """
        return state

    def interpolate(self, state: StateT, peer: FlatArray, factor: float) -> StateT:
        """Blend a peer's vector into the model: ``state = (1 - factor) * state + factor * peer``.

        This default goes through :meth:`to_flat` and :meth:`from_flat`, so it holds one
        model-sized vector (the model's own values) while it blends them in place, a block at a
        time (:func:`lerp_inplace`); adapters of frameworks with mutable tensors override it to
        work tensor by tensor, in place.

        Args:
            state: a model this adapter handles.
            peer: the peer's flat vector, 1-D float32 of ``layout(state).size`` elements.
            factor: how much of the peer to take, in ``[0, 1]``.

        Returns:
            The updated state (see :meth:`from_flat`).

        Raises:
            AdapterError: ``peer`` or ``factor`` is invalid; the model is left untouched.
        """
        validate_flat(peer, self.layout(state), name="peer")
        weight = validate_factor(factor)
        blended = self.to_flat(state)
        lerp_inplace(blended, peer, weight)
        return self.from_flat(state, blended)

    def add_scaled(
        self, state: StateT, values: FlatArray, factor: float, *, offset: int = 0
    ) -> StateT:
        """Add ``factor * values`` to the model's elements ``offset`` to ``offset + len(values)``.

        How a staleness-corrected pull is blended (:mod:`dpwa_core.delta`): ``values`` is the
        peer's lead over our model at the request, for the whole model or one slice of it
        (:mod:`dpwa_core.slices`). Saturating: finite in, finite out. This default goes through
        :meth:`to_flat` and :meth:`from_flat` (one model-sized vector); adapters of frameworks
        with mutable tensors override it to touch only the tensors the range covers, in place.

        Args:
            state: a model this adapter handles.
            values: 1-D float32, at most ``layout(state).size - offset`` elements.
            factor: how much of the lead to take, in ``[0, 1]``.
            offset: the flat index of ``values[0]``.

        Returns:
            The updated state (see :meth:`from_flat`).

        Raises:
            AdapterError: ``values``, ``offset`` or ``factor`` is invalid; the model is left
                untouched.
        """
        stop = validate_span(values, offset, self.layout(state))
        weight = validate_factor(factor)
        flat = self.to_flat(state)
        add_scaled_inplace(flat[offset:stop], values, weight)
        return self.from_flat(state, flat)

    def read_span(self, state: object, out: FlatArray, offset: int = 0) -> FlatArray:
        """Copy the model's flat elements ``offset`` to ``offset + len(out)`` into ``out``.

        What a slice pull keeps of our model at its request. This default copies the whole
        model (:meth:`to_flat`) and keeps the range; adapters override it to read only the
        tensors the range covers.

        Args:
            state: a model this adapter handles.
            out: writable 1-D float32 array; its length is the range's.
            offset: the flat index of the range's first element.

        Returns:
            ``out``.

        Raises:
            AdapterError: ``out`` or ``offset`` is invalid.
        """
        layout = self.layout(state)
        stop = validate_span(out, offset, layout, name="out", writable=True)
        if offset == 0 and stop == layout.size and out.flags.c_contiguous:
            return self.to_flat(state, out)
        np.copyto(out, self.to_flat(state)[offset:stop])
        return out

    def callback(self, gossip: Any, **options: Any) -> object:
        """Return the framework's idiomatic training hook that drives ``gossip``.

        Frameworks whose training loops take callbacks (Keras's ``model.fit``) override this;
        :meth:`dpwa_core.connect.Gossip.callback` calls it.

        Args:
            gossip: the :class:`~dpwa_core.connect.Gossip` handle of the model.
            **options: framework-specific options.

        Returns:
            The callback object.

        Raises:
            AdapterError: the framework has no callback mechanism (this default).
        """
        raise AdapterError(
            f"the {type(self).__name__} ({self.framework_name}) has no training callback; call "
            "gossip.update_send(loss) before each step and gossip.update_wait(loss) after it"
        )

    def optimizer_layout(self, optimizer: object, state: object) -> OptimizerLayout:
        """Describe the optimizer's state tensors, in the order of its flat buffer.

        The layout is taken from the state as it is, so call it after the optimizer's first
        step. Entries that hold nothing (SGD without momentum) are left out: such an optimizer
        has a layout of size 0. The same optimizer type on the same architecture gives the
        same fingerprint in every process; another type, model or framework another one.

        Args:
            optimizer: the optimizer (``torch.optim.Optimizer``, a Keras optimizer) or, for
                immutable frameworks, the optimizer's state (an optax state pytree).
            state: the model the optimizer trains (the params pytree, for JAX).

        Returns:
            The :class:`~dpwa_core.optimizer_state.OptimizerLayout`.

        Raises:
            AdapterError: the optimizer's state is not built yet, holds something that cannot
                be carried as float32, or this adapter does not carry optimizer state (this
                default).
        """
        raise AdapterError(
            f"the {self.framework_name} adapter does not carry optimizer state "
            f"({type(self).__name__} does not implement the optimizer_* methods)"
        )

    def optimizer_to_flat(
        self, optimizer: object, state: object, out: FlatArray | None = None
    ) -> FlatArray:
        """Copy the optimizer's state tensors into one flat float32 vector.

        Args:
            optimizer: as for :meth:`optimizer_layout`.
            state: the model the optimizer trains.
            out: optional writable, C-contiguous float32 array of the layout's size to fill.

        Returns:
            ``out`` when given, else a new 1-D float32 array.

        Raises:
            AdapterError: as for :meth:`optimizer_layout`; ``out`` does not fit; an integer
                counter is beyond 2**24 (float32 would round it).
        """
        raise AdapterError(
            f"the {self.framework_name} adapter does not carry optimizer state "
            f"({type(self).__name__} does not implement the optimizer_* methods)"
        )

    def optimizer_from_flat(self, optimizer: OptT, state: object, flat: FlatArray) -> OptT:
        """Write a flat vector of optimizer state into the optimizer.

        The whole buffer is checked first (float32, 1-D, the layout's size, all finite, whole
        numbers for integer counters): a bad buffer raises and changes nothing.

        Args:
            optimizer: as for :meth:`optimizer_layout`.
            state: the model the optimizer trains.
            flat: 1-D float32 array of the layout's size.

        Returns:
            The optimizer with the new state: the same object where it is mutable (PyTorch,
            Keras), a new optax state for JAX; callers always keep the returned value.

        Raises:
            AdapterError: ``flat`` is invalid, or as for :meth:`optimizer_layout`; nothing was
                written.
        """
        raise AdapterError(
            f"the {self.framework_name} adapter does not carry optimizer state "
            f"({type(self).__name__} does not implement the optimizer_* methods)"
        )


def output_flat(out: object | None, layout: Layout) -> FlatArray:
    """The buffer a ``to_flat(state, out=out)`` call fills: ``out`` once checked, or a new one.

    Args:
        out: ``None``, or the caller's writable, C-contiguous float32 array.
        layout: the layout it must hold.

    Raises:
        AdapterError: ``out`` does not fit ``layout`` or cannot be written.
    """
    if out is None:
        return np.empty(layout.size, dtype=np.float32)
    return validate_flat(out, layout, name="out", writable=True)


def validate_flat(
    flat: object, layout: Layout, *, name: str = "flat", writable: bool = False
) -> FlatArray:
    """Check that ``flat`` is a 1-D float32 array that fits ``layout``.

    Adapters call this before writing anything, so a bad buffer is rejected with the model intact.

    Args:
        flat: the candidate buffer.
        layout: the layout the buffer must match.
        name: what to call the buffer in error messages (``"flat"``, ``"peer"``, ``"out"``).
        writable: also require a writable, C-contiguous array (for ``out=`` buffers).

    Returns:
        ``flat`` itself, typed as a float32 array.

    Raises:
        AdapterError: the type, dtype, number of dimensions or size is wrong, or ``writable``
            is requested and the array is read-only or not contiguous.
    """
    if not isinstance(flat, np.ndarray):
        raise AdapterError(
            f"{name} must be a numpy float32 array, got {type(flat).__name__}; "
            f"use np.asarray({name}, dtype=np.float32)"
        )
    if flat.dtype != np.float32:
        raise AdapterError(
            f"{name} must have dtype float32, got {flat.dtype}; "
            f"convert it with {name}.astype(np.float32)"
        )
    if flat.ndim != 1:
        raise AdapterError(
            f"{name} must be 1-D, got shape {flat.shape}; flatten it with {name}.ravel()"
        )
    if flat.size != layout.size:
        raise AdapterError(
            f"{name} has {flat.size} elements but the model has {layout.size} "
            f"({layout.describe()}); both sides must use the same model architecture"
        )
    if writable and not (flat.flags.writeable and flat.flags.c_contiguous):
        raise AdapterError(
            f"{name} must be a writable, C-contiguous array; "
            f"allocate it with np.empty({layout.size}, dtype=np.float32)"
        )
    return flat


def validate_span(
    values: object, offset: int, layout: Layout, *, name: str = "values", writable: bool = False
) -> int:
    """Check a 1-D float32 array meant for the flat elements from ``offset`` on; return the end.

    Args:
        values: the candidate array.
        offset: the flat index of its first element.
        layout: the model's layout.
        name: what to call the array in error messages.
        writable: also require a writable, C-contiguous array (for ``out=`` buffers).

    Raises:
        AdapterError: ``values`` is not a 1-D float32 array (or not writable and contiguous,
            when asked), or the range leaves the model.
    """
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 1:
        got = (
            f"dtype {values.dtype}, shape {values.shape}"
            if isinstance(values, np.ndarray)
            else type(values).__name__
        )
        raise AdapterError(f"{name} must be a 1-D float32 numpy array, got {got}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise AdapterError(f"offset must be an int, got {type(offset).__name__}")
    stop = int(offset) + values.size
    if offset < 0 or stop > layout.size:
        raise AdapterError(
            f"{name} covers elements {offset}:{stop}, outside the model's {layout.size}"
        )
    if writable and not (values.flags.writeable and values.flags.c_contiguous):
        raise AdapterError(f"{name} must be a writable, C-contiguous array")
    return stop


def validate_factor(factor: float) -> float:
    """Check an interpolation factor and return it as a float.

    Args:
        factor: how much of the peer to take.

    Returns:
        ``factor`` as a Python float.

    Raises:
        AdapterError: ``factor`` is not a real number, is NaN or infinite, or lies outside
            ``[0, 1]``.
    """
    # bool is an int, and a str would convert, but neither is a factor anyone meant to pass.
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise AdapterError(f"interpolation factor must be a number in [0, 1], got {factor!r}")
    weight = float(factor)
    if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
        raise AdapterError(f"interpolation factor must be a number in [0, 1], got {factor!r}")
    return weight


def lerp_inplace(local: np.ndarray, peer: np.ndarray, factor: float) -> np.ndarray:
    """Blend ``peer`` into ``local`` in place: ``local = local + factor * (peer - local)``.

    Works a block of 64 Ki elements at a time, so the only scratch is one block, whatever the
    size of the arrays. It uses ``torch.lerp``'s formula (``peer - (peer - local) * (1 -
    factor)`` from ``factor`` 0.5 on), so ``factor`` 0 keeps ``local`` and 1 gives ``peer``
    exactly.

    Finite in, finite out: a block whose difference ``peer - local`` overflows (values beyond
    half the dtype's range, e.g. a peer sending -3e38 and +3e38 in float32) is blended again in
    float64, so the result is the convex combination rounded to ``local``'s dtype, never Inf or
    NaN. Other blocks are computed exactly as before (torch.lerp's formula cannot overflow when
    the difference does not).

    Args:
        local: writable float array, blended in place (any shape).
        peer: array of ``local``'s shape.
        factor: how much of the peer to take; not validated here (see :func:`validate_factor`).

    Returns:
        ``local``.

    Raises:
        ValueError: the shapes differ or ``local`` is read-only.

    Example:
        >>> lerp_inplace(np.array([0.0, 4.0], np.float32), np.array([2.0, 0.0], np.float32), 0.5)
        array([1., 2.], dtype=float32)
    """
    if local.shape != peer.shape:
        raise ValueError(f"cannot blend arrays of shapes {local.shape} and {peer.shape}")
    if not local.flags.writeable:
        raise ValueError("the array to blend into is read-only")
    if factor == 0:
        return local  # 0 * inf would be NaN; taking nothing is exact
    if factor == 1:
        np.copyto(local, peer, casting="unsafe")
        return local
    mine = local.reshape(-1)  # a view for contiguous arrays; else blended below and copied back
    theirs = peer.reshape(-1)
    weight = local.dtype.type(factor)
    far = factor >= 0.5
    if far:
        weight = local.dtype.type(1.0 - factor)
    scratch = np.empty(min(_LERP_CHUNK, mine.size), local.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, mine.size, _LERP_CHUNK):
            stop = min(start + _LERP_CHUNK, mine.size)
            part = scratch[: stop - start]
            target = mine[start:stop]
            np.subtract(theirs[start:stop], target, out=part)  # peer - local
            # The sum is non-finite whenever a difference is (and, harmlessly, when finite
            # differences add up past the range): then this block is redone in float64.
            if not math.isfinite(float(np.add.reduce(part))):
                _lerp_wide(target, theirs[start:stop], factor)
                continue
            part *= weight
            if far:
                np.subtract(theirs[start:stop], part, out=target)
            else:
                target += part
    if not np.shares_memory(mine, local):
        local[...] = mine.reshape(local.shape)
    return local


def _lerp_wide(target: np.ndarray, peer: np.ndarray, factor: float) -> None:
    """Blend one block in a wider dtype (float64; halves for float64), then round back.

    The result lies between the two inputs, so rounded to ``target``'s dtype it stays finite.
    """
    if target.dtype.itemsize < 8:
        a = target.astype(np.float64)
        b = peer.astype(np.float64)
        scale = 1.0
    else:  # no wider dtype: work on halves, whose difference cannot overflow
        a = target * 0.5
        b = peer * 0.5
        scale = 2.0
    b -= a  # peer - local
    if factor < 0.5:
        b *= factor
        a += b
    else:
        b *= 1.0 - factor
        np.subtract(peer if scale == 1.0 else peer * 0.5, b, out=a)
    if scale != 1.0:
        a *= scale
    limit = np.finfo(target.dtype).max
    np.clip(a, -limit, limit, out=a)
    np.copyto(target, a, casting="unsafe")


def get_adapter(framework: str) -> Adapter:
    """Return the adapter registered under ``framework``, loading it if needed.

    Names are case-insensitive. Names added with :func:`register_adapter` take precedence over
    entry points of the same name. Each adapter class is instantiated once and shared.

    Args:
        framework: an adapter name, e.g. ``"torch"``, ``"pytorch"`` or ``"pt"``.

    Returns:
        The adapter instance.

    Raises:
        AdapterError: no adapter has that name, its framework is not installed (the message
            says what to install), or its entry point does not load an :class:`Adapter`.

    Example:
        >>> adapter = get_adapter("torch")            # doctest: +SKIP
        >>> flat = adapter.to_flat(model)             # doctest: +SKIP
    """
    if not isinstance(framework, str):
        raise AdapterError(f"framework must be an adapter name (str), got {framework!r}")
    key = framework.strip().lower()
    with _lock:
        registered = _registered.get(key)
    if registered is not None:
        return _instantiate(registered, source=f"adapter {key!r}")
    entry_point = _entry_points().get(key)
    if entry_point is None:
        installed = ", ".join(available_adapters()) or "none"
        raise AdapterError(
            f"Adapter {framework!r} not found. It is either misspelled or not installed. "
            f"Installed: {installed}"
        )
    return _load(entry_point)


def detect_adapter(state: object) -> Adapter:
    """Find the adapter that handles ``state`` among frameworks that are already imported.

    An adapter is tried only when one of its names (or, for registered adapters, its
    ``framework_name``) is a module in ``sys.modules``, so detection never imports a framework:
    whoever built ``state`` has imported its framework already. The answer is cached per
    ``type(state)``.

    Args:
        state: a model, e.g. a ``torch.nn.Module``.

    Returns:
        The first adapter whose :meth:`Adapter.handles` accepts ``state``.

    Raises:
        AdapterError: no imported adapter handles ``state``; the message lists what was tried
            and what was skipped, and suggests passing ``framework="..."``.

    Example:
        >>> import torch                              # doctest: +SKIP
        >>> detect_adapter(torch.nn.Linear(2, 2))     # doctest: +SKIP
        <dpwa_torch.TorchAdapter object at ...>
    """
    kind = type(state)
    with _lock:
        cached = _detected.get(kind)
    # handles() is re-asked because some adapters accept only some instances of a type
    # (a dict of tensors, but not any dict).
    if cached is not None and cached.handles(state):
        return cached

    tried: list[str] = []
    failed: list[str] = []
    skipped: list[str] = []
    seen: set[int] = set()
    for label, framework_names, load in _candidates():
        if not any(name in sys.modules for name in framework_names):
            skipped.append(label)
            continue
        try:
            adapter = load()
        except AdapterError as exc:
            failed.append(f"{label}: {exc}")
            continue
        if id(adapter) in seen:
            continue
        seen.add(id(adapter))
        tried.append(label)
        if adapter.handles(state):
            with _lock:
                _detected[kind] = adapter
            return adapter

    message = (
        f"No adapter handles an object of type '{kind.__module__}.{kind.__qualname__}'. "
        f"Tried: {', '.join(tried) or 'none'}."
    )
    if failed:
        message += f" Failed to load: {'; '.join(failed)}."
    if skipped:
        message += f" Not tried because their framework is not imported: {', '.join(skipped)}."
    installed = ", ".join(available_adapters()) or "none"
    message += (
        f' Pass framework="..." to choose an adapter explicitly (installed: {installed}), '
        "or import your framework before connecting."
    )
    raise AdapterError(message)


def register_adapter(name: str, adapter: Adapter | type[Adapter]) -> None:
    """Make an adapter available under ``name`` without an entry point.

    Replaces any adapter registered under the same name and shadows an entry point of that
    name. Detection tries registered adapters before entry points.

    Args:
        name: case-insensitive name for :func:`get_adapter`, e.g. ``"mxnet"``.
        adapter: an :class:`Adapter` subclass (instantiated once, on first use) or instance.

    Raises:
        AdapterError: ``name`` is empty, or ``adapter`` is not an Adapter subclass or
            instance, or it does not set ``framework_name``.

    Example:
        >>> register_adapter("mylist", ListAdapter)   # doctest: +SKIP
        >>> get_adapter("MyList")                     # doctest: +SKIP
    """
    key = name.strip().lower() if isinstance(name, str) else ""
    if not key:
        raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
    is_class = isinstance(adapter, type) and issubclass(adapter, Adapter)
    if not (is_class or isinstance(adapter, Adapter)):
        raise AdapterError(
            f"register_adapter({name!r}, ...) needs an Adapter subclass or instance, "
            f"got {adapter!r}"
        )
    if not isinstance(getattr(adapter, "framework_name", None), str):
        raise AdapterError(
            f"adapter {adapter!r} must set the class attribute framework_name "
            "(its framework's sys.modules key)"
        )
    with _lock:
        _registered[key] = adapter
        _detected.clear()


def unregister_adapter(name: str) -> None:
    """Remove an adapter added with :func:`register_adapter`.

    Args:
        name: the name it was registered under (case-insensitive).

    Raises:
        AdapterError: nothing is registered under ``name`` (entry points cannot be removed).
    """
    key = name.strip().lower()
    with _lock:
        if key not in _registered:
            known = ", ".join(sorted(_registered)) or "none"
            raise AdapterError(f"No adapter was registered under {name!r}. Registered: {known}")
        del _registered[key]
        _detected.clear()


def available_adapters() -> dict[str, str]:
    """List adapter names and where each comes from, without loading any of them.

    Returns:
        ``{name: source}`` sorted by name; ``source`` is the entry point value (e.g.
        ``"dpwa_torch:TorchAdapter"``) or ``"module:Class (registered)"``.
    """
    found = {name: entry_point.value for name, entry_point in _entry_points().items()}
    with _lock:
        for name, adapter in _registered.items():
            found[name] = f"{_qualified_name(adapter)} (registered)"
    return dict(sorted(found.items()))


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The adapter entry points by lower-cased name (the first one wins on a clash)."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name.lower(), entry_point)
    return dict(sorted(found.items()))


def _candidates() -> Iterator[tuple[str, tuple[str, ...], Callable[[], Adapter]]]:
    """Yield ``(label, module names that must be imported, loader)`` for detection."""
    with _lock:
        registered = dict(sorted(_registered.items()))
    for name, adapter in registered.items():
        yield (
            f"{name} (registered)",
            (name, adapter.framework_name),
            partial(_instantiate, adapter, source=f"adapter {name!r}"),
        )
    # Aliases (torch, pytorch, pt) point at one class: try it once, under all its names.
    by_value: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for name, entry_point in _entry_points().items():
        if name not in registered:
            by_value.setdefault(entry_point.value, []).append(entry_point)
    for value, entry_points in by_value.items():
        names = tuple(entry_point.name for entry_point in entry_points)
        yield (
            f"{'/'.join(names)} ({value})",
            names,
            partial(_load, entry_points[0]),
        )


def _load(entry_point: importlib.metadata.EntryPoint) -> Adapter:
    """Load an entry point and return its (shared) adapter instance."""
    source = f"entry point {entry_point.name!r} ({entry_point.value})"
    try:
        loaded = entry_point.load()
    except ImportError as exc:
        hint = _install_hint(entry_point, exc)
        raise AdapterError(
            f"Adapter {entry_point.name!r} ({entry_point.value}) cannot be loaded because "
            f"{_missing(exc)}. To use it: {hint}"
        ) from exc
    except Exception as exc:
        raise AdapterError(
            f"Adapter {entry_point.name!r} ({entry_point.value}) failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return _instantiate(loaded, source=source, entry_point=entry_point)


def _instantiate(
    loaded: object,
    *,
    source: str,
    entry_point: importlib.metadata.EntryPoint | None = None,
) -> Adapter:
    """Return ``loaded`` if it is an adapter instance, else the cached instance of its class."""
    if isinstance(loaded, Adapter):
        return loaded
    if not (isinstance(loaded, type) and issubclass(loaded, Adapter)):
        raise AdapterError(f"{source} is {loaded!r}, which is not an Adapter subclass")
    with _lock:
        instance = _instances.get(loaded)
        if instance is None:
            try:
                instance = loaded()
            except ImportError as exc:
                # Adapters that import their framework lazily fail here, not at load time.
                hint = loaded.install_hint or _install_hint(entry_point, exc)
                raise AdapterError(
                    f"{source} cannot be used because {_missing(exc)}. To use it: {hint}"
                ) from exc
            _instances[loaded] = instance
    return instance


def _missing(exc: ImportError) -> str:
    if exc.name:
        return f"the module {exc.name.partition('.')[0]!r} is not installed"
    return f"an import failed ({exc})"


def _install_hint(entry_point: importlib.metadata.EntryPoint | None, exc: ImportError) -> str:
    """Suggest a pip command: the distribution's extra named after the missing module, if any."""
    missing = (exc.name or "").partition(".")[0]
    if not missing:
        return _GENERIC_HINT
    dist = entry_point.dist if entry_point is not None else None
    if entry_point is not None and dist is not None:
        if missing == entry_point.module.partition(".")[0]:
            return f"reinstall {dist.name}, its adapter module {missing!r} is missing"
        for extra in dist.metadata.get_all("Provides-Extra") or []:
            if _normalize(extra) == _normalize(missing):
                return f"pip install '{dist.name}[{extra}]'"
    return f"pip install {missing}"


def _normalize(name: str) -> str:
    # PEP 503/685 name normalization, so the module "foo_bar" matches the extra "foo-bar".
    return re.sub(r"[-_.]+", "-", name).lower()


def _qualified_name(adapter: Adapter | type[Adapter]) -> str:
    cls = adapter if isinstance(adapter, type) else type(adapter)
    return f"{cls.__module__}:{cls.__qualname__}"
