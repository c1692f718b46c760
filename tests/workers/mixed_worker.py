"""One node of a mixed-framework cluster: train one small MLP in torch, Keras or JAX, and gossip.

Usage: python mixed_worker.py CONFIG WORKDIR {torch,keras,jax} TRAIN_STEPS
The node name comes from DPWA_NODE. Every node trains the same architecture (10 -> 16 -> 3,
ReLU, softmax cross-entropy, SGD) on its own synthetic data, in its framework's idiom:

  torch  update_send before the step, update_wait after it
  keras  model.fit(..., callbacks=[gossip.callback()])
  jax    params = gossip.update_wait(loss, params)

Files in WORKDIR coordinate with the test:
  NAME.init.npy   written at start (the node's initial flat parameters)
  NAME.done       written after TRAIN_STEPS training steps; the node then only averages
  settle          created by the test when every node is done
  NAME.settled    written after SETTLE_ROUNDS averaging rounds past `settle`
  stop            created by the test: write NAME.final.npy and NAME.json
  exit            created by the test: close the node and exit
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import dpwa_core

INPUTS, HIDDEN, CLASSES = 10, 16, 3
BATCH = 16
SETTLE_ROUNDS = 40


def wait_for(path: Path, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.01)


def make_data(index: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """This node's own samples, labelled by one teacher shared by all nodes."""
    teacher = np.random.default_rng(0).standard_normal((INPUTS, CLASSES))
    x = np.random.default_rng(100 + index).standard_normal((steps * BATCH, INPUTS))
    return x.astype(np.float32), np.argmax(x @ teacher, axis=1).astype(np.int32)


class Torch:
    def __init__(self, index: int, config: str) -> None:
        import torch

        self.torch = torch
        torch.manual_seed(index)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(INPUTS, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES)
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.gossip = dpwa_core.connect(self.model, config, seed=index)

    def train(self, x: np.ndarray, y: np.ndarray, losses: list[float]) -> None:
        torch = self.torch
        loss_value = 1.0
        for start in range(0, len(x), BATCH):
            self.gossip.update_send(loss_value, samples=BATCH)
            inputs = torch.from_numpy(x[start : start + BATCH])
            labels = torch.from_numpy(y[start : start + BATCH]).long()
            self.optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.model(inputs), labels)
            loss.backward()
            self.optimizer.step()
            loss_value = loss.item()
            losses.append(loss_value)
            self.gossip.update_wait(loss_value)

    def flat(self) -> np.ndarray:
        return self.gossip.adapter.to_flat(self.model)


class Keras:
    def __init__(self, index: int, config: str) -> None:
        import keras

        keras.utils.set_random_seed(index)
        self.model = keras.Sequential(
            [
                keras.Input((INPUTS,)),
                keras.layers.Dense(HIDDEN, activation="relu"),
                keras.layers.Dense(CLASSES),
            ]
        )
        self.model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        self.gossip = dpwa_core.connect(self.model, config, seed=index)

    def train(self, x: np.ndarray, y: np.ndarray, losses: list[float]) -> None:
        callback = self.gossip.callback(samples_per_batch=BATCH)
        history = self.model.fit(
            x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback]
        )
        losses.extend(history.history["loss"])

    def flat(self) -> np.ndarray:
        return self.gossip.adapter.to_flat(self.model)


class Jax:
    def __init__(self, index: int, config: str) -> None:
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import optax

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x: Any) -> Any:
                hidden = nn.relu(nn.Dense(HIDDEN)(x))
                return nn.Dense(CLASSES)(hidden)

        model = MLP()
        self.params = model.init(jax.random.key(index), jnp.ones((1, INPUTS)))

        def loss_fn(params: Any, x: Any, y: Any) -> Any:
            logits = model.apply(params, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        @jax.jit
        def step(params: Any, x: Any, y: Any) -> tuple[Any, Any]:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads), loss

        self.step = step
        self.gossip = dpwa_core.connect(self.params, config, seed=index)

    def train(self, x: np.ndarray, y: np.ndarray, losses: list[float]) -> None:
        loss = 1.0
        for start in range(0, len(x), BATCH):
            self.gossip.update_send(loss, self.params, samples=BATCH)
            self.params, loss_array = self.step(
                self.params, x[start : start + BATCH], y[start : start + BATCH]
            )
            loss = float(loss_array)
            losses.append(loss)
            self.params = self.gossip.update_wait(loss, self.params)

    def flat(self) -> np.ndarray:
        return self.gossip.adapter.to_flat(self.params)

    def average(self) -> None:
        self.gossip.update_send(1.0, self.params)
        self.params = self.gossip.update_wait(1.0, self.params)


def main() -> None:
    config, workdir, kind, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    name = os.environ["DPWA_NODE"]
    index = int(name.lstrip("w"))
    node: Any = {"torch": Torch, "keras": Keras, "jax": Jax}[kind](index, config)
    gossip = node.gossip
    np.save(workdir / f"{name}.init.npy", node.flat())
    (workdir / f"{name}.layout.json").write_text(json.dumps(list(gossip.node.layout.shapes)))

    losses: list[float] = []
    x, y = make_data(index, steps)
    gossip.node.wait_for_peers(timeout=240)  # train together, not one after the other
    node.train(x, y, losses)
    (workdir / f"{name}.done").touch()

    average: Callable[[], None] = getattr(node, "average", None) or (
        lambda: (gossip.update_send(1.0), gossip.update_wait(1.0))
    )
    settled = -1
    while not (workdir / "stop").exists():
        average()
        if settled < 0 and (workdir / "settle").exists():
            settled = 0
        if settled >= 0:
            settled += 1
            if settled == SETTLE_ROUNDS:
                (workdir / f"{name}.settled").touch()
        time.sleep(0.002)  # let the peers' pulls in between our own
    stats = gossip.node.stats()
    np.save(workdir / f"{name}.final.npy", node.flat())
    (workdir / f"{name}.json").write_text(json.dumps({"losses": losses, **stats}))
    wait_for(workdir / "exit")
    gossip.close()


if __name__ == "__main__":
    main()
