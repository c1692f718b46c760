"""``GossipOptimizer``: a PyTorch optimizer whose ``step()`` also gossips.

Wrap the optimizer a loop already has, and every ``opt.step()`` runs that optimizer's step and
then one non-blocking ``gossip.step(loss, samples=...)`` (:meth:`dpwa_core.connect.Gossip.step`):
a peer's model that landed since the last step is blended in, the model is copied for peers if
one asked, and the next pull starts. The loop needs no other change, in the way of hivemind's
``Optimizer`` and PyTorch's ``PostLocalSGDOptimizer``.

Where the loss comes from, first match wins:

1. ``opt.step(loss=loss)``: a float or a tensor (a tensor is read with ``.item()``, which waits
   for a GPU to finish the step; pass ``loss.item()`` you already have to avoid a second wait);
2. the closure's return value, ``opt.step(closure)``, as ``torch.optim`` optimizers return it;
3. else the last loss given, or ``initial_loss`` before any.

The loss matters only to loss-driven interpolation (``interpolation: loss``) and to
``dpwa status``; ``constant`` and ``clock`` ignore it. ``samples`` (how far the node's clock
advances) is ``opt.step(samples=n)``, else ``samples_per_step``.

The wrapped optimizer is given to :func:`dpwa_core.connect` as ``optimizer=``, so a node that
catches up from a peer takes the peer's optimizer state as well, and ``opt.gossip.save(path)``
keeps it. ``state_dict()`` and ``load_state_dict()`` are the wrapped optimizer's own, so a
checkpoint written through the wrapper loads into a plain optimizer and back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dpwa_core.config import Config
from dpwa_core.connect import Gossip, connect

__all__ = ["GossipOptimizer"]


class GossipOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that each :meth:`step` is followed by one gossip step.

    Either give ``model`` and ``config`` (the wrapper connects, and :meth:`close` closes the
    node), or ``gossip=`` an existing :class:`~dpwa_core.connect.Gossip` (its owner closes it;
    its ``optimizer`` is set to ``optimizer`` when it had none).

    Args:
        optimizer: the ``torch.optim.Optimizer`` that trains ``model``.
        model: the ``torch.nn.Module`` to gossip.
        config: the cluster: a YAML path, a mapping or a :class:`~dpwa_core.config.Config`.
        name: this node's name; defaults as in :func:`dpwa_core.connect` (``DPWA_NODE``, or the
            launcher's rank).
        gossip: an existing handle instead of ``model``/``config``.
        samples_per_step: clock advance per step when :meth:`step` gets no ``samples``; pass
            the batch size to count samples (the default 1 counts steps).
        initial_loss: the loss reported before any loss was given.
        **connect_options: passed to :func:`dpwa_core.connect` (``framework``, ``seed``,
            ``zero_copy``, ``blocking``).

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, or neither ``gossip`` nor
            ``model`` and ``config`` were given (or both were).
        ValueError: ``samples_per_step`` is not a positive int.

    Example:
        >>> model = torch.nn.Linear(4, 1)                                     # doctest: +SKIP
        >>> opt = GossipOptimizer(torch.optim.Adam(model.parameters()), model,
        ...                       "cluster.yaml", samples_per_step=32)        # doctest: +SKIP
        >>> for x, y in batches:                                              # doctest: +SKIP
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     opt.step(loss=loss.item())   # the optimizer's step, then gossip.step
        >>> opt.close()                                                       # doctest: +SKIP
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module | None = None,
        config: Config | str | os.PathLike[str] | Mapping[str, Any] | None = None,
        name: str | None = None,
        *,
        gossip: Gossip[Any] | None = None,
        samples_per_step: int = 1,
        initial_loss: float = 1.0,
        **connect_options: Any,
    ) -> None:
        # Like PostLocalSGDOptimizer, the wrapper does not call Optimizer.__init__: it owns no
        # parameters; param_groups, state and defaults are the wrapped optimizer's.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"GossipOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__module__}."
                f"{type(optimizer).__qualname__}"
            )
        if not isinstance(samples_per_step, int) or samples_per_step < 1:
            raise ValueError(f"samples_per_step must be a positive int, got {samples_per_step!r}")
        self.optimizer = optimizer
        """The wrapped optimizer."""
        self.samples_per_step = samples_per_step
        """Clock advance per step when :meth:`step` is given no ``samples``."""
        self.loss = float(initial_loss)
        """The loss reported at the last gossip step (see the module docstring)."""
        if gossip is None:
            if model is None or config is None:
                raise TypeError(
                    "GossipOptimizer needs model and config (to connect), or gossip= (a handle "
                    "from dpwa_core.connect)"
                )
            gossip = connect(model, config, name, optimizer=optimizer, **connect_options)
            self._owns = True
        else:
            if model is not None or config is not None or connect_options:
                raise TypeError(
                    "GossipOptimizer got gossip= and connect arguments; give one or the other"
                )
            if gossip.optimizer is None:
                gossip.optimizer = optimizer
            self._owns = False
        self.gossip: Gossip[Any] = gossip
        """The :class:`~dpwa_core.connect.Gossip` handle (node, stats, save/load)."""

    # The wrapped optimizer's attributes, read and written through (LR schedulers write
    # param_groups; checkpoint loaders replace state).
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss: float | torch.Tensor | None = None,
        samples: int | None = None,
    ) -> Any:
        """Run the wrapped optimizer's step, then one gossip step.

        Args:
            closure: passed to the wrapped optimizer's ``step``; its return value is the loss
                unless ``loss`` is given.
            loss: this step's training loss (a float or a one-element tensor).
            samples: training samples in this step; defaults to :attr:`samples_per_step`.

        Returns:
            What the wrapped optimizer's ``step`` returned (the closure's loss, or None).
        """
        result = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        value = loss if loss is not None else result
        if value is not None:
            self.loss = _as_loss(value)
        self.gossip.step(self.loss, samples=self.samples_per_step if samples is None else samples)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The wrapped optimizer's ``add_param_group`` (the new parameters are not gossiped
        unless they are the model's)."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict``: it loads into a plain optimizer too."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The wrapped optimizer's ``load_state_dict``."""
        self.optimizer.load_state_dict(state_dict)

    def close(self) -> None:
        """Close the node, if this wrapper connected it (a ``gossip=`` handle is left open)."""
        if self._owns:
            self.gossip.close()

    def __enter__(self) -> GossipOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a GossipOptimizer holds a live node and cannot be pickled")

    def __repr__(self) -> str:
        return f"GossipOptimizer({self.optimizer!r}, node={self.gossip.node.name!r})"


def _as_loss(value: Any) -> float:
    """A loss as a float: a tensor is read with ``.item()``, a number converted."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` under a framework's wrapper (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), so that a catch-up between a
    Trainer's node and a plain loop's node finds the same optimizer kind."""
    found, current = optimizer, optimizer
    for _ in range(4):  # a wrapper of a wrapper at most, in practice
        current = getattr(current, "optimizer", None) or getattr(current, "_optimizer", None)
        if current is None:
            break
        if isinstance(current, torch.optim.Optimizer):
            found = current
    return found


def _batch_size(batch: Any) -> int:
    """The length of the batch's first tensor; 1 when it holds none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, (torch.Tensor, Mapping, list, tuple)):
                return _batch_size(item)
    return 1
