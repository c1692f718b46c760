"""Gossip on Ray against the same nodes as plain processes: pull rate, pull time, recovery.

Runs one exchange twice, side by side on this machine:

* **plain**: ``--nodes`` node processes started here from a config on 127.0.0.1 (what
  ``dpwa launch`` does). At ``--kill-at`` seconds, node w2 is killed with SIGKILL and started
  again at once, as a supervisor would.
* **ray**: the same nodes placed by ``dpwa_core.ray.run`` on a local Ray instance. At the same
  moment w2's actor process is killed with SIGKILL and Ray restarts it.

Each node publishes a ``--mib`` MiB vector and pulls from a random peer without pause for
``--seconds``. Reported per mode: successful pulls per second per node, median pull time, the
start-up time (from starting the nodes until every node but w2 is ready to gossip), and the
recovery time: from the kill to the start of the first successful pull from the restarted w2
by another node. The plain mode is
the reference: Ray's data path is the same TCP or shared-memory pull, so the pull figures should
match, and the recovery time shows what Ray's restart machinery costs over a bare restart.

Run by hand: ``python benchmarks/ray_cluster.py [--nodes 3] [--seconds 12] [--mib 4]``. Needs
``pip install 'dpwa[ray]'``. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

# Keep Ray on 127.0.0.1 and quiet before it is imported; the benchmark uses no other address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from _ports import free_ports

from dpwa_core.node import Node

MiB = 1024 * 1024
VICTIM = "w2"


def exchange(node: Node, folder: Path, seconds: float, size: int) -> dict[str, Any]:
    """From the run's start, publish and pull without pause for ``seconds``; log each pull.

    Writes FOLDER/NAME.pid first (so the driver can kill this incarnation). Returns when the
    node was ready, when each successful pull started (wall clock, per peer), and how long
    each took.
    """
    ready = time.time()
    (folder / f"{node.name}.pid").write_text(str(os.getpid()))
    start = float((folder / "start").read_text())
    time.sleep(max(0.0, start - time.time()))
    params = np.full(size, 1.0, np.float32)
    pulls: dict[str, list[float]] = {}
    durations: list[float] = []
    while time.time() < start + seconds:
        node.update_send(params, 1.0)
        result = node.update_wait(1.0)
        if result is not None:
            pulls.setdefault(result.peer, []).append(time.time() - result.elapsed)
            durations.append(result.elapsed)
            result.blend_into(params)
        else:
            time.sleep(0.001)  # a peer down: don't spin
    return {"name": node.name, "ready": ready, "pulls": pulls, "durations": durations}


def ray_node(ctx: Any, folder: str, seconds: float, size: int) -> dict[str, Any]:
    """The exchange as a ``dpwa_core.ray`` training function."""
    with ctx.node(seed=ctx.rank) as node:
        node.wait_for_peers(timeout=60)
        return exchange(node, Path(folder), seconds, size)


def kill_victim_at(folder: Path, when: float, restart: Any = None) -> threading.Thread:
    """In a thread: at wall-clock ``when``, SIGKILL the victim's current pid; then ``restart()``."""

    def run() -> None:
        time.sleep(max(0.0, when - time.time()))
        pid = int((folder / f"{VICTIM}.pid").read_text())
        (folder / "killed").write_text(repr(time.time()))
        os.kill(pid, signal.SIGKILL)
        if restart is not None:
            restart()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def summarize(results: list[dict[str, Any]], folder: Path, seconds: float) -> dict[str, Any]:
    launched = float((folder / "launched").read_text())
    killed = float((folder / "killed").read_text())
    durations = [d for r in results for d in r["durations"]]
    total = sum(len(times) for r in results for times in r["pulls"].values())
    back = [
        t for r in results if r["name"] != VICTIM for t in r["pulls"].get(VICTIM, []) if t > killed
    ]
    return {
        "pulls_per_s_per_node": total / seconds / len(results),
        "median_pull_ms": 1000 * statistics.median(durations) if durations else float("nan"),
        "start_up_s": max(r["ready"] for r in results if r["name"] != VICTIM) - launched,
        "recovery_s": (min(back) - killed) if back else float("nan"),
    }


