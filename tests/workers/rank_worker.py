"""One numpy node that learns its name from its launcher's rank: no name, no DPWA_NODE.

Usage: python rank_worker.py CONFIG WORKDIR PULLS
Started by a real launcher (torchrun) or with the environment a launcher sets (Slurm, Open MPI,
a Kubernetes indexed Job). The node's log lines go to stdout as ``LOG <message>``. After PULLS
successful pulls the node writes WORKDIR/NAME.done, keeps serving until every node of the config
has written its own, prints ``RESULT NAME pulls_ok=N`` and exits 0; it exits 1 if that takes more
than two minutes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from _gossip import gossip_until_all_done

import dpwa_core


def main() -> int:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="LOG %(message)s")
    config, workdir, pulls = dpwa_core.load_config(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    with dpwa_core.Node(config, seed=0) as node:
        params = np.full(100, float(config.nodes.index(config.node(node.name))), np.float32)
        if not gossip_until_all_done(node, config, workdir, pulls, params):
            return 1
        # One write: torchrun's children share one unbuffered stdout, and print() writes the
        # text and the newline separately, so two nodes' lines could interleave.
        sys.stdout.write(f"RESULT {node.name} pulls_ok={node.stats()['pulls_ok']}\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
