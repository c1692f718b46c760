"""A Keras callback that gossips once per training batch.

``on_train_batch_end`` calls ``gossip.step`` after each batch, as a PyTorch loop does after its
optimizer step: a pull that landed meanwhile is blended in, the model is copied for peers if one
asked, and the next pull starts, without waiting for the network (with the config's
``blocking: true``, it waits for each pull as the seed did).

Every Keras backend: on TensorFlow and torch, ``fit`` trains the model's variables in place. On
JAX it keeps the weights and the optimizer's variables outside them during an epoch; the adapter
syncs them back (``model.jax_state_sync()``) whenever gossip reads or writes the model, and
``fit`` takes what gossip wrote at its next batch, so a blend is never lost.

Which loss is reported: Keras 3 puts the *running mean* of the loss since the start of the
epoch into ``logs["loss"]``, not the loss of the batch. The callback recovers the batch loss from
two consecutive running means (``(b + 1) * mean_b - b * mean_(b-1)`` for batch ``b``), which is
exact when the batches carry equal weight (every batch but a smaller last one) and otherwise
close.
"""

from __future__ import annotations

import math
from typing import Any

import keras

__all__ = ["GossipCallback"]


class GossipCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Gossip around every training batch of ``model.fit``.

    Args:
        gossip: the :class:`~dpwa_core.connect.Gossip` handle of the model being fitted
            (``dpwa_core.connect(model, ...)``).
        samples_per_batch: how far the node's clock advances per batch; pass the batch size
            to count samples, as the PyTorch examples do (default 1: count batches).
        initial_loss: the loss reported when a batch's logs hold none.

    Example:
        >>> gossip = dpwa_core.connect(model, "cluster.yaml", "w1")        # doctest: +SKIP
        >>> model.fit(x, y, batch_size=32,                                 # doctest: +SKIP
        ...           callbacks=[GossipCallback(gossip, samples_per_batch=32)])
    """

    def __init__(self, gossip: Any, samples_per_batch: int = 1, initial_loss: float = 1.0) -> None:
        super().__init__()
        if not isinstance(samples_per_batch, int) or samples_per_batch < 1:
            raise ValueError(f"samples_per_batch must be a positive int, got {samples_per_batch!r}")
        self.gossip = gossip
        """The gossip handle the callback drives."""
        self.samples_per_batch = samples_per_batch
        """Clock advance per batch."""
        self.batch_loss = float(initial_loss)
        """The loss of the last finished batch (recovered from Keras's running mean)."""
        self._last_batch = -1
        self._last_mean = 0.0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Gossip once after the batch (``gossip.step``), with this batch's loss."""
        mean = _loss_of(logs)
        if mean is not None:
            if batch <= self._last_batch:  # a new epoch: Keras restarted its running mean
                self._last_batch, self._last_mean = -1, 0.0
            steps = batch - self._last_batch
            loss = ((batch + 1) * mean - (self._last_batch + 1) * self._last_mean) / steps
            self.batch_loss = loss if math.isfinite(loss) else mean
            self._last_batch, self._last_mean = batch, mean
        self.gossip.step(self.batch_loss, samples=self.samples_per_batch)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Restart the running-mean bookkeeping with Keras's."""
        self._last_batch, self._last_mean = -1, 0.0


def _loss_of(logs: dict[str, Any] | None) -> float | None:
    if not logs or "loss" not in logs:
        return None
    try:
        return float(logs["loss"])
    except (TypeError, ValueError):
        return None
