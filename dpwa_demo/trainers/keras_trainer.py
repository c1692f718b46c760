"""The demo's Keras trainer: the same MLP in Keras 3 (TensorFlow backend), gossip around each step.

The demo's worker drives training one batch at a time, so this trainer calls
``model.train_on_batch`` with the gossip calls around it: ``update_send`` before the step and
``update_wait`` after it. That is exactly what ``dpwa_tensorflow.GossipCallback`` does inside
``model.fit(..., callbacks=[gossip.callback()])``, the idiom for ordinary Keras training.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import numpy as np

import dpwa_core

__all__ = ["KerasTrainer"]


class KerasTrainer:
    """A ``inputs -> hidden -> classes`` ReLU MLP trained by plain SGD in Keras.

    Args:
        inputs: features per sample.
        hidden: units in the hidden layer.
        classes: number of classes.
        seed: seeds the initial weights (different seeds give different starting points).
        lr: SGD learning rate.
    """

    framework = "tensorflow"

    def __init__(self, *, inputs: int, hidden: int, classes: int, seed: int, lr: float) -> None:
        _use_one_thread()  # several nodes share the machine's cores
        init = keras.initializers.GlorotUniform
        self.model = keras.Sequential(
            [
                keras.Input((inputs,)),
                keras.layers.Dense(hidden, activation="relu", kernel_initializer=init(seed)),
                keras.layers.Dense(classes, kernel_initializer=init(seed + 1)),
            ]
        )
        self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss=self._loss)
        self.gossip: dpwa_core.Gossip[Any] | None = None
        self._last_loss: float | None = None

    def connect(self, config: Any, name: str) -> None:
        """Join the cluster as node ``name``; without this call the trainer trains alone."""
        self.gossip = dpwa_core.connect(self.model, config, name, framework="tensorflow")

    def warm_up(self, x: np.ndarray, y: np.ndarray) -> None:
        """Trace the train and predict functions on a batch, then restore the weights."""
        weights = self.model.get_weights()
        self.model.train_on_batch(x, y)
        self.model.set_weights(weights)  # plain SGD keeps no other state worth restoring
        self._batch_loss(x, y)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """Run one SGD step on a batch (with gossip around it when connected); return the loss."""
        if self.gossip is not None:
            if self._last_loss is None:  # the first step: no loss yet, measure the batch's
                self._last_loss = self._batch_loss(x, y)
            self.gossip.update_send(self._last_loss, samples=len(y))
        value = float(self.model.train_on_batch(x, y))
        self._last_loss = value
        if self.gossip is not None:
            self.gossip.update_wait(value)  # interpolates the peer's model in place
        return value

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Return ``(mean loss, accuracy)`` on a data set, without training."""
        logits = np.asarray(self.model(x, training=False))
        loss = float(self._loss(y, logits))
        accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
        return loss, accuracy

    def flat(self) -> np.ndarray:
        """Return the model's parameters as the canonical flat float32 vector."""
        return dpwa_core.get_adapter("tensorflow").to_flat(self.model)

    def stats(self) -> dict[str, Any] | None:
        """Return the gossip node's ``stats()``, or ``None`` when not connected."""
        return None if self.gossip is None else self.gossip.node.stats()

    def close(self) -> None:
        """Leave the cluster (a no-op when not connected)."""
        if self.gossip is not None:
            self.gossip.close()

    def _batch_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self._loss(y, self.model(x, training=False)))


def _use_one_thread() -> None:
    """Ask TensorFlow for one thread per op pool; too late once its runtime has started."""
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
