"""One node of a multi-process test: gossip until told to stop, then report.

Usage: python gossip_worker.py CONFIG WORKDIR {numpy,torch} MIN_ROUNDS
The node name comes from DPWA_NODE. Files in WORKDIR coordinate with the test:
  NAME.init.npy   written at start (the node's initial parameters)
  NAME.done       written after MIN_ROUNDS rounds; the node keeps gossiping
  stop            created by the test: stop pulling, write NAME.final.npy and NAME.json
  exit            created by the test: close the node and exit
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import dpwa_core


def wait_for(path: Path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.01)


def main() -> None:
    config, workdir, kind, min_rounds = (
        sys.argv[1],
        Path(sys.argv[2]),
        sys.argv[3],
        int(sys.argv[4]),
    )
    name = os.environ["DPWA_NODE"]
    index = int(name.lstrip("w"))
    if kind == "torch":
        import torch

        torch.manual_seed(index)
        model = torch.nn.Sequential(
            torch.nn.Linear(20, 32),
            torch.nn.BatchNorm1d(32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 4),
        )
        gossip = dpwa_core.connect(model, config, seed=index)
        node = gossip.node

        def flat() -> np.ndarray:
            return gossip.adapter.to_flat(model)

        def round_trip() -> None:
            gossip.update_send(1.0)
            gossip.update_wait(1.0)
    else:
        params = np.random.default_rng(index).normal(index, 1.0, 10_000).astype(np.float32)
        node = dpwa_core.Node(config, seed=index)

        def flat() -> np.ndarray:
            return params.copy()

        def round_trip() -> None:
            node.update_send(params, 1.0)
            result = node.update_wait(1.0)
            if result is not None:
                result.blend_into(params)

    np.save(workdir / f"{name}.init.npy", flat())
    # Start together: a peer pulled before it was up scores 0.01 and, among three live peers,
    # may never be picked again before the run ends (its pulls_served stays 0).
    node.wait_for_peers(timeout=60)
    rounds = 0
    while not (workdir / "stop").exists():
        round_trip()
        rounds += 1
        if rounds == min_rounds:
            (workdir / f"{name}.done").touch()
    stats = node.stats()
    np.save(workdir / f"{name}.final.npy", flat())
    (workdir / f"{name}.json").write_text(json.dumps({"rounds": rounds, **stats}))
    wait_for(workdir / "exit")
    node.close()


if __name__ == "__main__":
    main()
