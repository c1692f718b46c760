"""Soak test: many node processes gossip at the highest pull rate for a while; nothing degrades.

Starts ``--nodes`` processes (default 16) on 127.0.0.1, each a :class:`dpwa_core.Node` with a
small model (``--size`` float32 values, default 10 000) and ``pull_probability: 1``. Each
process trains a stand-in step and gossips without pause for ``--seconds`` (default 60), after a
warm-up that is not counted, and reports: pulls completed, failed and timed out, the largest
``update_wait`` time, and its resident memory at the start and at the end of the measured run.

Targets: no deadlock (every process finishes and reports), no process's memory growing by more
than 10 %, and at least 99 % of pulls succeeding (every peer is alive throughout the measured
run: a node that has finished measuring keeps serving until all have).

Run by hand: ``python benchmarks/soak.py [--nodes 16] [--seconds 60]``. Prints a table and one
JSON line; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _ports import free_ports

MiB = 1024 * 1024


def rss_bytes() -> int:
    """This process's resident memory."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - Linux fallback
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    """One node: warm up, gossip for ``args.seconds``, write NAME.json into ``args.workdir``."""
    from dpwa_core.layout import Layout
    from dpwa_core.node import Node

    workdir = Path(args.workdir)
    name = args.worker
    rng = np.random.default_rng(int(name.lstrip("w")))
    params = rng.normal(0, 1, args.size).astype(np.float32)
    with Node(workdir / "cluster.yaml", name, layout=Layout.flat(args.size)) as node:
        node.update_send(params, 1.0)
        node.wait_for_peers(timeout=120)
        (workdir / f"{name}.up").touch()
        while not (workdir / "go").exists():
            node.update_wait(1.0)
            node.update_send(params, 1.0)
            time.sleep(0.01)

        def step() -> float:
            params[:] *= np.float32(0.9999)  # a stand-in for a training step
            node.update_send(params, 1.0)
            start = time.perf_counter()
            result = node.update_wait(1.0)
            waited = time.perf_counter() - start
            if result is not None:
                result.blend_into(params)
            return waited

        warm_end = time.monotonic() + args.warmup
        while time.monotonic() < warm_end:
            step()
        before = node.stats()
        rss_start = rss_bytes()
        end = time.monotonic() + args.seconds
        slowest = 0.0
        rounds = 0
        while time.monotonic() < end:
            slowest = max(slowest, step())
            rounds += 1
        after = node.stats()
        rss_end = rss_bytes()
        report = {
            "name": name,
            "rounds": rounds,
            **{k: after[k] - before[k] for k in ("pulls_ok", "pulls_failed", "pulls_timed_out")},
            "served": after["pulls_served"] - before["pulls_served"],
            "rejected_nonfinite": after["rejected_nonfinite"],
            "max_wait_ms": slowest * 1000,
            "rss_start_mb": rss_start / MiB,
            "rss_end_mb": rss_end / MiB,
            "finite": bool(np.isfinite(params).all()),
            "peers": {
                peer: {
                    k: counts[k] - before["peers"][peer][k] for k in ("ok", "failed", "timed_out")
                }
                for peer, counts in after["peers"].items()
            },
        }
        (workdir / f"{name}.json").write_text(json.dumps(report))
        # Keep serving until every node has finished measuring: none sees a peer leave early.
        while not (workdir / "exit").exists():
            step()


