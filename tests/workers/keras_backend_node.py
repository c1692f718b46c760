"""One node of a small cluster: one Conv2D + Dense model in Keras (any backend), flax or torch.

Usage: [KERAS_BACKEND=...] python keras_backend_node.py CONFIG WORKDIR {keras,flax,torch} STEPS
The node name comes from DPWA_NODE (w1, w2, ...). Every node builds the same architecture
(Conv 3x3 same, 2 -> 4 channels, ReLU, global average pooling, Dense 4 -> 3) in its framework,
starts from its own weights (a seeded canonical vector, written with the adapter), trains
STEPS batches of 8 with plain SGD on its own data and gossips in its framework's idiom:

  keras  model.fit(..., callbacks=[gossip.callback(samples_per_batch=8)])
  flax   params = gossip.step(loss, params, samples=8)   (a flax.linen variables dict)
  torch  gossip.step(loss, samples=8) after optimizer.step()

With KERAS_CHECK_PORT set, a Keras node first runs keras_backend_check.check() (on that port)
and writes its report to NAME.check.json.

Files in WORKDIR coordinate with the test:
  NAME.init.npy     the node's initial flat parameters, written at start
  NAME.ready        written once the node has published its initial model (a step of 0
                    samples); every node waits for all NAME.ready before training, so a
                    node's first pulls find its peers' models even while they compile
  NAME.trained.npy  its flat parameters after training (gossip included), with NAME.done
  settle            created by the test once every node is done: the nodes only average
  NAME.settled      written after SETTLE_ROUNDS averaging rounds past `settle`
  stop              created by the test: write NAME.final.npy and NAME.json
  exit              created by the test: close the node and exit
NAME.json holds the node's stats, its layout, who it blended (during training, and in all) and
the adapter that connect() picked.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import dpwa_core

BATCH = 8
SETTLE_ROUNDS = 30
LR = 0.01
PAUSE = 0.005  # per batch: the tiny model trains faster than a pull travels


def wait_for(path: Path, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.01)


def make_data(index: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """This node's own images (NHWC) and regression targets from one shared teacher."""
    teacher = np.random.default_rng(0).standard_normal((2, 3))
    x = np.random.default_rng(100 + index).standard_normal((steps * BATCH, 6, 6, 2))
    return x.astype(np.float32), (x.mean(axis=(1, 2)) @ teacher).astype(np.float32)


class Blends:
    """Who this node blended: a peer name each time ``gossip.last`` is a new pull."""

    def __init__(self, gossip: Any) -> None:
        self.gossip = gossip
        self.peers: list[str] = []
        self._last: object = None

    def note(self) -> None:
        last = self.gossip.last
        if last is not None and last is not self._last:
            self._last = last
            self.peers.append(last.peer)


class Keras:
    def __init__(self, index: int, config: str, start: np.ndarray) -> None:
        import keras

        self.keras = keras
        layers = keras.layers
        self.model = keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                layers.Conv2D(4, 3, padding="same", activation="relu"),
                layers.GlobalAveragePooling2D(),
                layers.Dense(3),
            ]
        )
        self.model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        dpwa_core.get_adapter("keras").from_flat(self.model, start)
        self.gossip = dpwa_core.connect(self.model, config, seed=index)
        self.blends = Blends(self.gossip)

    def train(self, x: np.ndarray, y: np.ndarray) -> None:
        blends = self.blends

        class Note(self.keras.callbacks.Callback):  # type: ignore[name-defined,misc]
            def on_train_batch_end(self, batch: int, logs: object = None) -> None:
                blends.note()
                time.sleep(PAUSE)

        callbacks = [self.gossip.callback(samples_per_batch=BATCH), Note()]
        self.model.fit(
            x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks
        )

    def average(self) -> None:
        self.gossip.step(1.0, samples=0)

    def flat(self) -> np.ndarray:
        return self.gossip.adapter.to_flat(self.model)


