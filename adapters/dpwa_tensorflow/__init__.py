"""dpwa adapter for Keras 3 models, on every Keras backend (TensorFlow, JAX, PyTorch).

Importing this package imports keras, and keras imports the backend that ``KERAS_BACKEND``
names (TensorFlow by default; ``jax`` or ``torch`` import no TensorFlow at all). ``dpwa_core``
loads it only when asked for ``"keras"`` (or its aliases ``"tensorflow"``, ``"tf"``) or when
keras is already imported and a model is passed to detection. Variables are read and written
through numpy and ``variable.assign`` on every backend (``dpwa_tensorflow._backend``), so the
buffer is the same whatever the backend: a Keras-on-JAX node averages with a flax node, a
Keras-on-torch node with a PyTorch node (docs/KERAS.md).

What goes into the buffer: every floating-point variable of ``model.weights``, in that order
(layers in creation order, each layer's variables in creation order), each variable once.
That includes BatchNormalization's moving mean and variance (non-trainable weights) and leaves
out integer variables (seed generator states, counters) and the optimizer's variables. Shapes are
Keras's own, which are dpwa's canonical layout: a Dense kernel is ``(in, out)``, a Conv2D kernel
HWIO (see docs/LAYOUT.md).

The idiomatic way to train is a callback::

    gossip = dpwa_core.connect(model, "cluster.yaml", "w1")
    model.fit(x, y, callbacks=[gossip.callback()])   # or GossipCallback(gossip)

Example:
    >>> import keras
    >>> from dpwa_core.adapters import get_adapter
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> adapter = get_adapter("keras")
    >>> adapter.layout(model).shapes
    ((3, 2), (2,))
"""

from __future__ import annotations

from typing import Any, ClassVar

import keras
import ml_dtypes
import numpy as np

from dpwa_core.adapters import (
    Adapter,
    FlatArray,
    StateT,
    lerp_inplace,
    output_flat,
    validate_factor,
    validate_flat,
)
from dpwa_core.errors import AdapterError
from dpwa_core.layout import Layout
from dpwa_core.optimizer_state import OptimizerLayout, OptT
from dpwa_tensorflow import _optimizer
from dpwa_tensorflow._backend import assign, read, sync_jax_state
from dpwa_tensorflow.callback import GossipCallback

__all__ = ["GossipCallback", "KerasAdapter"]


