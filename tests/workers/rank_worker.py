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
import time
from pathlib import Path

import numpy as np

import dpwa_core


def main() -> int:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="LOG %(message)s")
    config, workdir, pulls = dpwa_core.load_config(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    deadline = time.monotonic() + 120
    with dpwa_core.Node(config, seed=0) as node:
        params = np.full(100, float(config.nodes.index(config.node(node.name))), np.float32)
        node.wait_for_peers(timeout=60)
        everyone = [workdir / f"{spec.name}.done" for spec in config.nodes]
        while not all(path.exists() for path in everyone):
            if time.monotonic() > deadline:
                print(f"{node.name}: timed out; stats {node.stats()}", file=sys.stderr)
                return 1
            node.update_send(params, 1.0)
            result = node.update_wait(1.0)
            if result is not None:
                params += result.factor * (result.params - params)
            if node.stats()["pulls_ok"] >= pulls:
                (workdir / f"{node.name}.done").touch()
            time.sleep(0.01)
        # One write: torchrun's children share one unbuffered stdout, and print() writes the
        # text and the newline separately, so two nodes' lines could interleave.
        sys.stdout.write(f"RESULT {node.name} pulls_ok={node.stats()['pulls_ok']}\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
