"""A node that pulls from a hostile peer many times and reports its memory (tests/test_floods.py).

Usage: flood_victim.py CONFIG NAME PULLS OUT.json

Logs go to stderr at INFO, as a user's basicConfig would show them.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import psutil

import dpwa_core


def main(config: str, name: str, pulls: int, out: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    process = psutil.Process()
    params = np.zeros(64, np.float32)
    with dpwa_core.Node(config, name) as node:
        rss = []
        for step in range(pulls):
            if step in (pulls // 10, pulls - 1):
                rss.append(process.memory_info().rss)
            node.update_send(params, 1.0)
            node.update_wait(1.0)
        stats = node.stats()
    with open(out, "w") as file:
        json.dump({"rss": rss, "stats": stats}, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