def wait_for(paths: list[Path], procs: dict[str, subprocess.Popen[bytes]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        for name, proc in procs.items():
            if proc.poll() is not None and not (paths[0].parent / f"{name}.json").exists():
                raise SystemExit(f"node {name} exited with {proc.returncode} before reporting")
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise SystemExit(f"deadlock? still waiting for {missing} after {seconds:.0f} s")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--size", type=int, default=10_000, help="float32 values per model")
    parser.add_argument("--timeout-ms", type=float, default=2500)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not counted")
    parser.add_argument(
        "--kill",
        type=int,
        default=0,
        help="SIGKILL this many nodes half-way through; the rest must carry on",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import yaml

    with tempfile.TemporaryDirectory(prefix="dpwa-soak-") as tmp:
        workdir = Path(tmp)
        names = [f"w{i + 1}" for i in range(args.nodes)]
        config = {
            "start": "own",  # single pulls are measured, not training from one model
            "nodes": [
                {"name": n, "host": "127.0.0.1", "port": p}
                for n, p in zip(names, free_ports(args.nodes), strict=True)
            ],
            "pull_probability": 1.0,
            "timeout_ms": args.timeout_ms,
            "interpolation": "constant",
            "constant": {"value": 0.5},
        }
        (workdir / "cluster.yaml").write_text(yaml.safe_dump(config))
        print(
            f"soak: {args.nodes} nodes, {args.size} float32 each, pull_probability 1, "
            f"{args.seconds:g} s measured after {args.warmup:g} s warm-up",
            flush=True,
        )
        common = [
            f"--seconds={args.seconds}",
            f"--size={args.size}",
            f"--warmup={args.warmup}",
            f"--workdir={workdir}",
        ]
        procs = {
            n: subprocess.Popen([sys.executable, __file__, f"--worker={n}", *common]) for n in names
        }
        try:
            wait_for([workdir / f"{n}.up" for n in names], procs, 180)
            print("all nodes up; measuring ...", flush=True)
            (workdir / "go").touch()
            killed = names[len(names) - args.kill :] if args.kill else []
            if killed:
                time.sleep(args.warmup + args.seconds / 2)
                for name in killed:
                    procs.pop(name).kill()
                print(f"killed {', '.join(killed)} half-way", flush=True)
            survivors = [n for n in names if n not in killed]
            wait_for(
                [workdir / f"{n}.json" for n in survivors],
                procs,
                args.warmup + args.seconds + 120,
            )
            (workdir / "exit").touch()
            for proc in procs.values():
                proc.wait(timeout=30)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
        reports = [json.loads((workdir / f"{n}.json").read_text()) for n in survivors]
    summarize(args, reports, killed)


def summarize(args: argparse.Namespace, reports: list[dict[str, Any]], killed: list[str]) -> None:
    print(
        f"{'node':>5} {'rounds':>7} {'ok':>7} {'failed':>7} {'timeout':>7} {'max wait ms':>11} "
        f"{'RSS start MB':>12} {'RSS end MB':>10} {'growth %':>8}"
    )
    for r in reports:
        r["growth_pct"] = 100 * (r["rss_end_mb"] / r["rss_start_mb"] - 1)
        print(
            f"{r['name']:>5} {r['rounds']:>7} {r['pulls_ok']:>7} {r['pulls_failed']:>7} "
            f"{r['pulls_timed_out']:>7} {r['max_wait_ms']:>11.1f} {r['rss_start_mb']:>12.1f} "
            f"{r['rss_end_mb']:>10.1f} {r['growth_pct']:>8.2f}"
        )
    ok = sum(r["pulls_ok"] for r in reports)
    failed = sum(r["pulls_failed"] for r in reports)
    timed_out = sum(r["pulls_timed_out"] for r in reports)
    live = [counts for r in reports for peer, counts in r["peers"].items() if peer not in killed]
    live_ok = sum(c["ok"] for c in live)
    live_total = sum(c["ok"] + c["failed"] + c["timed_out"] for c in live)
    success = live_ok / live_total if live_total else 0.0
    dead = [c for r in reports for p, c in r["peers"].items() if p in killed]
    dead_ok = sum(c["ok"] for c in dead)
    dead_failed = sum(c["failed"] + c["timed_out"] for c in dead)
    growth = max(r["growth_pct"] for r in reports)
    slowest = max(r["max_wait_ms"] for r in reports)
    targets = {
        "no_deadlock": True,  # every node reported, or main() exited before here
        "memory_growth_under_10pct": growth < 10,
        "live_peer_success_at_least_99pct": success >= 0.99,
        "update_wait_within_timeout": slowest <= args.timeout_ms + 1000,
        "all_finite": all(r["finite"] for r in reports),
    }
    dead_text = f"killed peers: {dead_ok} ok before the kill, {dead_failed} failed; "
    print(
        f"total: {ok} pulls ok, {failed} failed, {timed_out} timed out; pulls to live peers "
        f"{100 * success:.3f} % ok; {dead_text if killed else ''}"
        f"largest update_wait {slowest:.1f} ms (timeout {args.timeout_ms:g} ms); "
        f"largest RSS growth {growth:.2f} %"
    )
    for target, met in targets.items():
        print(f"  {'PASS' if met else 'MISS'} {target}")
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "nodes": args.nodes,
                "seconds": args.seconds,
                "size": args.size,
                "cpus": os.cpu_count(),
                "pulls_ok": ok,
                "pulls_failed": failed,
                "pulls_timed_out": timed_out,
                "success_to_live_peers": success,
                "killed": killed,
                "killed_peers_ok": dead_ok,
                "killed_peers_failed": dead_failed,
                "max_update_wait_ms": slowest,
                "max_rss_growth_pct": growth,
                "targets": targets,
                "nodes_detail": reports,
            }
        )
    )
    if not all(targets.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
