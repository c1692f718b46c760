"""``connect()``: join a model to a dpwa cluster through its framework's adapter.

This is the integration most users need: the adapter maps the model to the flat float32 buffer
a :class:`~dpwa_core.node.Node` trades, and back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from dpwa_core._log import get_logger
from dpwa_core.adapters import Adapter, detect_adapter, get_adapter
from dpwa_core.config import Config
from dpwa_core.errors import DpwaError
from dpwa_core.node import Node, PullResult
from dpwa_core.optimizer_state import OptimizerLayout, sign_violation

__all__ = ["Gossip", "connect"]

State = TypeVar("State")

_log = get_logger("connect")
_SHARE_TRIES = 10  # steps at which to look for the optimizer's state before giving up


class Gossip(Generic[State]):
    """A model joined to a cluster: call :meth:`step` after each optimizer step.

    Made by :func:`connect`; use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        node: Node,
        adapter: Adapter,
        state: State,
        *,
        blocking: bool | None = None,
        optimizer: Any = None,
    ) -> None:
        self.node = node
        """The underlying :class:`~dpwa_core.node.Node` (stats, peers, clock)."""
        self.blocking = node.config.blocking if blocking is None else blocking
        """Whether :meth:`step` waits for each pull (the config's ``blocking`` by default)."""
        self.optimizer = optimizer
        """The optimizer whose state a catch-up copies and a checkpoint keeps, or None: a
        ``torch.optim.Optimizer``, a ``keras.optimizers.Optimizer``, or an optax state (JAX:
        pass each new one to :meth:`step` and read the current one here)."""
        self.adapter = adapter
        """The framework adapter mapping the model to the flat buffer."""
        self.state = state
        """The latest model state: the one given to connect, or returned by update_wait."""
        self.last: PullResult | None = None
        """The last successful pull (peer, factor, clocks), or None."""
        self._sharing = False  # whether the optimizer's layout was given to the node (or
        self._share_tries = 0  # ... given up on), and how many steps looked for it
        self._layout: OptimizerLayout | None = None

    def step(
        self,
        loss: float,
        state: State | None = None,
        *,
        samples: int = 1,
        optimizer: Any = None,
    ) -> State:
        """Gossip once, after the optimizer step: blend a landed pull, publish, pull on.

        Never waits for the network (unless :attr:`blocking`): a pull that landed since the
        last call is blended into the model as it is now, keeping the steps trained while it
        ran (:mod:`dpwa_core.delta`), the model is copied for peers only
        if one asked since the last copy, and the next pull starts when none is in flight. So
        the training loop runs at compute speed whatever the link; :attr:`last` tells which
        peer was blended and how many steps behind its snapshot was (``steps_behind``).
        With :attr:`blocking` it publishes, waits for the pull (at most ``timeout_ms``) and
        blends, as :meth:`update_send` then :meth:`update_wait` do.

        Args:
            loss: the training loss of this step.
            state: the model state; defaults to :attr:`state`.
            samples: training samples in this step (advances the clock).
            optimizer: the optimizer state, for frameworks where it is immutable (optax);
                defaults to :attr:`optimizer`. After a catch-up, :attr:`optimizer` holds the
                state copied from the peer.

        Returns:
            The model state: PyTorch modules and Keras models are updated in place; frameworks
            with immutable state (JAX) return a new one, so write
            ``params = gossip.step(loss, params)``.
        """
        if state is not None:
            self.state = state
        if optimizer is not None:
            self.optimizer = optimizer
        node = self.node
        if self.blocking:
            node.publish(self._fill, loss, samples=samples)
            node.start_pull(blocking=True)
        result = node.collect(loss, wait=self.blocking, lead=True)
        if result is not None:
            self.last = result
            if result.lead:  # one pass over the pulled elements: local += factor * lead
                first, stop = result.span or (0, result.params.size)
                self.state = self.adapter.add_scaled(
                    self.state, result.params[first:stop], result.factor, offset=first
                )
            else:
                self.state = self.adapter.interpolate(self.state, result.params, result.factor)
        self._optimizer_state()
        if not self.blocking:
            node.publish(self._fill, loss, samples=samples, lazy=True)
            node.start_pull(current=self._fill, current_span=self._fill_span)
        return self.state

    def update_send(self, loss: float, state: State | None = None, *, samples: int = 1) -> None:
        """Publish the model's current parameters and maybe start a pull (blocking API).

        Kept for loops written for the seed's two calls; :meth:`step` is the one call that
        never waits.

        Args:
            loss: the current training loss.
            state: the model state to publish; defaults to :attr:`state`.
            samples: training samples since the last call (advances the clock).
        """
        if state is not None:
            self.state = state
        self.node.publish(self._fill, loss, samples=samples)
        self.node.start_pull(blocking=True)

    def update_wait(self, loss: float, state: State | None = None) -> State:
        """Wait for the pull and interpolate the peer's parameters into the model.

        Waits at most ``timeout_ms`` from the pull's start.

        Args:
            loss: the training loss after the step.
            state: the model state to update; defaults to :attr:`state`.

        Returns:
            The updated state. PyTorch modules are updated in place and returned; frameworks
            with immutable state (JAX) return a new state, so write
            ``params = gossip.update_wait(loss, params)``.
        """
        if state is not None:
            self.state = state
        result = self.node.collect(loss, wait=True)
        if result is not None:
            self.last = result
            self.state = self.adapter.interpolate(self.state, result.params, result.factor)
        self._optimizer_state()
        return self.state

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint: the model, the optimizer state, the clock and the node's name.

        One safetensors file, written atomically (docs/CHECKPOINT.md); see
        :func:`dpwa_core.checkpoint.save`.

        Args:
            path: the file to write (replaced whole, never half-written).

        Returns:
            The path written.
        """
        from dpwa_core import checkpoint

        return checkpoint.save(self, path)

    def load(self, path: str | os.PathLike[str], *, name_check: bool = True) -> Any:
        """Resume from a checkpoint written by :meth:`save`; every field is checked first.

        See :func:`dpwa_core.checkpoint.load`. A node that is behind its live peers still
        catches up from them when it joins (``start: shared``).

        Args:
            path: the checkpoint file.
            name_check: refuse a checkpoint that another node saved (False allows it).

        Returns:
            A :class:`dpwa_core.checkpoint.Checkpoint` describing what was loaded.

        Raises:
            CheckpointError: the file is missing, corrupt, hostile or of another model or
                optimizer; nothing was changed.
        """
        from dpwa_core import checkpoint

        return checkpoint.load(self, path, name_check=name_check)

    def _fill(self, out: np.ndarray) -> None:
        self.adapter.to_flat(self.state, out=out)

    def _fill_span(self, out: np.ndarray, offset: int) -> None:
        self.adapter.read_span(self.state, out, offset)

    def _fill_optimizer(self, out: np.ndarray) -> None:
        self.adapter.optimizer_to_flat(self.optimizer, self.state, out=out)

    def _optimizer_state(self) -> None:
        """Register the optimizer for catch-ups once its state exists; write a pulled one."""
        if not self._sharing and self.optimizer is not None:
            self._share_optimizer()
        state = self.node.take_optimizer_state()
        if state is not None and self.optimizer is not None and self._layout is not None:
            try:
                own = self.adapter.optimizer_to_flat(self.optimizer, self.state)
                wrong = sign_violation(state, own, self._layout)
                if wrong is not None:
                    raise DpwaError(wrong)
                self.optimizer = self.adapter.optimizer_from_flat(self.optimizer, self.state, state)
            except DpwaError as exc:  # checked before anything is written: ours is intact
                _log.warning(
                    "%s: kept its own optimizer state: the peer's was refused: %s",
                    self.node.name,
                    exc,
                )

    def _share_optimizer(self) -> None:
        """Give the node the optimizer's layout, after the optimizer's first step."""
        try:
            layout = self.adapter.optimizer_layout(self.optimizer, self.state)
        except DpwaError as exc:
            self._share_tries += 1
            # A PyTorch or Keras optimizer builds its state at its first step: try again at
            # the next few; an adapter that carries no optimizer state says so at once.
            carried = type(self.adapter).optimizer_layout is not Adapter.optimizer_layout
            if self._share_tries >= _SHARE_TRIES or not carried:
                self._sharing = True
                _log.info("%s: optimizer state is not carried: %s", self.node.name, exc)
            return
        self._sharing = True
        if layout.size:
            self._layout = layout
            self.node.share_optimizer_state(layout, self._fill_optimizer)

    def callback(self, **options: Any) -> object:
        """Return the framework's training callback that gossips around every batch.

        For Keras: ``model.fit(x, y, callbacks=[gossip.callback()])`` publishes before each
        batch and interpolates after it (see ``dpwa_tensorflow.GossipCallback`` for options).

        Args:
            **options: passed to the adapter's callback.

        Returns:
            The callback object.

        Raises:
            AdapterError: the framework has no callback mechanism; write the loop with
                :meth:`update_send` and :meth:`update_wait` instead.
        """
        return self.adapter.callback(self, **options)

    def close(self) -> None:
        """Close the node: stop its threads and free its port."""
        self.node.close()

    def __enter__(self) -> Gossip[State]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    model: State,
    config: Config | str | os.PathLike[str] | Mapping[str, Any],
    name: str | None = None,
    framework: str | None = None,
    *,
    seed: int | None = None,
    zero_copy: bool = True,
    blocking: bool | None = None,
    optimizer: Any = None,
) -> Gossip[State]:
    """Start a node for ``model`` and return the handle the training loop calls.

    Args:
        model: the model or its state: a ``torch.nn.Module``, a ``keras.Model``, or a pytree
            of jax arrays (flax variables, a dict or list of arrays).
        config: a :class:`~dpwa_core.config.Config`, a YAML path, or a mapping.
        name: this node's name in the config; defaults to the ``DPWA_NODE`` environment
            variable, else the launcher's rank (``RANK``, ``SLURM_PROCID``, ...) as an index
            into the config's nodes (docs/DEPLOY.md).
        framework: adapter name (``"torch"``, ``"tensorflow"``/``"keras"``, ``"jax"``/``"flax"``,
            ...). None picks it from the model's type, trying only frameworks that are
            already imported.
        seed: seeds the node's random choices.
        zero_copy: let the adapter rearrange the model's memory so that publishing and
            interpolating move as little as possible (:meth:`Adapter.prepare`): a PyTorch
            model on the CPU gets its float32 parameters as views into one flat buffer, so
            publishing is one memcpy and interpolating one pass (docs/ADAPTERS.md). False
            leaves the model's tensors where they are.
        blocking: whether :meth:`Gossip.step` waits for each pull; None takes the config's
            ``blocking`` (false by default: it never waits).
        optimizer: the model's optimizer (a ``torch.optim.Optimizer``, a Keras optimizer, or
            an optax state): a node that catches up from a peer takes the peer's optimizer
            state too, and :meth:`Gossip.save` keeps it. Create it before calling connect.

    Returns:
        A :class:`Gossip` handle.

    Raises:
        AdapterError: no adapter fits the model, or ``framework`` is unknown.
        ConfigError: the config is invalid or does not name this node.

    Example:
        >>> gossip = dpwa_core.connect(model, "cluster.yaml", "w1")   # doctest: +SKIP
        >>> for x, y in batches:                                      # doctest: +SKIP
        ...     loss = train_step(model, x, y)   # forward, backward, optimizer step
        ...     gossip.step(loss, samples=len(x))
    """
    adapter = get_adapter(framework) if framework is not None else detect_adapter(model)
    node = Node(config, name, layout=adapter.layout(model), seed=seed)
    try:
        model = adapter.prepare(model, zero_copy=zero_copy)
    except BaseException:
        node.close()
        raise
    return Gossip(node, adapter, model, blocking=blocking, optimizer=optimizer)