class Flax:
    def __init__(self, index: int, config: str, start: np.ndarray) -> None:
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x: Any) -> Any:
                x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
                return nn.Dense(3)(x.mean(axis=(1, 2)))

        model = Net()
        variables = model.init(jax.random.key(index), jnp.ones((1, 6, 6, 2)))
        self.params = dpwa_core.get_adapter("flax").from_flat(variables, start)

        def loss_fn(params: Any, x: Any, y: Any) -> Any:
            return jnp.mean((model.apply(params, x) - y) ** 2)

        @jax.jit
        def step(params: Any, x: Any, y: Any) -> tuple[Any, Any]:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), loss

        self.step_fn = step
        self.gossip = dpwa_core.connect(self.params, config, seed=index)
        self.blends = Blends(self.gossip)

    def train(self, x: np.ndarray, y: np.ndarray) -> None:
        for start in range(0, len(x), BATCH):
            self.params, loss = self.step_fn(
                self.params, x[start : start + BATCH], y[start : start + BATCH]
            )
            self.params = self.gossip.step(float(loss), self.params, samples=BATCH)
            self.blends.note()
            time.sleep(PAUSE)

    def average(self) -> None:
        self.params = self.gossip.step(1.0, self.params, samples=0)

    def flat(self) -> np.ndarray:
        return self.gossip.adapter.to_flat(self.params)


class Torch:
    def __init__(self, index: int, config: str, start: np.ndarray) -> None:
        import torch

        self.torch = torch

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
                self.dense = torch.nn.Linear(4, 3)

            def forward(self, x: Any) -> Any:  # NHWC in, as Keras and flax take it
                x = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
                return self.dense(x.mean(dim=(2, 3)))

        self.model = Net()
        dpwa_core.get_adapter("torch").from_flat(self.model, start)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.gossip = dpwa_core.connect(self.model, config, seed=index, optimizer=self.optimizer)
        self.blends = Blends(self.gossip)

    def train(self, x: np.ndarray, y: np.ndarray) -> None:
        torch = self.torch
        for start in range(0, len(x), BATCH):
            inputs = torch.from_numpy(x[start : start + BATCH])
            targets = torch.from_numpy(y[start : start + BATCH])
            self.optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(self.model(inputs), targets)
            loss.backward()
            self.optimizer.step()
            self.gossip.step(loss.item(), samples=BATCH)
            self.blends.note()
            time.sleep(PAUSE)

    def average(self) -> None:
        self.gossip.step(1.0, samples=0)

    def flat(self) -> np.ndarray:
        return self.gossip.adapter.to_flat(self.model)


def main() -> None:
    config, workdir, kind, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    name = os.environ["DPWA_NODE"]
    index = int(name.lstrip("w"))
    check_port = os.environ.get("KERAS_CHECK_PORT")
    if check_port and kind == "keras":
        import keras_backend_check  # next to this file

        report = keras_backend_check.check(int(check_port))
        (workdir / f"{name}.check.json").write_text(json.dumps(report))
    # Conv kernel (3, 3, 2, 4) and bias (4,), Dense kernel (4, 3) and bias (3,): 91 values.
    start = np.random.default_rng(index).standard_normal(91).astype(np.float32)
    node: Any = {"keras": Keras, "flax": Flax, "torch": Torch}[kind](index, config, start)
    gossip = node.gossip
    np.save(workdir / f"{name}.init.npy", node.flat())

    x, y = make_data(index, steps)
    gossip.node.wait_for_peers(timeout=240)  # train together, not one after the other
    node.average()  # publishes the initial model (0 samples: the clock stays)
    (workdir / f"{name}.ready").touch()
    for peer in gossip.node.peers():
        wait_for(workdir / f"{peer}.ready")
    node.train(x, y)
    trained_blends = list(node.blends.peers)
    np.save(workdir / f"{name}.trained.npy", node.flat())
    (workdir / f"{name}.done").touch()

    settled = -1
    while not (workdir / "stop").exists():
        node.average()
        node.blends.note()
        if settled < 0 and (workdir / "settle").exists():
            settled = 0
        if settled >= 0:
            settled += 1
            if settled == SETTLE_ROUNDS:
                (workdir / f"{name}.settled").touch()
        time.sleep(0.005)  # let the peers' pulls in between our own
    report = {
        **gossip.node.stats(),
        "layout": [list(s) for s in gossip.node.layout.shapes],
        "adapter": type(gossip.adapter).__name__,
        "blended_in_training": trained_blends,
        "blended": node.blends.peers,
        "backend": __import__("keras").backend.backend() if kind == "keras" else kind,
    }
    np.save(workdir / f"{name}.final.npy", node.flat())
    (workdir / f"{name}.json").write_text(json.dumps(report))
    wait_for(workdir / "exit")
    gossip.close()


if __name__ == "__main__":
    main()
