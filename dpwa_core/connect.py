"""``connect()``: join a model to a dpwa cluster through its framework's adapter.

This is the integration most users need: the adapter maps the model to the flat float32 buffer
a :class:`~dpwa_core.node.Node` trades, and back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from dpwa_core.adapters import Adapter, detect_adapter, get_adapter
from dpwa_core.config import Config
from dpwa_core.node import Node, PullResult

__all__ = ["Gossip", "connect"]

State = TypeVar("State")


class Gossip(Generic[State]):
    """A model joined to a cluster: publish before a step, interpolate after it.

    Made by :func:`connect`; use it as a context manager or call :meth:`close`.
    """

    def __init__(self, node: Node, adapter: Adapter, state: State) -> None:
        self.node = node
        """The underlying :class:`~dpwa_core.node.Node` (stats, peers, clock)."""
        self.adapter = adapter
        """The framework adapter mapping the model to the flat buffer."""
        self.state = state
        """The latest model state: the one given to connect, or returned by update_wait."""
        self.last: PullResult | None = None
        """The last successful pull (peer, factor, clocks), or None."""

    def update_send(self, loss: float, state: State | None = None, *, samples: int = 1) -> None:
        """Publish the model's current parameters and maybe start a pull.

        Args:
            loss: the current training loss.
            state: the model state to publish; defaults to :attr:`state`.
            samples: training samples since the last call (advances the clock).
        """
        if state is not None:
            self.state = state
        current = self.state
        layout = self.node.layout
        assert layout is not None  # connect() gives the node its layout up front
        self.node._update_send(
            layout.size, lambda out: self.adapter.to_flat(current, out=out), loss, samples
        )

    def update_wait(self, loss: float, state: State | None = None) -> State:
        """Wait for the pull and interpolate the peer's parameters into the model.

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
        result = self.node.update_wait(loss)
        if result is not None:
            self.last = result
            self.state = self.adapter.interpolate(self.state, result.params, result.factor)
        return self.state

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

    Returns:
        A :class:`Gossip` handle.

    Raises:
        AdapterError: no adapter fits the model, or ``framework`` is unknown.
        ConfigError: the config is invalid or does not name this node.

    Example:
        >>> gossip = dpwa_core.connect(model, "cluster.yaml", "w1")   # doctest: +SKIP
        >>> for x, y in batches:                                      # doctest: +SKIP
        ...     gossip.update_send(loss)
        ...     loss = train_step(model, x, y)
        ...     gossip.update_wait(loss)
    """
    adapter = get_adapter(framework) if framework is not None else detect_adapter(model)
    node = Node(config, name, layout=adapter.layout(model), seed=seed)
    try:
        model = adapter.prepare(model, zero_copy=zero_copy)
    except BaseException:
        node.close()
        raise
    return Gossip(node, adapter, model)
