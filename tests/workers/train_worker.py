"""A training process for shutdown tests: gossips until a signal ends it.

Usage: python train_worker.py CONFIG NAME READY_FILE {with,bare}
``with`` holds the node in a ``with`` block; ``bare`` never closes it, leaving that to dpwa's
exit hooks. Logs at INFO to stderr; creates READY_FILE after its first successful pull.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from dpwa_core.layout import Layout
from dpwa_core.node import Node


def train(node: Node, ready: Path) -> None:
    params = np.zeros(1000, np.float32)
    while True:
        node.update_send(params, 1.0)
        result = node.update_wait(1.0)
        if result is not None:
            result.blend_into(params)
            if not ready.exists():
                ready.touch()


def main() -> None:
    config, name, ready, mode = sys.argv[1:5]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if mode == "with":
        with Node(config, name, layout=Layout.flat(1000)) as node:
            train(node, Path(ready))
    else:
        train(Node(config, name, layout=Layout.flat(1000)), Path(ready))


if __name__ == "__main__":
    main()
