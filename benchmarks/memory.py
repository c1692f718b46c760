"""Memory a node needs beyond its model, with 1, 4 and 8 peers pulling from it and it from them.

One measured node publishes and pulls a model of ``--mib`` MiB while ``P`` peer processes do the
same with it, all at pull probability 1, for ``--seconds``. The measured node then reports

- ``private``: its private resident memory (``Private_Clean + Private_Dirty`` from
  ``/proc/self/smaps_rollup``), minus the model array itself and minus a baseline taken before
  the node started (the interpreter and numpy),
- ``shm``: the size of its own shared-memory segment (its two snapshot buffers live there with
  ``transport: auto``; 0 with ``transport: tcp``), and
- ``overhead``: ``(private + shm) / model``; the target is at most about 3, whatever ``P``.

Peers' segments that the node maps to copy from are other nodes' memory, so they are not counted.

Run by hand (Linux): ``python benchmarks/memory.py [--mib 100] [--peers 1 4 8]``.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np
from _ports import free_ports

MiB = 1024 * 1024


def _private_bytes() -> int:
    fields = {}
    with open("/proc/self/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def _blend(params: np.ndarray, peer: np.ndarray, factor: float, step: int = 1 << 18) -> None:
    """``params += factor * (peer - params)`` in place, with temporaries of one chunk only."""
    for start in range(0, params.size, step):
        local = params[start : start + step]
        delta = peer[start : start + step] - local
        delta *= factor
        local += delta


def _node(name: str, config: dict[str, Any], nbytes: int, seconds: float, out: Any) -> None:
    import dpwa_core

    params = np.full(nbytes // 4, float(name[1:]), np.float32)  # the model, touched
    baseline = _private_bytes()
    with dpwa_core.Node(config, name, seed=int(name[1:])) as node:
        node.wait_for_peers(timeout=120)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            node.update_send(params, 1.0)
            result = node.update_wait(1.0)
            if result is not None:
                _blend(params, result.params, result.factor)
        private = _private_bytes() - baseline
        stats = node.stats()
        segment = node._snapshots.segment if node._snapshots is not None else None
        shm = 0 if segment is None else os.path.getsize(f"/dev/shm/{segment.name}")
        if name == "w1":
            out.put({"private": private, "shm": shm, "pulls_ok": stats["pulls_ok"]})
        time.sleep(3)  # keep serving while the others finish


def measure(peers: int, nbytes: int, seconds: float, transport: str) -> dict[str, Any]:
    """Run one measured node with ``peers`` peers; return its memory figures."""
    ports = free_ports(peers + 1)
    config = {
        "start": "own",  # single pulls are measured, not training from one model
        "nodes": [
            {"name": f"w{i + 1}", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)
        ],
        "pull_probability": 1.0,
        "timeout_ms": 20_000,
        "transport": transport,
    }
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_node, args=(f"w{i + 1}", config, nbytes, seconds, queue))
        for i in range(peers + 1)
    ]
    for proc in procs:
        proc.start()
    row: dict[str, Any] = queue.get(timeout=600)
    for proc in procs:
        proc.join(timeout=60)
    row["overhead"] = (row["private"] + row["shm"]) / nbytes
    return row


def main() -> None:
    """Run the benchmark and print a table and a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=100, help="model size in MiB (default 100)")
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 4, 8], help="peer counts")
    parser.add_argument("--seconds", type=float, default=15.0, help="gossip time per run")
    args = parser.parse_args()
    nbytes = int(args.mib * MiB) // 4 * 4
    rows = []
    for transport in ("auto", "tcp"):
        for peers in args.peers:
            print(f"measuring {peers} peers, transport {transport} ...", flush=True)
            rows.append(
                {
                    "transport": transport,
                    "peers": peers,
                    **measure(peers, nbytes, args.seconds, transport),
                }
            )
    print(f"\nmemory beyond a {args.mib:g} MiB model, one node, pull probability 1")
    header = ("transport", "peers", "private MiB", "shm MiB", "overhead", "pulls")
    print("".join(f"{h:>{w}}" for h, w in zip(header, (10, 7, 13, 9, 10, 7), strict=True)))
    for row in rows:
        print(
            f"{row['transport']:>10}{row['peers']:>7}{row['private'] / MiB:>13.1f}"
            f"{row['shm'] / MiB:>9.1f}{row['overhead']:>9.2f}x{row['pulls_ok']:>7}"
        )
    print(json.dumps({"benchmark": "memory", "mib": args.mib, "rows": rows}))


if __name__ == "__main__":
    main()
