"""The loop the launcher tests' node processes share: gossip until every node has pulled enough.

Each node writes WORKDIR/NAME.done after ``pulls`` successful pulls, then keeps serving until
every node of the config has written its own, so no node leaves its peers without a partner.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import dpwa_core

TIMEOUT = 120.0  # seconds a node may take before it gives up


def gossip_until_all_done(
    node: dpwa_core.Node,
    config: dpwa_core.Config,
    workdir: Path,
    pulls: int,
    params: np.ndarray,
    after_pull: Callable[[int], None] | None = None,
) -> bool:
    """Publish and pull until every node wrote its ``.done`` file; False after TIMEOUT.

    ``after_pull(pulls_ok)`` runs after each step, e.g. to kill the process on purpose.
    """
    deadline = time.monotonic() + TIMEOUT
    node.wait_for_peers(timeout=60)
    everyone = [workdir / f"{spec.name}.done" for spec in config.nodes]
    while not all(path.exists() for path in everyone):
        if time.monotonic() > deadline:
            print(f"{node.name}: timed out; stats {node.stats()}", file=sys.stderr)
            return False
        node.update_send(params, 1.0)
        result = node.update_wait(1.0)
        if result is not None:
            result.blend_into(params)
        ok = node.stats()["pulls_ok"]
        if after_pull is not None:
            after_pull(ok)
        if ok >= pulls:
            (workdir / f"{node.name}.done").touch()
        time.sleep(0.01)
    return True
