"""A node in a network-lab host: steps a constant model with ``Node.step`` and records pulls.

Usage: lab_node.py CONFIG NAME VALUE SIZE SECONDS OUT.json

Waits for its peers, then calls ``step`` every 10 ms for SECONDS. The model is never trained,
so every value it ends with came from a blend: the test checks whose values those are.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import numpy as np

import dpwa_core


def main(config: str, name: str, value: float, size: int, seconds: float, out: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    params = np.full(size, value, np.float32)
    pulls: list[dict[str, object]] = []
    slowest = 0.0
    with dpwa_core.Node(config, name) as node:
        node.wait_for_peers(timeout=30)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            began = time.monotonic()
            result = node.step(params, 1.0)
            slowest = max(slowest, time.monotonic() - began)
            if result is not None:
                pulls.append(
                    {"peer": result.peer, "behind": result.steps_behind, "joined": result.joined}
                )
            time.sleep(0.01)
        stats = node.stats()
    values = np.unique(params)[:5].tolist()
    with open(out, "w") as f:
        json.dump({"stats": stats, "pulls": pulls, "values": values, "slowest": slowest}, f)


if __name__ == "__main__":
    config, name, value, size, seconds, out = sys.argv[1:]
    main(config, name, float(value), int(size), float(seconds), out)
