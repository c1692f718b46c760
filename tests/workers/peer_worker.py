"""A node process that publishes constant parameters and pulls from its peers until killed.

Usage: python peer_worker.py CONFIG NAME SIZE VALUE READY_FILE
Publishes SIZE float32 values equal to VALUE (it never applies what it pulls, so a test knows
exactly what this peer serves), creates READY_FILE once its first snapshot is published, and
runs until it is killed or gets SIGTERM / SIGINT.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from dpwa_core.layout import Layout
from dpwa_core.node import Node


def main() -> None:
    config, name, size, value, ready = sys.argv[1:6]
    params = np.full(int(size), float(value), np.float32)
    with Node(config, name, layout=Layout.flat(int(size))) as node:
        node.update_send(params, 1.0)
        Path(ready).touch()
        while True:
            node.update_wait(1.0)
            time.sleep(0.005)
            node.update_send(params, 1.0)


if __name__ == "__main__":
    main()
