"""Zero-copy models: the parameters of a CPU module as views into one flat float32 tensor.

:func:`flatten_` allocates one 1-D float32 tensor in the canonical layout (docs/LAYOUT.md) and
re-points every float32 parameter and buffer of the module to a view of its slice
(``param.data = view``): the Parameter objects stay the same, so optimizers made before or after
keep working, and each view has torch's native shape, reading the canonical slice through
strides (a ``Linear`` weight is ``flat[a:b].view(in, out).t()``, a ``Conv2d`` weight a permuted
view of its HWIO slice). The flat tensor then *is* the model's float32 state, in the order and
shapes dpwa trades, so ``to_flat`` is one memcpy, ``from_flat`` one memcpy back and
``interpolate`` one ``lerp_``.

Floating tensors of another dtype (a float64 buffer in a float32 model) cannot be views of a
float32 buffer; they are *mirrored*: copied into their slice before the flat tensor is read and
back after it is written.

The views break when the module is moved or converted (``.to(device)``, ``.half()``,
``load_state_dict(..., assign=True)``, ``param.data = other``). Every use checks each viewed
tensor's address and strides against the recorded ones (a few attribute reads per tensor); on a
mismatch the module drops back to the adapter's per-tensor copies, with one log line, and the
numbers stay right.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dpwa_core.errors import AdapterError
from dpwa_torch._plan import TensorPlan, _inverse, plan_for

__all__ = ["FlatModel", "active", "flat_buffer", "flatten_", "why_not"]

_log = logging.getLogger("dpwa.torch")


@dataclass(frozen=True)
class _Binding:
    """A tensor of the module re-pointed into the flat tensor, and where it must stay."""

    tensor: torch.Tensor
    data_ptr: int
    stride: tuple[int, ...]
    shape: tuple[int, ...]

    def intact(self) -> bool:
        tensor = self.tensor
        return (
            tensor.data_ptr() == self.data_ptr
            and tensor.dtype == torch.float32
            and tensor.stride() == self.stride
            and tuple(tensor.shape) == self.shape
        )


@dataclass(frozen=True)
class FlatModel:
    """A flattened module: its flat tensor, and what keeps it honest.

    Attributes:
        plan: the module's tensor plan when it was flattened; another plan means that the
            module's tensors were replaced.
        flat: the 1-D float32 CPU tensor in canonical layout that the views share.
        array: ``flat`` as a numpy array (same memory).
        bindings: every module tensor that views ``flat`` (tied tensors included).
        mirrored: plan indices of the tensors copied in and out instead (other dtypes).
    """

    plan: TensorPlan
    flat: torch.Tensor
    array: np.ndarray
    bindings: tuple[_Binding, ...]
    mirrored: tuple[int, ...]

    def intact(self) -> bool:
        """Tell whether every viewed tensor still views its slice of ``flat``."""
        return all(binding.intact() for binding in self.bindings)

    def gather(self) -> None:
        """Copy the mirrored tensors into their slices (before ``flat`` is read)."""
        plan = self.plan
        for index in self.mirrored:
            start, stop = plan.offsets[index], plan.offsets[index + 1]
            canonical = self.flat[start:stop].view(plan.layout.shapes[index])
            perm = plan.perms[index]
            tensor = plan.tensors[index]
            canonical.copy_(tensor if perm is None else tensor.permute(perm))

    def scatter(self) -> None:
        """Copy the mirrored slices back into their tensors (after ``flat`` was written)."""
        plan = self.plan
        for index in self.mirrored:
            start, stop = plan.offsets[index], plan.offsets[index + 1]
            canonical = self.flat[start:stop].view(plan.layout.shapes[index])
            perm = plan.perms[index]
            plan.tensors[index].copy_(
                canonical if perm is None else canonical.permute(_inverse(perm))
            )


_flat_models: weakref.WeakKeyDictionary[nn.Module, FlatModel] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def why_not(module: nn.Module) -> str | None:
    """Say why :func:`flatten_` would refuse ``module``, or None when it can flatten it.

    Args:
        module: the model.

    Returns:
        A short reason (not on the CPU, no float32 tensor, tensors sharing memory, ...), or
        None.
    """
    try:
        _bindings_for(module, plan_for(module))
    except AdapterError as exc:
        return str(exc)
    return None


def flatten_(module: nn.Module) -> torch.Tensor:
    """Make the float32 tensors of a CPU module views into one flat float32 tensor.

    The flat tensor holds the module's floating-point parameters and persistent buffers in
    dpwa's canonical layout, exactly what ``TorchAdapter.to_flat(module)`` returns, and every
    float32 parameter and buffer is re-pointed to a view of its slice (``param.data = view``),
    in torch's own shape. The Parameter and buffer objects stay the same, so an optimizer
    created before keeps working, and the values are unchanged. Tensors tied to each other stay
    tied. After this, the adapter's ``to_flat``, ``from_flat`` and ``interpolate`` are each one
    pass over the flat tensor. Calling it again on a module whose views are intact returns the
    same tensor.

    Args:
        module: a ``torch.nn.Module`` whose tensors are all on the CPU.

    Returns:
        The flat tensor (1-D, float32, CPU). Writing into it writes into the model.

    Raises:
        AdapterError: the module is not on the CPU, holds no float32 tensor, or has tensors
            that partly overlap in memory; the module is left untouched.

    Example:
        >>> import dpwa_torch
        >>> model = torch.nn.Linear(3, 2)
        >>> flat = dpwa_torch.flatten_(model)
        >>> flat.shape, model.weight.shape
        (torch.Size([8]), torch.Size([2, 3]))
        >>> model.weight.data_ptr() == flat.data_ptr()
        True
    """
    if not isinstance(module, nn.Module):
        raise AdapterError(
            f"flatten_ expects a torch.nn.Module, got {type(module).__module__}."
            f"{type(module).__qualname__}"
        )
    plan = plan_for(module)
    current = active(module, plan, warn=False)
    if current is not None:
        return current.flat
    groups, mirrored = _bindings_for(module, plan)
    flat = torch.empty(plan.layout.size, dtype=torch.float32)
    bindings: list[_Binding] = []
    with torch.no_grad():
        views: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        for index, tensors in groups:
            start, stop = plan.offsets[index], plan.offsets[index + 1]
            canonical = flat[start:stop].view(plan.layout.shapes[index])
            perm = plan.perms[index]
            native = canonical if perm is None else canonical.permute(_inverse(perm))
            native.copy_(tensors[0])
            views.append((tensors, native))
        # Nothing of the module changed until here: a failure above leaves it untouched.
        for tensors, native in views:
            for tensor in tensors:
                tensor.data = native
                bindings.append(
                    _Binding(tensor, tensor.data_ptr(), tensor.stride(), tuple(tensor.shape))
                )
    record = FlatModel(plan, flat, flat.numpy(), tuple(bindings), tuple(mirrored))
    record.gather()
    with _lock, contextlib.suppress(TypeError):  # unhashable module subclasses: not recorded
        _flat_models[module] = record
    return flat


def flat_buffer(module: nn.Module) -> torch.Tensor | None:
    """Return the flat tensor of a module flattened by :func:`flatten_`, while its views hold.

    Args:
        module: the model.

    Returns:
        The flat tensor, or None when the module was never flattened or its tensors were
        moved or replaced since.
    """
    record = active(module, plan_for(module), warn=False)
    return None if record is None else record.flat


def active(module: object, plan: TensorPlan, *, warn: bool = True) -> FlatModel | None:
    """The module's :class:`FlatModel` when its views are intact, else None.

    A flattened module whose tensors were moved, converted or replaced is forgotten, with one
    warning (unless ``warn`` is False): from then on the adapter copies tensor by tensor.

    Args:
        module: the model (anything; only flattened modules have a record).
        plan: the module's current plan, from :func:`~dpwa_torch._plan.plan_for`.
        warn: log the fall-back.

    Returns:
        The record, or None.
    """
    if not isinstance(module, nn.Module):
        return None
    with _lock:
        try:
            record = _flat_models.get(module)
        except TypeError:
            return None
    if record is None:
        return None
    if record.plan is plan and record.intact():
        return record
    with _lock, contextlib.suppress(KeyError, TypeError):
        del _flat_models[module]
    if warn:
        _log.warning(
            "%s: its parameters were moved, converted or replaced since dpwa_torch.flatten_; "
            "copying tensor by tensor from now on (call dpwa_torch.flatten_(model) again to "
            "make to_flat and from_flat free again)",
            type(module).__name__,
        )
    return None


def _bindings_for(
    module: nn.Module, plan: TensorPlan
) -> tuple[list[tuple[int, list[torch.Tensor]]], list[int]]:
    """Per plan index to view: the module tensors to re-point; plus the indices to mirror.

    Raises:
        AdapterError: the module cannot be flattened (the message says why).
    """
    name = type(module).__name__
    if not plan.tensors:
        raise AdapterError(f"{name} has no floating-point tensor to flatten")
    everything: dict[int, tuple[str, torch.Tensor]] = {}
    sources = (
        list(module.named_parameters(remove_duplicate=False))
        + list(module.named_buffers(remove_duplicate=False))
        + list(zip(plan.names, plan.tensors, strict=True))
    )
    for key, tensor in sources:
        if isinstance(tensor, torch.Tensor):
            everything.setdefault(id(tensor), (key, tensor))
    for key, tensor in everything.values():
        if tensor.device.type != "cpu":
            raise AdapterError(
                f"{name}: tensor {key!r} is on {tensor.device}; only modules entirely on the "
                "CPU are flattened (others are copied tensor by tensor)"
            )
        if tensor.layout != torch.strided:
            raise AdapterError(f"{name}: tensor {key!r} has layout {tensor.layout}")
    index_of = {id(tensor): index for index, tensor in enumerate(plan.tensors)}
    memory_of = {_memory(tensor): index for index, tensor in enumerate(plan.tensors)}
    viewed: dict[int, list[torch.Tensor]] = {}
    mirrored: list[int] = []
    for index, tensor in enumerate(plan.tensors):
        if tensor.dtype == torch.float32 and tensor.numel() > 0:
            viewed[index] = [tensor]
        elif tensor.dtype != torch.float32:
            mirrored.append(index)
    if not viewed:
        raise AdapterError(f"{name} has no float32 tensor to flatten")
    # Tensors that alias a packed float32 tensor exactly (tied through `.data`) follow it.
    for _key, tensor in everything.values():
        if id(tensor) in index_of or tensor.numel() == 0:
            continue
        alias_of = memory_of.get(_memory(tensor))
        if alias_of is not None and alias_of in viewed:
            viewed[alias_of].append(tensor)
    _refuse_partial_overlaps(name, everything.values())
    return sorted(viewed.items()), mirrored


def _memory(tensor: torch.Tensor) -> tuple[object, ...]:
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())


def _refuse_partial_overlaps(name: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse tensors whose memory overlaps without being the same view.

    Re-pointing one of them would silently untie it from the other.
    """
    spans: list[tuple[int, int, int, tuple[object, ...], str]] = []
    for key, tensor in tensors:
        if tensor.numel() == 0:
            continue
        steps = zip(tensor.shape, tensor.stride(), strict=True)
        extent = 1 + sum((size - 1) * step for size, step in steps)
        start = tensor.data_ptr()
        spans.append(
            (
                tensor.untyped_storage().data_ptr(),
                start,
                start + extent * tensor.element_size(),
                _memory(tensor),
                key,
            )
        )
    spans.sort(key=lambda span: span[:3])
    reach: tuple[int, int, int, tuple[object, ...], str] | None = None  # furthest-ending span
    for span in spans:
        overlaps = reach is not None and span[0] == reach[0] and span[1] < reach[2]
        if overlaps and reach is not None and span[3] != reach[3]:
            raise AdapterError(
                f"{name}: tensors {reach[4]!r} and {span[4]!r} share memory without "
                "being the same tensor; they are copied tensor by tensor instead of "
                "flattened"
            )
        if reach is None or span[0] != reach[0] or span[2] > reach[2]:
            reach = span
