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
from pathlib import Path

import numpy as np
from _gossip import gossip_until_all_done

import dpwa_core


def main() -> int:
    config = dpwa_core.load_config(sys.argv[1])
    workdir, pulls = Path(sys.argv[2]), int(sys.argv[3])
    die = sys.argv[4] if len(sys.argv) > 4 else None
    name = os.environ["DPWA_NODE"]
    assert os.environ["DPWA_CONFIG"] == sys.argv[1], "{config} and DPWA_CONFIG disagree"

    def maybe_die(pulls_ok: int) -> None:
        if name == die and pulls_ok >= 5 and not (workdir / f"{name}.died").exists():
            (workdir / f"{name}.died").touch()
            print(f"{name}: killing myself", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    params = np.full(1000, float(name.lstrip("w")), np.float32)
    with dpwa_core.Node(config, seed=0) as node:
        if not gossip_until_all_done(node, config, workdir, pulls, params, maybe_die):
            return 1
        print(f"{name} pulls_ok={node.stats()['pulls_ok']} at {node.address[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
