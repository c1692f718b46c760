"""Keras 3 variables as numpy on every backend (TensorFlow, JAX, PyTorch), and back.

Keras 3 runs on the backend named by ``KERAS_BACKEND`` (read when keras is first imported). A
variable's ``value`` is then a ``tf.Variable``, a ``jax.Array`` or a ``torch.nn.Parameter``.
:func:`read` reads it without a copy where the backend allows it, :func:`assign` writes a
numpy array with ``variable.assign`` (which every backend implements), and
:func:`sync_jax_state` puts the JAX trainer's state back into the variables in the middle of
``fit``. Nothing here imports a backend library: a torch tensor's methods are reached through
the tensor, so importing this module on the JAX or torch backend never imports TensorFlow.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = ["assign", "backend", "read", "sync_jax_state"]


def backend() -> str:
    """The running Keras backend: ``"tensorflow"``, ``"jax"``, ``"torch"`` or ``"numpy"``."""
    return str(keras.backend.backend())


def read(variable: Any) -> np.ndarray:
    """The variable's value as a numpy array, without a copy where the backend allows it.

    The array may share the variable's memory (a CPU tf tensor, jax array or torch
    parameter) and may be read-only (jax): copy it before writing to it or to the variable.
    """
    value = variable.value
    name = backend()
    if name == "tensorflow":  # tf.Variable: a CPU read shares the tensor's memory
        return np.asarray(value.numpy())
    if name == "torch":
        # A Parameter requires grad, so .numpy() needs a detached view; bfloat16 and
        # non-CPU tensors go through keras's converter (a copy).
        tensor = value.detach()
        if tensor.device.type == "cpu" and "bfloat16" not in str(tensor.dtype):
            return np.asarray(tensor.numpy())
    elif name == "jax":  # a CPU jax array converts without a copy (read-only)
        return np.asarray(value)
    return np.asarray(keras.ops.convert_to_numpy(value))


def assign(variable: Any, values: np.ndarray, *, owned: bool = False) -> None:
    """``variable.assign(values)``, never leaving the variable sharing ``values``'s memory.

    TensorFlow and torch copy into the variable's own memory. JAX (and the numpy backend)
    may wrap a CPU numpy array without a copy, so the variable would change when the caller
    reuses ``values`` (dpwa reuses its receive buffers): they get a copy, unless ``owned``
    says the caller hands over an array that nothing else references.
    """
    if not owned and backend() not in ("tensorflow", "torch"):
        values = np.array(values, copy=True)
    variable.assign(values)


def sync_jax_state(model: Any) -> None:
    """Attach the JAX trainer's state to the model's variables, if ``fit`` is running.

    On the JAX backend, ``fit`` keeps the weights and the optimizer's variables outside the
    variables during an epoch (it empties them) and writes them back at its end. A callback
    that reads or writes the variables mid-epoch must sync first; the trainer then takes the
    variables' values, including what the callback wrote, at the next batch. A no-op on the
    other backends and outside ``fit``.
    """
    sync = getattr(model, "jax_state_sync", None)
    if backend() == "jax" and callable(sync):
        sync()
