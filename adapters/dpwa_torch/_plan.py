"""Which tensors of a PyTorch model go into the flat buffer, where, and a cache of that answer.

The buffer holds every floating-point parameter and persistent buffer (BatchNorm running
statistics included), in ``state_dict`` order: module by module in registration order,
parameters before buffers. Integer buffers such as ``num_batches_tracked`` are counters, not
weights, and stay out. A tensor reachable under several names (tied weights, a module used
twice) is stored once.

Shapes follow dpwa's canonical layout (docs/LAYOUT.md), the one Keras and Flax use natively:
a ``Linear`` weight, stored ``(out, in)`` by torch, is packed as ``(in, out)``, and a
``ConvNd`` weight ``(O, I, *kernel)`` as ``(*kernel, I, O)`` (HWIO for ``Conv2d``). The plan
keeps, per tensor, the permutation from torch's dimensions to the canonical ones; copies apply
it as a strided view, so nothing model-sized is allocated on the way.
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
from torch.nn.modules.conv import _ConvNd

from dpwa_core.errors import AdapterError
from dpwa_core.layout import Layout

__all__ = ["TensorPlan", "canonical_perms", "is_tensor_dict", "plan_for"]


@dataclass(frozen=True)
class TensorPlan:
    """The tensors of one model in buffer order, with their place in the flat buffer.

    Attributes:
        names: the ``state_dict`` key of each tensor (the first key, for tied tensors).
        tensors: the model's own tensors; writing into them updates the model.
        perms: per tensor, the permutation from torch's dimensions to the canonical ones
            (``tensor.permute(perm)`` has the canonical shape), or None when they agree.
        offsets: where each tensor starts in the buffer, plus the total size at the end.
        layout: the canonical shapes, as the wire compares them.
        native_shapes: torch's shapes of the tensors, to notice in-place replacements.
        sources: every ``state_dict`` value when the plan was made, to notice replacements.
    """

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    perms: tuple[tuple[int, ...] | None, ...]
    offsets: tuple[int, ...]
    layout: Layout
    native_shapes: tuple[tuple[int, ...], ...]
    sources: tuple[object, ...]

    def slices(self) -> Iterator[tuple[torch.Tensor, int, int, tuple[int, ...]]]:
        """Yield ``(tensor, start, stop, shape)`` for each tensor, in buffer order.

        ``tensor`` is the model's tensor seen in the canonical layout: the tensor itself, or a
        permuted view of it (writing into the view writes into the model).
        """
        for index, tensor in enumerate(self.tensors):
            perm = self.perms[index]
            yield (
                tensor if perm is None else tensor.permute(perm),
                self.offsets[index],
                self.offsets[index + 1],
                self.layout.shapes[index],
            )

    def native_slices(
        self,
    ) -> Iterator[tuple[torch.Tensor, int, int, tuple[int, ...], tuple[int, ...] | None]]:
        """Yield ``(tensor, start, stop, canonical shape, inverse perm)`` in buffer order.

        For writing into the model: view the flat slice in the canonical shape, permute it by
        the inverse permutation (None: no permutation) and copy it into ``tensor``, the
        model's own tensor. Copying into a contiguous tensor from a permuted source is the
        case torch's ``copy_`` handles fastest.
        """
        for index, tensor in enumerate(self.tensors):
            perm = self.perms[index]
            yield (
                tensor,
                self.offsets[index],
                self.offsets[index + 1],
                self.layout.shapes[index],
                None if perm is None else _inverse(perm),
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
            for tensor, shape in zip(self.tensors, self.native_shapes, strict=True)
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
        plan = _build(items, canonical_perms(state))
        with _plans_lock:
            _store(state, plan)
        return plan
    if is_tensor_dict(state):
        # Dicts cannot be weakly referenced, and rebuilding a plan from one is cheap. A dict
        # says nothing about which tensor is a Linear weight: its shapes are taken as they are.
        return _build(list(state.items()), {})
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


def canonical_perms(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Map ``state_dict`` keys of weights stored in a non-canonical order to their permutation.

    ``nn.Linear`` weights ``(out, in)`` become ``(in, out)``; weights of ``nn.Conv1d/2d/3d``
    (not the transposed convolutions) ``(O, I, *kernel)`` become ``(*kernel, I, O)``.
    Everything else (embeddings, normalization vectors, biases, custom parameters) is already
    canonical.

    Args:
        module: the model.

    Returns:
        ``{state_dict key: permutation}`` for the weights to permute.
    """
    perms: dict[str, tuple[int, ...]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        weight = getattr(sub, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        key = f"{prefix}.weight" if prefix else "weight"
        if isinstance(sub, nn.Linear) and weight.dim() == 2:
            perms[key] = (1, 0)
        elif isinstance(sub, _ConvNd) and not sub.transposed and weight.dim() >= 3:
            spatial = tuple(range(2, weight.dim()))
            perms[key] = (*spatial, 1, 0)
    return perms


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return tuple(inverse)


def _build(
    items: Sequence[tuple[str, object]], perms_by_key: Mapping[str, tuple[int, ...]]
) -> TensorPlan:
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    perms: list[tuple[int, ...] | None] = []
    shapes: list[tuple[int, ...]] = []
    native: list[tuple[int, ...]] = []
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
        perm = perms_by_key.get(name)
        names.append(name)
        tensors.append(value)
        perms.append(perm)
        native.append(tuple(value.shape))
        shapes.append(tuple(value.shape) if perm is None else tuple(value.shape[d] for d in perm))
        offsets.append(offsets[-1] + value.numel())
    return TensorPlan(
        names=tuple(names),
        tensors=tuple(tensors),
        perms=tuple(perms),
        offsets=tuple(offsets),
        layout=Layout(shapes),
        native_shapes=tuple(native),
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
