"""dpwa between lab hosts: real namespaces, tbf-shaped links, a private /dev/shm per host.

The mechanisms a slow link exposes: a pull runs under many training steps instead of blocking
one; ``transport: auto`` finds no shared memory between hosts and pulls over TCP; the shared
start gives every host the first node's model and never spreads a joiner's own weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

WORKER = Path(__file__).parent / "workers" / "lab_node.py"


def test_pulls_run_under_many_steps_over_a_shaped_link(
    lab: Callable[..., Any], tmp_path: Path
) -> None:
    net = lab(rates_mbit=[20, 20])
    config = {
        "nodes": [
            {"name": f"w{i + 1}", "host": host.ip, "port": 47100 + i}
            for i, host in enumerate(net.hosts)
        ],
        "timeout_ms": 2500,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    size = 2_000_000  # 2 MB as int8 (wire_dtype auto, between hosts): 0.8 s at 20 Mbit/s
    runs = [(0, "w1", 1.0), (1, "w2", 100.0)]
    procs = []
    for index, name, value in runs:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        argv = [sys.executable, str(WORKER), str(path), name, str(value), str(size), "6"]
        argv.append(str(tmp_path / f"{name}.json"))
        procs.append((net.spawn(index, argv, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait(timeout=90)
        log.close()
    out = {}
    for _, name, _ in runs:
        logs = (tmp_path / f"{name}.log").read_text()
        assert (tmp_path / f"{name}.json").exists(), logs
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for name, got in out.items():
        stats = got["stats"]
        assert stats["joined_from"] == "w1", (name, stats)
        assert got["values"] == [1.0], (name, got["values"])  # w2's own start never spread
        assert stats["pulls_ok"] >= 1, (name, stats)
        # Other hosts: the peer's one shared-memory offer fails to attach, then TCP only.
        assert stats["pulls_shm"] == 0 and stats["served_shm"] <= 1, stats
        # Between hosts `wire_dtype: auto` sends int8: about 1 byte per value, not float32's 4
        # (bytes_in also counts the join copy and a pull that landed after the last step).
        assert stats["bytes_in"] < 2 * size * (stats["pulls_ok"] + 2), stats
        # The training thread waited only to join (its first step), never for a pull.
        assert stats["blocked_s"] == stats["join_s"], stats
        # The pull ran under many steps: requested, then blended dozens of steps later.
        assert max(p["behind"] for p in got["pulls"]) >= 10, got["pulls"]
