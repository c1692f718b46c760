"""One node of tests/test_restart.py: a PyTorch MLP learning the digits by gossip, with Adam.

Usage: ``python restart_node.py CONFIG NAME WORKDIR``. The node trains on its own quarter of
the training images (iid), calling ``gossip.step`` after every optimizer step, and appends a
line ``step accuracy`` to WORKDIR/NAME.log after every 10th step (accuracy on the fixed test
set). It stops when WORKDIR/stop exists, then writes WORKDIR/NAME.json with its gossip stats.
A restarted node (the test starts it again under the same name) starts from fresh random weights
and a fresh optimizer: its catch-up copies a peer's model and optimizer state.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits

import dpwa_core

SAFETY_SECONDS = 240.0  # a node gives up by itself if the test never writes stop


def main(config_path: str, name: str, workdir: str) -> None:
    """Train node ``name`` until WORKDIR/stop exists."""
    folder = Path(workdir)
    config = dpwa_core.load_config(config_path)
    index = [node.name for node in config.nodes].index(name)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    x_test, y_test = x[:400], y[:400]
    count = len(config.nodes)
    x_train, y_train = x[400 + index :: count], y[400 + index :: count]
    torch.set_num_threads(1)
    restarts = len(list(folder.glob(f"{name}.start*")))
    (folder / f"{name}.start{restarts}").touch()
    torch.manual_seed(1000 * restarts + index)  # a restarted node starts from scratch
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1000 * restarts + index)
    log = (folder / f"{name}.log").open("a", buffering=1)
    give_up = time.monotonic() + SAFETY_SECONDS
    with dpwa_core.connect(model, config, name, optimizer=optimizer) as gossip:
        gossip.node.wait_for_peers(timeout=60)
        step = 0
        while not (folder / "stop").exists() and time.monotonic() < give_up:
            batch = torch.randint(0, len(y_train), (32,), generator=generator)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            gossip.step(loss.item(), samples=32)
            step += 1
            if step % 10 == 0:
                with torch.no_grad():
                    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
                log.write(f"{restarts} {step} {accuracy:.4f} {time.time():.3f}\n")
            time.sleep(0.002)  # four nodes share two cores: leave the peers' threads room
        stats = gossip.node.stats()
    keys = ("joined_from", "optimizer_state_from", "served_state", "pulls_ok", "steps")
    (folder / f"{name}.json").write_text(json.dumps({k: stats[k] for k in keys}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