def run_plain(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    names = [f"w{i + 1}" for i in range(args.nodes)]
    ports = free_ports(args.nodes)
    config = folder / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "nodes": [
                    {"name": n, "host": "127.0.0.1", "port": p}
                    for n, p in zip(names, ports, strict=True)
                ],
                "timeout_ms": 1000,
                "start": "own",  # pulls and restarts are measured, not training from one model
            }
        )
    )
    start = time.time() + 3.0  # every process is up by then
    (folder / "start").write_text(repr(start))
    (folder / "launched").write_text(repr(time.time()))

    def spawn(name: str) -> subprocess.Popen[str]:
        argv = [sys.executable, __file__, "--node", name, "--config", str(config)]
        argv += ["--folder", str(folder), "--seconds", str(args.seconds), "--mib", str(args.mib)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

    procs = {name: spawn(name) for name in names}
    restarted: list[subprocess.Popen[str]] = []
    killer = kill_victim_at(
        folder, start + args.kill_at, restart=lambda: restarted.append(spawn(VICTIM))
    )
    results = []
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=args.seconds + 120)
        if name != VICTIM:
            results.append(json.loads(out.strip().splitlines()[-1]))
    killer.join()
    out, _ = restarted[0].communicate(timeout=args.seconds + 120)
    results.append(json.loads(out.strip().splitlines()[-1]))
    return summarize(results, folder, args.seconds)


def run_ray(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import ray

    import dpwa_core.ray

    started = time.time()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    init_s = time.time() - started
    start = time.time() + 8.0  # placing the actors and importing takes a few seconds
    (folder / "start").write_text(repr(start))
    (folder / "launched").write_text(repr(time.time()))
    kill_victim_at(folder, start + args.kill_at)
    try:
        results = dpwa_core.ray.run(
            partial(ray_node, folder=str(folder), seconds=args.seconds, size=args.size),
            num_nodes=args.nodes,
            config={"timeout_ms": 1000},
            resources_per_node={"CPU": min(1.0, (os.cpu_count() or 1) / args.nodes)},
            max_restarts=1,
            verbose=False,
        )
    finally:
        ray.shutdown()
    return {**summarize(results, folder, args.seconds), "ray_init_s": init_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="nodes per mode (default: 3)")
    parser.add_argument("--seconds", type=float, default=12.0, help="exchange time (default: 12)")
    parser.add_argument("--kill-at", type=float, default=4.0, help="kill w2 after (default: 4 s)")
    parser.add_argument("--mib", type=float, default=4.0, help="vector size (default: 4 MiB)")
    parser.add_argument("--node", help=argparse.SUPPRESS)  # a plain-mode node process
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = int(args.mib * MiB) // 4
    if args.node:  # one node of the plain mode
        with Node(args.config, args.node, seed=int(args.node[1:])) as node:
            result = exchange(node, Path(args.folder), args.seconds, args.size)
        print(json.dumps(result), flush=True)
        return

    rows = {}
    for mode, runner in (("plain", run_plain), ("ray", run_ray)):
        with tempfile.TemporaryDirectory(prefix=f"dpwa-bench-{mode}-") as folder:
            print(f"running {mode}: {args.nodes} nodes, {args.seconds:g} s ...", file=sys.stderr)
            rows[mode] = runner(args, Path(folder))
    print(
        f"\n{args.nodes} nodes, {args.mib:g} MiB, {args.seconds:g} s, "
        f"{VICTIM} killed at {args.kill_at:g} s\n"
    )
    print(f"{'mode':6} {'pulls/s/node':>13} {'median pull':>12} {'start-up':>9} {'recovery':>9}")
    for mode, row in rows.items():
        print(
            f"{mode:6} {row['pulls_per_s_per_node']:>13.1f} {row['median_pull_ms']:>10.2f}ms "
            f"{row['start_up_s']:>8.2f}s {row['recovery_s']:>8.2f}s"
        )
    print(f"(ray.init took {rows['ray']['ray_init_s']:.2f} s, not counted above)")
    print(json.dumps({"benchmark": "ray_cluster", "nodes": args.nodes, "mib": args.mib, **rows}))


if __name__ == "__main__":
    main()
