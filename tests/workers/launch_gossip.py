"""One numpy node started by ``dpwa launch``: gossip until every node has pulled enough.

Usage: python launch_gossip.py CONFIG WORKDIR PULLS
The node's name comes from DPWA_NODE (set by the launcher). After PULLS successful pulls the node
writes WORKDIR/NAME.done, then keeps serving until every node of the config has written its own,
prints one summary line and exits 0; it exits 1 if that takes more than two minutes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from _gossip import gossip_until_all_done

import dpwa_core


def main() -> int:
    config, workdir, pulls = dpwa_core.load_config(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    name = os.environ["DPWA_NODE"]
    params = np.full(1000, float(name.lstrip("w")), np.float32)
    with dpwa_core.Node(config, seed=0) as node:
        if not gossip_until_all_done(node, config, workdir, pulls, params):
            return 1
        stats = node.stats()
        print(f"{name} pulls_ok={stats['pulls_ok']} mean={params.mean():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
