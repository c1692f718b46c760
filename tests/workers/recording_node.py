"""A node that publishes a constant and records every pull it accepts (for the attack tests).

Usage: recording_node.py CONFIG NAME VALUE SECONDS OUT.json

It runs until the file OUT.json.stop exists, or SECONDS pass, and creates OUT.json.pulled once
it has accepted 5 pulls.

It never blends, so every value it accepted is in its record: the test checks that nothing an
attacker sent is among them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import numpy as np

import dpwa_core


def main(config: str, name: str, value: float, seconds: float, out: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    accepted: list[tuple[str, float, float]] = []
    params = np.full(64, value, np.float32)
    with dpwa_core.Node(config, name) as node:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not os.path.exists(out + ".stop"):
            node.update_send(params, 1.0)
            result = node.update_wait(1.0)
            if result is not None:
                accepted.append(
                    (result.peer, float(result.params.min()), float(result.params.max()))
                )
                if len(accepted) == 5:
                    open(out + ".pulled", "w").close()
            time.sleep(0.01)
        stats = node.stats()
    with open(out, "w") as file:
        json.dump({"accepted": accepted, "stats": stats}, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