class KerasAdapter(Adapter):
    """Maps a Keras 3 model (any ``keras.Layer``) to a flat float32 buffer and back, in place.

    Works on the TensorFlow, JAX and torch backends alike (on torch, a Keras model is also a
    ``torch.nn.Module``; detection tries this adapter before the PyTorch one). Writes go into
    the model's own variables with ``Variable.assign``; variables of other
    floating dtypes (float16, bfloat16, float64) are converted to and from float32.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
        >>> KerasAdapter().layout(model).shapes  # gamma, beta, moving mean, moving variance
        ((4,), (4,), (4,), (4,))
    """

    framework_name: ClassVar[str] = "keras"
    install_hint: ClassVar[str] = "pip install 'dpwa[tensorflow]'"

    def handles(self, state: object) -> bool:
        """Tell whether ``state`` is a Keras model or layer.

        Args:
            state: any object.

        Returns:
            True for instances of ``keras.Layer`` (``keras.Model`` included).
        """
        return isinstance(state, keras.Layer)

    def layout(self, state: object) -> Layout:
        """Return the shapes of the model's floating-point weights, in ``model.weights`` order.

        Args:
            state: a built Keras model or layer.

        Returns:
            The layout, in Keras's shapes (which are the canonical ones).

        Raises:
            AdapterError: ``state`` is not a Keras layer, or it has no weights yet.
        """
        return Layout(tuple(v.shape) for v in _variables(state))

    def to_flat(self, state: object, out: FlatArray | None = None) -> FlatArray:
        """Copy the model's floating-point weights into one float32 vector.

        Args:
            state: a built Keras model or layer.
            out: optional writable, C-contiguous float32 array of ``layout(state).size``
                elements to fill instead of allocating one.

        Returns:
            ``out`` when given, else a new array.

        Raises:
            AdapterError: ``out`` does not fit, or ``state`` is not handled.
        """
        variables = _variables(state)
        layout = Layout(tuple(v.shape) for v in variables)
        out = output_flat(out, layout)
        start = 0
        for variable in variables:
            stop = start + int(np.prod(variable.shape, dtype=np.int64))
            np.copyto(
                out[start:stop].reshape(variable.shape),
                read(variable),
                casting="unsafe",
            )
            start = stop
        return out

    def from_flat(self, state: StateT, flat: FlatArray) -> StateT:
        """Write a flat vector into the model's variables, in place.

        Args:
            state: a built Keras model or layer.
            flat: 1-D float32 array of ``layout(state).size`` elements.

        Returns:
            ``state`` itself, updated.

        Raises:
            AdapterError: ``flat`` has the wrong type, dtype, shape or size; nothing is written.
        """
        variables = _variables(state)
        validate_flat(flat, Layout(tuple(v.shape) for v in variables))
        start = 0
        for variable in variables:
            stop = start + int(np.prod(variable.shape, dtype=np.int64))
            assign(variable, _cast(flat[start:stop].reshape(variable.shape), variable))
            start = stop
        return state

    def interpolate(self, state: StateT, peer: FlatArray, factor: float) -> StateT:
        """Blend a peer's vector in place, variable by variable: ``v = (1 - f) v + f peer``.

        Finite in, finite out (:func:`~dpwa_core.adapters.lerp_inplace`); variables of a
        narrower dtype get the blend clamped into their range.

        Args:
            state: a built Keras model or layer.
            peer: the peer's 1-D float32 vector of ``layout(state).size`` elements.
            factor: how much of the peer to take, in ``[0, 1]``.

        Returns:
            ``state`` itself, updated.

        Raises:
            AdapterError: ``peer`` or ``factor`` is invalid; nothing is written.
        """
        variables = _variables(state)
        validate_flat(peer, Layout(tuple(v.shape) for v in variables), name="peer")
        weight = validate_factor(factor)
        start = 0
        for variable in variables:
            stop = start + int(np.prod(variable.shape, dtype=np.int64))
            # One float32 copy of this variable (the read may share the variable's memory),
            # blended in place a block at a time: the scratch is one variable, not the model.
            # lerp_inplace never turns finite values into Inf or NaN; _cast clamps the result
            # into a narrower variable's range.
            blended = np.array(read(variable), dtype=np.float32)
            lerp_inplace(blended, peer[start:stop].reshape(variable.shape), weight)
            assign(variable, _cast(blended, variable, clamp=True), owned=True)
            start = stop
        return state

    def callback(self, gossip: Any, **options: Any) -> GossipCallback:
        """Return a Keras callback that gossips once per training batch.

        Args:
            gossip: the :class:`~dpwa_core.connect.Gossip` handle of this model.
            **options: passed to :class:`GossipCallback` (e.g. ``samples_per_batch``).

        Returns:
            The callback, for ``model.fit(..., callbacks=[...])``.
        """
        return GossipCallback(gossip, **options)

    def optimizer_layout(self, optimizer: object, state: object) -> OptimizerLayout:
        """Describe a Keras optimizer's variables, in ``optimizer.variables`` order.

        The ``iteration`` counter and every slot (Adam's ``momentum`` and ``velocity``, SGD's
        ``momentum``), named ``"<index in model.trainable_variables>.<slot>"`` so that two
        copies of one architecture agree; the learning rate variable is left out. The kind is
        the optimizer's class, e.g. ``"keras.optimizers.Adam"``.

        Args:
            optimizer: a built ``keras.optimizers.Optimizer`` (after the first training step).
            state: the model it trains.

        Returns:
            The layout.

        Raises:
            AdapterError: the optimizer is not built yet, or ``state`` is not a Keras model.
        """
        return _optimizer.optimizer_layout(optimizer, state)

    def optimizer_to_flat(
        self, optimizer: object, state: object, out: FlatArray | None = None
    ) -> FlatArray:
        """Copy the optimizer's variables into one float32 vector.

        Args:
            optimizer: a built Keras optimizer.
            state: the model it trains.
            out: optional writable, C-contiguous float32 array of the layout's size.

        Returns:
            ``out`` when given, else a new array.

        Raises:
            AdapterError: as for :meth:`optimizer_layout`; ``out`` does not fit; the
                ``iteration`` counter is beyond 2**24.
        """
        flat: FlatArray = _optimizer.optimizer_to_flat(optimizer, state, out)
        return flat

    def optimizer_from_flat(self, optimizer: OptT, state: object, flat: FlatArray) -> OptT:
        """Assign a flat vector to the optimizer's variables in place, in their own dtypes.

        The whole buffer is checked first, so a bad one changes nothing.

        Args:
            optimizer: a built Keras optimizer.
            state: the model it trains.
            flat: 1-D, finite float32 array of the layout's size.

        Returns:
            ``optimizer`` itself.

        Raises:
            AdapterError: ``flat`` is invalid, or as for :meth:`optimizer_layout`.
        """
        result: OptT = _optimizer.optimizer_from_flat(optimizer, state, flat)
        return result


def _variables(state: object) -> list[Any]:
    """The floating-point variables of ``state`` in buffer order, each once."""
    if not isinstance(state, keras.Layer):
        raise AdapterError(
            "The keras adapter expects a keras.Model or keras.Layer, got "
            f"{type(state).__module__}.{type(state).__qualname__}"
        )
    # JAX backend, inside fit: the trainer holds the weights outside the variables until
    # synced (a no-op elsewhere); it takes back what we write at its next batch.
    sync_jax_state(state)
    found: list[Any] = []
    seen: set[int] = set()
    for variable in state.weights:
        if id(variable) in seen or not _is_float(variable.dtype):
            continue
        seen.add(id(variable))
        found.append(variable)
    if not found:
        raise AdapterError(
            f"the Keras model {state.name!r} has no floating-point weights yet; build it first "
            "(give it a keras.Input, or call model.build(input_shape) or the model once)"
        )
    return found


def _is_float(dtype: Any) -> bool:
    return str(dtype) in {"float16", "bfloat16", "float32", "float64"}


def _cast(values: np.ndarray, variable: Any, *, clamp: bool = False) -> np.ndarray:
    """``values`` in the variable's dtype (bfloat16 through ml_dtypes, as keras does).

    With ``clamp``, values beyond a narrower dtype's finite range (float16 ends at 65504) are
    clamped to it (in place) instead of becoming Inf.
    """
    dtype = str(variable.dtype)
    if dtype in ("float32", "float64"):
        return values if dtype == "float32" else np.asarray(values).astype(np.float64)
    target = np.dtype(keras.backend.standardize_dtype(dtype))
    if clamp:
        limit = float(ml_dtypes.finfo(target).max)  # type: ignore[no-untyped-call]
        np.clip(values, -limit, limit, out=values)
    return np.asarray(values).astype(target)
