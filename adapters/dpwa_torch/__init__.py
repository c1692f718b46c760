"""The PyTorch adapter: a ``torch.nn.Module`` to dpwa's flat float32 buffer and back.

Importing this package imports torch; ``dpwa_core`` loads it only when asked for ``"torch"``
(or its aliases ``"pytorch"``, ``"pt"``) or when torch is already imported and a module is
passed to detection.

What goes into the buffer: every floating-point parameter and persistent buffer, in
``model.state_dict()`` order, each tensor once, in dpwa's canonical layout (docs/LAYOUT.md):
``Linear`` weights as ``(in, out)`` and ``Conv2d`` weights as HWIO, like Keras and Flax, so a
PyTorch node can average with a Keras or JAX node of the same architecture (see
:mod:`dpwa_torch._plan`). Tensors of any floating dtype and on any device are converted to
float32 on the CPU on the way out and back to their own dtype and device on the way in.

Training-loop integrations: :class:`GossipOptimizer` (:mod:`dpwa_torch.optimizer`, an optimizer
whose ``step()`` also gossips; docs/OPTIMIZER.md), and, imported only when used,
``dpwa_torch.lightning.DpwaCallback`` (docs/LIGHTNING.md) and
``dpwa_torch.transformers.DpwaTrainerCallback`` (docs/TRANSFORMERS.md).

Zero-copy: :func:`flatten_` (which ``dpwa_core.connect`` applies to CPU models, through
:meth:`TorchAdapter.prepare`) makes the float32 parameters and buffers strided views into one
flat float32 tensor in the canonical layout; ``to_flat`` and ``from_flat`` are then one memcpy
and ``interpolate`` one chunked ``lerp_`` pass (see :mod:`dpwa_torch._flat` and
:mod:`dpwa_torch._blend`).

Example:
    >>> import torch
    >>> from dpwa_core.adapters import get_adapter
    >>> model = torch.nn.Linear(3, 2)
    >>> adapter = get_adapter("torch")
    >>> flat = adapter.to_flat(model)
    >>> flat.shape, adapter.layout(model).shapes
    ((8,), ((3, 2), (2,)))
    >>> adapter.from_flat(model, flat * 0) is model
    True
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack

from dpwa_core.adapters import (
    Adapter,
    FlatArray,
    StateT,
    output_flat,
    validate_factor,
    validate_flat,
    validate_span,
)
from dpwa_core.layout import Layout
from dpwa_core.optimizer_state import OptimizerLayout, OptT
from dpwa_torch import _optimizer
from dpwa_torch._blend import add_, lerp_
from dpwa_torch._flat import active, flat_buffer, flatten_, why_not
from dpwa_torch._plan import is_tensor_dict, plan_for

__all__ = ["GossipOptimizer", "TorchAdapter", "flat_buffer", "flatten_"]

_log = logging.getLogger("dpwa.torch")


def _is_keras(module: torch.nn.Module) -> bool:
    """Tell whether ``module`` is a Keras layer, without importing Keras."""
    return any(kind.__module__.partition(".")[0] == "keras" for kind in type(module).__mro__)


class TorchAdapter(Adapter):
    """Maps a ``torch.nn.Module``, or a dict of its tensors, to a flat float32 buffer and back.

    Writes go straight into the model's own tensors under ``torch.no_grad()``; the list of
    tensors is cached per module and rebuilt when the module's parameters or buffers are
    replaced. A module flattened by :func:`flatten_` (``connect()`` does it for CPU modules,
    see :meth:`prepare`) is served from its flat tensor: one copy or one ``lerp_`` pass in all.

    Example:
        >>> adapter = TorchAdapter()
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> list(adapter.layout(model).shapes)
        [(4, 4), (4,), (4,), (4,), (4,), (4,)]
        >>> adapter.layout(torch.nn.Conv2d(3, 8, 5)).shapes  # HWIO, as in Keras and Flax
        ((5, 5, 3, 8), (8,))
    """

    framework_name: ClassVar[str] = "torch"
    install_hint: ClassVar[str] = "pip install 'dpwa[torch]'"

    def handles(self, state: object) -> bool:
        """Tell whether ``state`` is a ``torch.nn.Module`` or a non-empty dict of tensors.

        Args:
            state: any object.

        Returns:
            True for modules and ``state_dict``-like mappings of names to tensors; False for
            Keras layers, which are ``torch.nn.Module`` too on Keras's torch backend but keep
            their weights in Keras variables (the ``keras`` adapter handles them).
        """
        if isinstance(state, torch.nn.Module):
            return not _is_keras(state)
        return is_tensor_dict(state)

    def prepare(self, state: StateT, *, zero_copy: bool = True) -> StateT:
        """Flatten a CPU module (:func:`flatten_`) so that gossip copies it in one pass.

        ``connect()`` calls this once. Modules on another device, modules without a float32
        tensor, plain ``state_dict`` dicts and modules whose tensors partly share memory keep
        the per-tensor copies (one INFO log line says why).

        Args:
            state: a module or a dict of tensors.
            zero_copy: False keeps the module as it is.

        Returns:
            ``state`` itself (its parameters now view one flat tensor, when flattened).
        """
        if not zero_copy or not isinstance(state, torch.nn.Module):
            return state
        reason = why_not(state)
        if reason is not None:
            _log.info("not flattened, copying tensor by tensor: %s", reason)
            return state
        flatten_(state)
        return state

    def layout(self, state: object) -> Layout:
        """Return the shapes of the floating-point tensors of ``state``, in buffer order.

        Args:
            state: a module or a dict of tensors.

        Returns:
            The layout in canonical shapes: a Linear weight is ``(in, out)``, a Conv2d
            weight ``(H, W, I, O)``; a plain dict of tensors keeps its tensors' shapes.

        Raises:
            AdapterError: ``state`` is not handled, or holds meta or sparse tensors.
        """
        return plan_for(state).layout

    def to_flat(self, state: object, out: FlatArray | None = None) -> FlatArray:
        """Copy the model's floating-point tensors into one float32 vector.

        Args:
            state: a module or a dict of tensors.
            out: optional writable, C-contiguous float32 array of ``layout(state).size``
                elements to fill instead of allocating one.

        Returns:
            ``out`` when given, else a new array.

        Raises:
            AdapterError: ``out`` does not fit, or ``state`` is not handled.
        """
        plan = plan_for(state)
        out = output_flat(out, plan.layout)
        flat = active(state, plan)
        if flat is not None:
            with torch.no_grad():
                flat.gather()
                # torch's copy uses the intra-op threads; with one thread it is a memcpy.
                torch.from_numpy(out).copy_(flat.flat)
            return out
        target = torch.from_numpy(out)
        with torch.no_grad():
            for tensor, start, stop, shape in plan.slices():
                # One copy per tensor: copy_ converts the dtype, moves it off the GPU and reads
                # a permuted (canonical) view straight into the slice.
                target[start:stop].view(shape).copy_(tensor)
        return out

    def from_flat(self, state: StateT, flat: FlatArray) -> StateT:
        """Write a flat vector into the model's tensors, in place.

        Args:
            state: a module or a dict of tensors.
            flat: 1-D float32 array of ``layout(state).size`` elements.

        Returns:
            ``state`` itself, updated.

        Raises:
            AdapterError: ``flat`` has the wrong type, dtype, shape or size; nothing is written.
        """
        plan = plan_for(state)
        validate_flat(flat, plan.layout)
        record = active(state, plan)
        if record is not None:
            with torch.no_grad():
                if flat.flags.c_contiguous:
                    record.flat.copy_(_as_tensor(flat))
                else:  # a strided vector is copied as it is, without a contiguous temporary
                    np.copyto(record.array, flat)
                record.scatter()
            return state
        source = _as_tensor(flat)
        with torch.no_grad():
            for tensor, start, stop, shape, inverse in plan.native_slices():
                tensor.copy_(_native_view(source[start:stop], shape, inverse))
        return state

    def interpolate(self, state: StateT, peer: FlatArray, factor: float) -> StateT:
        """Blend a peer's vector in place: each tensor ``t.lerp_(peer_slice, factor)``.

        A flattened module is blended as its one flat tensor; either way nothing model-sized is
        allocated (the peer is viewed, not copied, when it is C-contiguous), and finite values
        never blend into Inf or NaN, even where ``peer - local`` overflows float32
        (:func:`dpwa_torch._blend.lerp_`: the peer's values are bounded first, a chunk that
        could overflow is blended in float64). Float16 and
        bfloat16 tensors are blended in float32 and clamped into their range.

        Args:
            state: a module or a dict of tensors.
            peer: the peer's 1-D float32 vector of ``layout(state).size`` elements.
            factor: how much of the peer to take, in ``[0, 1]``.

        Returns:
            ``state`` itself, updated.

        Raises:
            AdapterError: ``peer`` or ``factor`` is invalid; nothing is written.
        """
        plan = plan_for(state)
        validate_flat(peer, plan.layout, name="peer")
        weight = validate_factor(factor)
        source = _as_tensor(peer)
        record = active(state, plan)
        if record is not None:
            with torch.no_grad():
                record.gather()
                lerp_(record.flat, source, weight, peer)
                record.scatter()
            return state
        with torch.no_grad():
            for tensor, start, stop, shape, inverse in plan.native_slices():
                end = _native_view(source[start:stop], shape, inverse)
                values = peer[start:stop]
                if tensor.dtype in (torch.float32, torch.float64):
                    if end.dtype != tensor.dtype or end.device != tensor.device:
                        end = end.to(device=tensor.device, dtype=tensor.dtype)
                    lerp_(tensor, end, weight, values)
                    continue
                # Narrower dtypes blend in float32, then are clamped into their own range: a
                # finite float32 peer value may not fit a float16 one.
                blended = tensor.to(torch.float32)
                lerp_(blended, end.to(device=tensor.device), weight, values)
                info = torch.finfo(tensor.dtype)
                tensor.copy_(blended.clamp_(info.min, info.max))
        return state

    def add_scaled(
        self, state: StateT, values: FlatArray, factor: float, *, offset: int = 0
    ) -> StateT:
        """Add ``factor * values`` to the flat elements from ``offset`` on, in place.

        Touches only the tensors the range covers: a flattened module is updated as one slice
        of its flat tensor (one ``add_``), other modules tensor by tensor (a tensor the range
        covers in part, or of a narrower dtype, through a float32 copy of it). Finite in,
        finite out (:func:`dpwa_torch._blend.add_`); float16 and bfloat16 tensors are clamped
        into their range.

        Args:
            state: a module or a dict of tensors.
            values: 1-D float32, the lead for elements ``offset`` to ``offset + len(values)``.
            factor: how much of it to add, in ``[0, 1]``.
            offset: the flat index of ``values[0]``.

        Returns:
            ``state`` itself, updated.

        Raises:
            AdapterError: ``values``, ``offset`` or ``factor`` is invalid; nothing is written.
        """
        plan = plan_for(state)
        stop = validate_span(values, offset, plan.layout)
        weight = validate_factor(factor)
        source = _as_tensor(values)
        record = active(state, plan)
        with torch.no_grad():
            if record is not None:
                record.gather()
                add_(record.flat[offset:stop], source, weight, values)
                record.scatter()
                return state
            canonical_views = plan.slices()
            for (tensor, start, end, shape, inverse), (view, *_) in zip(
                plan.native_slices(), canonical_views, strict=True
            ):
                low, high = max(start, offset), min(end, stop)
                if low >= high:
                    continue
                part, array = (
                    source[low - offset : high - offset],
                    values[low - offset : high - offset],
                )
                if (low, high) == (start, end) and tensor.dtype in (torch.float32, torch.float64):
                    lead = _native_view(part, shape, inverse)
                    lead = lead.to(device=tensor.device, dtype=tensor.dtype)
                    add_(tensor, lead, weight, array)
                    continue
                # Covered in part, or a narrower dtype: update a float32 canonical copy.
                copy = torch.empty(end - start, dtype=torch.float32)
                copy.view(shape).copy_(view)
                add_(copy[low - start : high - start], part, weight, array)
                if tensor.dtype not in (torch.float32, torch.float64):
                    info = torch.finfo(tensor.dtype)
                    copy.clamp_(info.min, info.max)
                tensor.copy_(_native_view(copy, shape, inverse))
        return state

    def read_span(self, state: object, out: FlatArray, offset: int = 0) -> FlatArray:
        """Copy the flat elements ``offset`` to ``offset + len(out)`` into ``out``.

        Reads only the tensors the range covers (a flattened module: one slice copy).

        Args:
            state: a module or a dict of tensors.
            out: writable, C-contiguous 1-D float32 array.
            offset: the flat index of the range's first element.

        Returns:
            ``out``.

        Raises:
            AdapterError: ``out`` or ``offset`` is invalid.
        """
        plan = plan_for(state)
        stop = validate_span(out, offset, plan.layout, name="out", writable=True)
        target = torch.from_numpy(out)
        record = active(state, plan)
        with torch.no_grad():
            if record is not None:
                record.gather()
                target.copy_(record.flat[offset:stop])
                return out
            for tensor, start, end, shape in plan.slices():
                low, high = max(start, offset), min(end, stop)
                if low >= high:
                    continue
                if (low, high) == (start, end):
                    target[start - offset : end - offset].view(shape).copy_(tensor)
                    continue
                copy = torch.empty(end - start, dtype=torch.float32)
                copy.view(shape).copy_(tensor)
                target[low - offset : high - offset].copy_(copy[low - start : high - start])
        return out

    def optimizer_layout(self, optimizer: object, state: object) -> OptimizerLayout:
        """Describe a ``torch.optim.Optimizer``'s state on ``state``, in buffer order.

        Per parameter in ``named_parameters()`` order, the entries of ``optimizer.state[p]``
        in sorted key order (tensors, scalar ``step`` tensors included, and plain numbers;
        None entries left out), named ``"<parameter index>.<key>"``; the kind is the
        optimizer's class, e.g. ``"torch.optim.Adam"``. ``param_groups`` (learning rates and
        other hyperparameters) are not carried.

        Args:
            optimizer: the optimizer, after its first ``step()``.
            state: the module it trains (or a dict of its parameters).

        Returns:
            The layout; size 0 for SGD without momentum.

        Raises:
            AdapterError: the optimizer has no state yet, holds state for tensors that are not
                the model's parameters, or holds values that are not real tensors or numbers.
        """
        return _optimizer.optimizer_layout(optimizer, state)

    def optimizer_to_flat(
        self, optimizer: object, state: object, out: FlatArray | None = None
    ) -> FlatArray:
        """Copy the optimizer's state into one float32 vector.

        Args:
            optimizer: the optimizer, after its first ``step()``.
            state: the module it trains.
            out: optional writable, C-contiguous float32 array of the layout's size.

        Returns:
            ``out`` when given, else a new array.

        Raises:
            AdapterError: as for :meth:`optimizer_layout`; ``out`` does not fit; an integer
                state tensor holds a value beyond 2**24.
        """
        flat: FlatArray = _optimizer.optimizer_to_flat(optimizer, state, out)
        return flat

    def optimizer_from_flat(self, optimizer: OptT, state: object, flat: FlatArray) -> OptT:
        """Write a flat vector into the optimizer's state tensors in place (``copy_``).

        Each tensor keeps its dtype and device. The whole buffer is checked first, so a bad
        one changes nothing.

        Args:
            optimizer: the optimizer, after its first ``step()``.
            state: the module it trains.
            flat: 1-D, finite float32 array of the layout's size.

        Returns:
            ``optimizer`` itself.

        Raises:
            AdapterError: ``flat`` is invalid, or as for :meth:`optimizer_layout`.
        """
        result: OptT = _optimizer.optimizer_from_flat(optimizer, state, flat)
        return result


def _native_view(
    part: torch.Tensor, shape: tuple[int, ...], inverse: tuple[int, ...] | None
) -> torch.Tensor:
    """A flat slice seen in torch's own dimension order (a view, never a copy)."""
    canonical = part.view(shape)
    return canonical if inverse is None else canonical.permute(inverse)


def _as_tensor(flat: FlatArray) -> torch.Tensor:
    """View a validated flat array as a CPU tensor, copying only when sharing is impossible."""
    if not flat.flags.c_contiguous:
        # Strided slices could not be viewed back into multi-dimensional shapes.
        flat = np.ascontiguousarray(flat)
    if flat.flags.writeable:
        return torch.from_numpy(flat)
    # Buffers received from the network are often read-only (np.frombuffer on bytes), and
    # torch.from_numpy warns about those. DLPack shares read-only memory silently; older
    # numpy/torch pairs cannot, and then a copy is the safe answer.
    try:
        return from_dlpack(flat)
    except (BufferError, TypeError, RuntimeError, AttributeError):
        return torch.from_numpy(flat.copy())


# Last: the wrapper builds on dpwa_core.connect, which reaches this adapter by name at run time.
from dpwa_torch.optimizer import GossipOptimizer  # noqa: E402
