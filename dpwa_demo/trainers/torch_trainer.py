"""The demo's PyTorch trainer: an MLP, SGD, and gossip around each step.

The integration is the one every PyTorch user writes: ``update_send`` before the optimizer step
(publish the parameters, start a pull in the background) and ``update_wait`` after it (blend the
peer's parameters into the model in place).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import dpwa_core

__all__ = ["TorchTrainer"]


class TorchTrainer:
    """A ``inputs -> hidden -> classes`` ReLU MLP trained by plain SGD in PyTorch.

    Args:
        inputs: features per sample.
        hidden: units in the hidden layer.
        classes: number of classes.
        seed: seeds the initial weights (different seeds give different starting points).
        lr: SGD learning rate.
    """

    framework = "torch"

    def __init__(self, *, inputs: int, hidden: int, classes: int, seed: int, lr: float) -> None:
        torch.set_num_threads(1)  # several nodes share the machine's cores
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.gossip: dpwa_core.Gossip[torch.nn.Module] | None = None

    def connect(self, config: Any, name: str) -> None:
        """Join the cluster as node ``name``; without this call the trainer trains alone."""
        self.gossip = dpwa_core.connect(self.model, config, name, framework="torch")

    def warm_up(self, x: np.ndarray, y: np.ndarray) -> None:
        """Nothing to compile: PyTorch runs eagerly, and its first step is already fast."""

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """Run one SGD step on a batch (with gossip around it when connected); return the loss."""
        inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
        self.optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(inputs), labels)
        value = loss.item()
        if self.gossip is not None:
            # Publish the parameters this loss belongs to; the pull runs during the step.
            self.gossip.update_send(value, samples=len(y))
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        if self.gossip is not None:
            self.gossip.update_wait(value)  # interpolates the peer's model in place
        return value

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Return ``(mean loss, accuracy)`` on a data set, without training."""
        with torch.no_grad():
            logits = self.model(torch.from_numpy(x))
            labels = torch.from_numpy(y)
            loss = torch.nn.functional.cross_entropy(logits, labels).item()
            accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        return loss, accuracy

    def flat(self) -> np.ndarray:
        """Return the model's parameters as the canonical flat float32 vector."""
        return dpwa_core.get_adapter("torch").to_flat(self.model)

    def stats(self) -> dict[str, Any] | None:
        """Return the gossip node's ``stats()``, or ``None`` when not connected."""
        return None if self.gossip is None else self.gossip.node.stats()

    def close(self) -> None:
        """Leave the cluster (a no-op when not connected)."""
        if self.gossip is not None:
            self.gossip.close()
