"""A numpy node that ``dpwa launch --ray`` starts in a Ray actor.

Usage: python ray_command.py CONFIG WORKDIR PULLS [DIE]

The config is the one the launcher wrote on this machine (``{config}``); the node's name comes
from DPWA_NODE. After PULLS successful pulls the node writes WORKDIR/NAME.done and keeps serving
until every node has written its own, then prints a summary line and exits 0 (1 after two
minutes). The node named DIE kills itself with SIGKILL after 5 pulls on its first run (it
leaves WORKDIR/NAME.died behind), so the launcher has a node to restart.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import dpwa_core


def main() -> int:
    config = dpwa_core.load_config(sys.argv[1])
    workdir, pulls = Path(sys.argv[2]), int(sys.argv[3])
    die = sys.argv[4] if len(sys.argv) > 4 else None
    name = os.environ["DPWA_NODE"]
    assert os.environ["DPWA_CONFIG"] == sys.argv[1], "{config} and DPWA_CONFIG disagree"
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
            ok = node.stats()["pulls_ok"]
            if name == die and ok >= 5 and not (workdir / f"{name}.died").exists():
                (workdir / f"{name}.died").touch()
                print(f"{name}: killing myself", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if ok >= pulls:
                (workdir / f"{name}.done").touch()
            time.sleep(0.01)
        stats = node.stats()
        print(f"{name} pulls_ok={stats['pulls_ok']} at {node.address[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
