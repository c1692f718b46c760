"""The demo's JAX trainer: the same MLP in flax.linen, plain SGD, and the functional gossip idiom.

JAX parameters are immutable, so averaging returns new ones and the loop keeps them::

    loss, grads = loss_and_grads(params, x, y)
    gossip.update_send(loss, params)
    params = sgd_update(params, grads)
    params = gossip.update_wait(loss, params)

Unlike the other trainers this one sets no thread limit: JAX's CPU backend runs this model's
small operations on one thread already (its CPU time equals its wall time, with or without
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpwa_core

__all__ = ["JaxTrainer"]


class _MLP(nn.Module):
    hidden: int
    classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(hidden)


class JaxTrainer:
    """A ``inputs -> hidden -> classes`` ReLU MLP trained by plain SGD in JAX/flax.

    Args:
        inputs: features per sample.
        hidden: units in the hidden layer.
        classes: number of classes.
        seed: seeds the initial weights (different seeds give different starting points).
        lr: SGD learning rate.
    """

    framework = "jax"

    def __init__(self, *, inputs: int, hidden: int, classes: int, seed: int, lr: float) -> None:
        self.module = _MLP(hidden=hidden, classes=classes)
        self.params: Any = self.module.init(jax.random.key(seed), jnp.ones((1, inputs)))
        self.gossip: dpwa_core.Gossip[Any] | None = None
        module = self.module

        def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
            logits: jax.Array = module.apply(params, x)  # type: ignore[assignment]
            loss: jax.Array = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss

        def sgd_update(params: Any, grads: Any) -> Any:
            return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)

        def scores(params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits: jax.Array = module.apply(params, x)  # type: ignore[assignment]
            loss: jax.Array = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, jnp.mean(jnp.argmax(logits, axis=1) == y)

        self._loss_and_grads = jax.jit(jax.value_and_grad(loss_fn))
        self._update = jax.jit(sgd_update)
        self._scores = jax.jit(scores)

    def connect(self, config: Any, name: str) -> None:
        """Join the cluster as node ``name``; without this call the trainer trains alone."""
        self.gossip = dpwa_core.connect(self.params, config, name, framework="jax")

    def warm_up(self, x: np.ndarray, y: np.ndarray) -> None:
        """Compile the jitted step and scores on a batch; the results are dropped.

        A jitted call returns once compiled and dispatched, so nothing needs waiting for.
        """
        labels = y.astype(np.int32)
        _, grads = self._loss_and_grads(self.params, x, labels)
        self._update(self.params, grads)
        self._scores(self.params, x, labels)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """Run one SGD step on a batch (with gossip around it when connected); return the loss."""
        loss, grads = self._loss_and_grads(self.params, x, y.astype(np.int32))
        value = float(loss)
        if self.gossip is not None:
            # Publish the parameters this loss belongs to; the pull runs during the update.
            self.gossip.update_send(value, self.params, samples=len(y))
        self.params = self._update(self.params, grads)
        if self.gossip is not None:
            self.params = self.gossip.update_wait(value, self.params)  # a new pytree
        return value

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Return ``(mean loss, accuracy)`` on a data set, without training."""
        loss, accuracy = self._scores(self.params, x, y.astype(np.int32))
        return float(loss), float(accuracy)

    def flat(self) -> np.ndarray:
        """Return the model's parameters as the canonical flat float32 vector."""
        return dpwa_core.get_adapter("jax").to_flat(self.params)

    def stats(self) -> dict[str, Any] | None:
        """Return the gossip node's ``stats()``, or ``None`` when not connected."""
        return None if self.gossip is None else self.gossip.node.stats()

    def close(self) -> None:
        """Leave the cluster (a no-op when not connected)."""
        if self.gossip is not None:
            self.gossip.close()
