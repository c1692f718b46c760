"""A ``torch.optim.Optimizer``'s state as one flat float32 buffer, and back.

What is carried: for each parameter of the model, in ``model.named_parameters()`` order (the
order of ``state_dict``), the entries of ``optimizer.state[param]`` in sorted key order: every
tensor (Adam's ``exp_avg``, ``exp_avg_sq`` and its scalar ``step``; SGD's ``momentum_buffer``)
and plain Python numbers. Entries that are None are left out, and so is every parameter without
state. Names are ``"<parameter index>.<key>"``, so the fingerprint changes with the model, the
optimizer's class and what its state holds (``amsgrad`` adds ``max_exp_avg_sq``), not with its
hyperparameters (``param_groups`` are not carried: learning rates stay the node's own).

A flattened module (:func:`dpwa_torch.flatten_`) keeps its Parameter objects, so an optimizer
made before or after flattening is found the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpwa_core.errors import AdapterError
from dpwa_core.optimizer_state import (
    OptimizerLayout,
    check_integers,
    optimizer_output_flat,
    validate_optimizer_flat,
)

__all__ = ["optimizer_from_flat", "optimizer_layout", "optimizer_to_flat"]


@dataclass(frozen=True)
class _Entry:
    """One carried value: ``optimizer.state[param][key]``."""

    name: str
    param: torch.Tensor
    key: Any
    value: torch.Tensor | int | float
    shape: tuple[int, ...]


def optimizer_layout(optimizer: object, model: object) -> OptimizerLayout:
    """The layout of ``optimizer``'s state on ``model`` (see the module docstring)."""
    return _layout(optimizer, _entries(optimizer, model))


def optimizer_to_flat(optimizer: object, model: object, out: np.ndarray | None = None) -> Any:
    """Copy the optimizer's state into one float32 vector (``out`` when given)."""
    entries = _entries(optimizer, model)
    out = optimizer_output_flat(out, _layout(optimizer, entries))
    target = torch.from_numpy(out)
    start = 0
    with torch.no_grad():
        for entry in entries:
            stop = start + _count(entry.shape)
            value = entry.value
            if isinstance(value, torch.Tensor):
                if not value.dtype.is_floating_point:
                    check_integers(value.detach().cpu().numpy(), _numpy_dtype(value), entry.name)
                # copy_ converts the dtype and moves the tensor off its device in one pass.
                target[start:stop].view(entry.shape).copy_(value.detach())
            else:
                check_integers(np.asarray(value), _python_dtype(value), entry.name)
                out[start] = value
            start = stop
    return out


def optimizer_from_flat(optimizer: Any, model: object, flat: object) -> Any:
    """Write ``flat`` into the optimizer's state in place, after checking all of it."""
    entries = _entries(optimizer, model)
    layout = _layout(optimizer, entries)
    checked = validate_optimizer_flat(flat, layout)
    # Counters must be whole numbers in range before anything is written.
    bounds = []
    start = 0
    for entry in entries:
        stop = start + _count(entry.shape)
        value = entry.value
        if isinstance(value, torch.Tensor):
            if not value.dtype.is_floating_point:
                check_integers(checked[start:stop], _numpy_dtype(value), entry.name)
        else:
            check_integers(checked[start:stop], _python_dtype(value), entry.name)
        bounds.append((start, stop))
        start = stop
    # Buffers off the network are often read-only, and torch warns when it views those.
    owned = checked if checked.flags.writeable and checked.flags.c_contiguous else checked.copy()
    source = torch.from_numpy(owned)
    with torch.no_grad():
        for entry, (start, stop) in zip(entries, bounds, strict=True):
            value = entry.value
            if isinstance(value, torch.Tensor):
                value.copy_(source[start:stop].view(entry.shape))
            else:
                optimizer.state[entry.param][entry.key] = type(value)(owned[start].item())
    return optimizer


def _entries(optimizer: object, model: object) -> list[_Entry]:
    """The carried entries of the optimizer's state, in buffer order."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise AdapterError(
            "the torch adapter carries the state of a torch.optim.Optimizer, got "
            f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        )
    params = _model_params(model)
    index = {id(param): i for i, param in enumerate(params)}
    stateful = [param for param, state in optimizer.state.items() if state]
    strangers = [param for param in stateful if id(param) not in index]
    if strangers:
        raise AdapterError(
            f"the {_kind(optimizer)} optimizer holds state for {len(strangers)} tensors that "
            "are not parameters of this model (first shape "
            f"{tuple(strangers[0].shape)}); build the optimizer from model.parameters()"
        )
    if not stateful and not _stateless(optimizer):
        raise AdapterError(
            f"the {_kind(optimizer)} optimizer has no state yet; its state is built by its "
            "first step: call this after the first optimizer.step()"
        )
    entries: list[_Entry] = []
    for i, param in enumerate(params):
        state = optimizer.state.get(param)
        if not state:
            continue
        for key in sorted(state, key=str):
            value = state[key]
            name = f"{i}.{key}"
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                if value.is_complex() or value.layout != torch.strided or value.is_meta:
                    raise AdapterError(
                        f"the {_kind(optimizer)} state entry {name!r} is a "
                        f"{value.dtype} {value.layout} tensor{' on meta' if value.is_meta else ''}"
                        "; only dense real tensors can be carried as float32"
                    )
                entries.append(_Entry(name, param, key, value, tuple(value.shape)))
            elif isinstance(value, int | float):
                entries.append(_Entry(name, param, key, value, ()))
            else:
                raise AdapterError(
                    f"the {_kind(optimizer)} state entry {name!r} is a "
                    f"{type(value).__name__}; only tensors and numbers can be carried"
                )
    return entries


def _model_params(model: object) -> list[torch.Tensor]:
    """The model's parameters in ``named_parameters`` order, each once."""
    if isinstance(model, torch.nn.Module):
        return [param for _, param in model.named_parameters()]
    if isinstance(model, dict) and model:
        seen: set[int] = set()
        found = []
        for value in model.values():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
        return found
    raise AdapterError(
        "the torch adapter needs the model (a torch.nn.Module) to order the optimizer's state, "
        f"got {type(model).__module__}.{type(model).__qualname__}"
    )


def _stateless(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps no state at all (SGD without momentum)."""
    return type(optimizer) is torch.optim.SGD and all(
        not group.get("momentum") for group in optimizer.param_groups
    )


def _kind(optimizer: object) -> str:
    """``torch.optim.Adam`` for torch's own optimizers, ``module.Class`` for others."""
    cls = type(optimizer)
    if getattr(torch.optim, cls.__name__, None) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _layout(optimizer: object, entries: list[_Entry]) -> OptimizerLayout:
    return OptimizerLayout(
        _kind(optimizer), (entry.name for entry in entries), (entry.shape for entry in entries)
    )


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype[Any]:
    return torch.empty(0, dtype=tensor.dtype).numpy().dtype


def _python_dtype(value: int | float) -> np.dtype[Any]:
    if isinstance(value, bool):
        return np.dtype(np.bool_)
    return np.dtype(np.int64 if isinstance(value, int) else np.float64)
