"""A Keras 3 optimizer's variables as one flat float32 buffer, and back.

What is carried: ``optimizer.variables`` in their order (the ``iteration`` counter, then the
slots the optimizer made per trained variable, e.g. Adam's ``momentum`` and ``velocity``),
each once. The learning rate variable is left out: it is a hyperparameter, and the node keeps
its own (a schedule has no variable at all, so leaving it out also keeps a constant rate and a
schedule on equal fingerprints).

Keras names a slot after its model variable's path (``sequential_1_dense_1_kernel_momentum``),
and paths carry auto-numbered layer names that differ between two copies of one architecture.
So a slot is named ``"<index in model.trainable_variables>.<slot>"`` (``"0.momentum"``), and
other variables by their own name (``"iteration"``): equal architectures, equal fingerprints.
"""

from __future__ import annotations

from typing import Any

import keras
import ml_dtypes
import numpy as np

from dpwa_core.errors import AdapterError
from dpwa_core.optimizer_state import (
    OptimizerLayout,
    check_integers,
    optimizer_output_flat,
    validate_optimizer_flat,
)
from dpwa_tensorflow._backend import assign, read, sync_jax_state

__all__ = ["optimizer_from_flat", "optimizer_layout", "optimizer_to_flat"]

_FLOATS = {"float16", "bfloat16", "float32", "float64"}
_INTEGERS = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def optimizer_layout(optimizer: object, model: object) -> OptimizerLayout:
    """The layout of the Keras optimizer's variables (see the module docstring)."""
    return _layout(optimizer, _entries(optimizer, model))


def optimizer_to_flat(optimizer: object, model: object, out: np.ndarray | None = None) -> Any:
    """Copy the optimizer's variables into one float32 vector (``out`` when given)."""
    entries = _entries(optimizer, model)
    out = optimizer_output_flat(out, _layout(optimizer, entries))
    start = 0
    for name, variable in entries:
        shape = tuple(variable.shape)
        stop = start + int(np.prod(shape, dtype=np.int64))
        values = read(variable)
        check_integers(values, values.dtype, name)
        np.copyto(out[start:stop].reshape(shape), values, casting="unsafe")
        start = stop
    return out


def optimizer_from_flat(optimizer: Any, model: object, flat: object) -> Any:
    """Assign ``flat`` to the optimizer's variables in place, after checking all of it."""
    entries = _entries(optimizer, model)
    checked = validate_optimizer_flat(flat, _layout(optimizer, entries))
    parts = []
    start = 0
    for name, variable in entries:
        shape = tuple(variable.shape)
        stop = start + int(np.prod(shape, dtype=np.int64))
        dtype = _numpy_dtype(variable)
        check_integers(checked[start:stop], dtype, name)
        parts.append(checked[start:stop].reshape(shape).astype(dtype))
        start = stop
    for (_, variable), values in zip(entries, parts, strict=True):
        assign(variable, values, owned=True)  # astype made a new array
    return optimizer


def _entries(optimizer: object, model: object) -> list[tuple[str, Any]]:
    """``(name, variable)`` for every carried variable, in ``optimizer.variables`` order."""
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise AdapterError(
            "the keras adapter carries the state of a keras.optimizers.Optimizer, got "
            f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        )
    if not isinstance(model, keras.Layer):
        raise AdapterError(
            "the keras adapter needs the model (a keras.Model or keras.Layer) to name the "
            f"optimizer's variables, got {type(model).__module__}.{type(model).__qualname__}"
        )
    sync_jax_state(model)  # JAX backend, inside fit: the optimizer's variables are detached
    if not optimizer.built:
        raise AdapterError(
            f"the {_kind(optimizer)} optimizer is not built yet; Keras builds it on its first "
            "step: call this after the first model.fit batch or optimizer.apply_gradients"
        )
    # Longest prefix first, so "dense_1_kernel_" wins over a shorter path it starts with.
    prefixes = sorted(
        ((v.path.replace("/", "_") + "_", i) for i, v in enumerate(model.trainable_variables)),
        key=lambda item: -len(item[0]),
    )
    learning_rate = getattr(optimizer, "_learning_rate", None)
    entries: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for variable in optimizer.variables:
        if id(variable) in seen or variable is learning_rate or variable.name == "learning_rate":
            continue
        seen.add(id(variable))
        dtype = str(variable.dtype)
        if dtype not in _FLOATS and dtype not in _INTEGERS:
            raise AdapterError(
                f"the {_kind(optimizer)} variable {variable.path!r} has dtype {dtype}; only "
                "real floating-point and integer variables can be carried as float32"
            )
        name = variable.name
        for prefix, index in prefixes:
            if name.startswith(prefix):
                name = f"{index}.{name[len(prefix) :]}"
                break
        entries.append((name, variable))
    return entries


def _kind(optimizer: object) -> str:
    """``keras.optimizers.Adam`` for Keras's own optimizers, ``module.Class`` for others.

    On the torch backend, ``keras.optimizers.Adam(...)`` makes a backend subclass
    (``keras.src.backend.torch.optimizers.torch_adam.Adam``) with the same variables: it is
    named after the public class it specializes, so every backend gives one kind (and one
    fingerprint) for one optimizer.
    """
    cls = type(optimizer)
    candidates = cls.__mro__ if cls.__module__.startswith("keras.src.backend.") else (cls,)
    for candidate in candidates:
        if getattr(keras.optimizers, candidate.__name__, None) is candidate:
            return f"keras.optimizers.{candidate.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _layout(optimizer: object, entries: list[tuple[str, Any]]) -> OptimizerLayout:
    return OptimizerLayout(
        _kind(optimizer), (name for name, _ in entries), (tuple(v.shape) for _, v in entries)
    )


def _numpy_dtype(variable: Any) -> np.dtype[Any]:
    dtype = keras.backend.standardize_dtype(variable.dtype)
    found: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    return found
