"""Which tensors of a PyTorch model go into the flat buffer, where, and a cache of that answer.

The buffer holds every floating-point parameter and persistent buffer (BatchNorm running
statistics included), in ``state_dict`` order: module by module in registration order,
parameters before buffers. Integer buffers such as ``num_batches_tracked`` are counters, not
weights, and stay out. A tensor reachable under several names (tied weights, a module used
twice) is stored once.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeGuard

import torch
from torch import nn

from dpwa_core.errors import AdapterError
from dpwa_core.layout import Layout

__all__ = ["TensorPlan", "is_tensor_dict", "plan_for"]


@dataclass(frozen=True)
class TensorPlan:
    """The tensors of one model in buffer order, with their place in the flat buffer.

    Attributes:
        names: the ``state_dict`` key of each tensor (the first key, for tied tensors).
        tensors: the model's own tensors; writing into them updates the model.
        offsets: where each tensor starts in the buffer, plus the total size at the end.
        layout: the shapes, as the wire compares them.
        sources: every ``state_dict`` value when the plan was made, to notice replacements.
    """

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]
    layout: Layout
    sources: tuple[object, ...]

    def slices(self) -> Iterator[tuple[torch.Tensor, int, int, tuple[int, ...]]]:
        """Yield ``(tensor, start, stop, shape)`` for each tensor, in buffer order."""
        for index, tensor in enumerate(self.tensors):
            yield (
                tensor,
                self.offsets[index],
                self.offsets[index + 1],
                self.layout.shapes[index],
            )

    def still_matches(self, values: list[object]) -> bool:
        """Tell whether ``values`` (a fresh ``state_dict``'s values) still fit this plan."""
        if len(values) != len(self.sources):
            return False
        if any(value is not source for value, source in zip(values, self.sources, strict=True)):
            return False
        # `param.data = other` keeps the Parameter object but may change its shape.
        return all(
            tuple(tensor.shape) == shape
            for tensor, shape in zip(self.tensors, self.layout.shapes, strict=True)
        )


_plans: weakref.WeakKeyDictionary[nn.Module, TensorPlan] = weakref.WeakKeyDictionary()
_plans_lock = threading.Lock()


def is_tensor_dict(state: object) -> TypeGuard[Mapping[str, torch.Tensor]]:
    """Tell whether ``state`` is a non-empty mapping of names to tensors (a ``state_dict``)."""
    return (
        isinstance(state, Mapping)
        and len(state) > 0
        and all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
        )
    )


def plan_for(state: object) -> TensorPlan:
    """Return the plan of a module (cached while the module is unchanged) or a state_dict.

    Args:
        state: a ``torch.nn.Module``, or a mapping of names to tensors.

    Returns:
        The tensors to pack, in buffer order.

    Raises:
        AdapterError: ``state`` is neither, or a tensor cannot be packed (meta or sparse).
    """
    if isinstance(state, nn.Module):
        items = list(state.state_dict(keep_vars=True).items())
        values = [value for _, value in items]
        with _plans_lock:
            cached = _get_cached(state)
        if cached is not None and cached.still_matches(values):
            return cached
        plan = _build(items)
        with _plans_lock:
            _store(state, plan)
        return plan
    if is_tensor_dict(state):
        # Dicts cannot be weakly referenced, and rebuilding a plan from one is cheap.
        return _build(list(state.items()))
    raise AdapterError(
        "The torch adapter expects a torch.nn.Module or a state_dict (a dict of names to "
        f"tensors), got {type(state).__module__}.{type(state).__qualname__}"
    )


def _get_cached(module: nn.Module) -> TensorPlan | None:
    try:
        return _plans.get(module)
    except TypeError:  # a Module subclass that made itself unhashable: no caching for it
        return None


def _store(module: nn.Module, plan: TensorPlan) -> None:
    with contextlib.suppress(TypeError):
        _plans[module] = plan


def _build(items: Sequence[tuple[str, object]]) -> TensorPlan:
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    shapes: list[tuple[int, ...]] = []
    offsets = [0]
    seen_objects: set[int] = set()
    seen_memory: set[tuple[object, ...]] = set()
    for name, value in items:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if id(value) in seen_objects:
            continue
        seen_objects.add(id(value))
        _check_packable(name, value)
        # Two tensor objects viewing the same memory (weights tied through `.data`) are one
        # tensor; writing it twice would be harmless, but sending it twice would not.
        if value.numel() > 0:
            memory = (value.device, value.data_ptr(), value.dtype, value.shape, value.stride())
            if memory in seen_memory:
                continue
            seen_memory.add(memory)
        names.append(name)
        tensors.append(value)
        shapes.append(tuple(value.shape))
        offsets.append(offsets[-1] + value.numel())
    return TensorPlan(
        names=tuple(names),
        tensors=tuple(tensors),
        offsets=tuple(offsets),
        layout=Layout(shapes),
        sources=tuple(value for _, value in items),
    )


def _check_packable(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_meta:
        raise AdapterError(
            f"Tensor {name!r} is on the meta device and holds no values; materialize the "
            "model (e.g. model.to_empty(device='cpu') and load its weights) before connecting"
        )
    if tensor.layout != torch.strided:
        raise AdapterError(
            f"Tensor {name!r} has layout {tensor.layout}; only dense tensors can be averaged, "
            "convert it with .to_dense()"
        )
