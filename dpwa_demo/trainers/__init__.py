"""The demo's per-framework trainers: one small MLP, trained the way each framework trains.

Every trainer builds the same architecture (``inputs -> hidden -> classes``, ReLU, softmax
cross-entropy, plain SGD), so nodes of different frameworks share one canonical layout and can
average one model. A trainer owns its framework's gossip idiom (PyTorch: ``update_send`` before the
step and ``update_wait`` after; Keras: a callback; JAX: ``params = gossip.update_wait(loss,
params)``), so the worker loop that drives it is framework-neutral. The demo compares gossip
and isolated nodes at equal step counts, so its trainers use the blocking pair (one pull per
step); a training loop of your own calls ``gossip.step(loss)`` after the optimizer step instead,
which never waits (README).

To add a framework, write a module here with a class that satisfies :class:`Trainer` and list it
in :data:`TRAINERS`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

__all__ = ["TRAINERS", "Trainer", "make_trainer"]

TRAINERS: dict[str, str] = {
    "torch": "dpwa_demo.trainers.torch_trainer:TorchTrainer",
    "tensorflow": "dpwa_demo.trainers.keras_trainer:KerasTrainer",
    "jax": "dpwa_demo.trainers.jax_trainer:JaxTrainer",
}
"""Framework name -> ``module:Class`` of its trainer, imported only when asked for."""


class Trainer(Protocol):
    """What the demo's worker loop needs from one framework's model.

    Constructed as ``Trainer(inputs=..., hidden=..., classes=..., seed=..., lr=...)``.
    """

    framework: str
    """The adapter name given to :func:`dpwa_core.connect` (``"torch"``, ``"tensorflow"``, ...)."""

    def connect(self, config: Any, name: str) -> None:
        """Join the cluster as node ``name``; without this call the trainer trains alone."""

    def warm_up(self, x: np.ndarray, y: np.ndarray) -> None:
        """Compile the training step on a batch, leaving the model as it was.

        Frameworks that compile on first use (JAX's ``jit``, Keras's traced train function)
        do it here, before the node joins, so its first real steps are not seconds long.
        """

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """Run one SGD step on a batch (with gossip around it when connected); return the loss."""

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Return ``(mean loss, accuracy)`` on a data set, without training."""

    def flat(self) -> np.ndarray:
        """Return the model's parameters as the canonical flat float32 vector."""

    def stats(self) -> dict[str, Any] | None:
        """Return the gossip node's ``stats()``, or ``None`` when not connected."""

    def close(self) -> None:
        """Leave the cluster (a no-op when not connected)."""


def make_trainer(
    framework: str, *, inputs: int, hidden: int, classes: int, seed: int, lr: float
) -> Trainer:
    """Build the demo trainer for a framework.

    Args:
        framework: a key of :data:`TRAINERS`.
        inputs: features per sample.
        hidden: units in the hidden layer.
        classes: number of classes.
        seed: seed for the initial weights.
        lr: SGD learning rate.

    Raises:
        ValueError: the framework has no demo trainer.
    """
    try:
        target = TRAINERS[framework]
    except KeyError:
        known = ", ".join(sorted(TRAINERS))
        raise ValueError(f"no demo trainer for framework {framework!r}; known: {known}") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    trainer: Trainer = cls(inputs=inputs, hidden=hidden, classes=classes, seed=seed, lr=lr)
    return trainer
