"""One numpy node started by ``dpwa launch``: gossip until every node has pulled enough.

Usage: python launch_gossip.py CONFIG WORKDIR PULLS
The node's name comes from DPWA_NODE (set by the launcher). After PULLS successful pulls the node
writes WORKDIR/NAME.done, then keeps serving until every node of the config has written its own,
prints one summary line and exits 0; it exits 1 if that takes more than two minutes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

import dpwa_core


def main() -> int:
    config, workdir, pulls = dpwa_core.load_config(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    name = os.environ["DPWA_NODE"]
    params = np.full(1000, float(name.lstrip("w")), np.float32)
    deadline = time.monotonic() + 120
    with dpwa_core.Node(config, seed=0) as node:
        node.wait_for_peers(timeout=60)
        everyone = [workdir / f"{spec.name}.done" for spec in config.nodes]
        while not all(path.exists() for path in everyone):
            if time.monotonic() > deadline:
                print(f"{name}: timed out; stats {node.stats()}", file=sys.stderr)
                return 1
            node.update_send(params, 1.0)
            result = node.update_wait(1.0)
            if result is not None:
                params += result.factor * (result.params - params)
            if node.stats()["pulls_ok"] >= pulls:
                (workdir / f"{name}.done").touch()
            time.sleep(0.01)
        stats = node.stats()
        print(f"{name} pulls_ok={stats['pulls_ok']} mean={params.mean():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
