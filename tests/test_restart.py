"""A node killed with SIGKILL and restarted under its name catches up; the others do not suffer.

Four real node processes (tests/workers/restart_node.py) learn the digits by gossip with Adam.
Once every node has trained 300 steps, w3 is killed with SIGKILL and started again under the same
name, from fresh random weights and a fresh optimizer. With ``start: shared`` (the default) it
serves nothing until it has copied a peer's model and, through ``connect(optimizer=...)``, that
peer's Adam state, so it never drags the others back and does not start cold.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import cluster

WORKER = Path(__file__).parent / "workers" / "restart_node.py"
NAMES = ["w1", "w2", "w3", "w4"]
VICTIM = "w3"
WINDOW = 5  # evaluations (every 10 steps) averaged, so one noisy batch is not a fall


def evaluations(folder: Path, name: str) -> list[tuple[int, int, float, float]]:
    """(run, step, accuracy, time) of every line ``name`` logged so far."""
    path = folder / f"{name}.log"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        run, step, accuracy, at = line.split()
        rows.append((int(run), int(step), float(accuracy), float(at)))
    return rows


def smoothed(rows: list[tuple[int, int, float, float]]) -> list[tuple[float, float]]:
    """(time, mean accuracy of the last WINDOW evaluations) after each evaluation."""
    return [
        (rows[i][3], sum(r[2] for r in rows[i - WINDOW + 1 : i + 1]) / WINDOW)
        for i in range(WINDOW - 1, len(rows))
    ]


def wait_for(condition: object, procs: dict[str, subprocess.Popen[bytes]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        for name, proc in procs.items():
            assert proc.poll() is None or name == VICTIM, f"{name} exited {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_restarted_node_catches_up_and_drags_no_one_back(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(cluster(4, start="shared", timeout_ms=2000)))

    def start(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(config), name, str(tmp_path)],
            stderr=(tmp_path / f"{name}.err").open("ab"),
        )

    procs = {name: start(name) for name in NAMES}
    try:
        wait_for(
            lambda: all((rows := evaluations(tmp_path, n)) and rows[-1][1] >= 300 for n in NAMES),
            procs,
            180,
        )
        procs[VICTIM].send_signal(signal.SIGKILL)
        procs[VICTIM].wait(10)
        killed_at = time.time()
        before = {n: smoothed(evaluations(tmp_path, n))[-1][1] for n in NAMES if n != VICTIM}
        procs[VICTIM] = start(VICTIM)
        wait_for(
            lambda: any(r[0] == 1 and r[1] >= 100 for r in evaluations(tmp_path, VICTIM)),
            procs,
            120,
        )
        (tmp_path / "stop").touch()
        for name, proc in procs.items():
            assert proc.wait(60) == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    stats = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in NAMES}
    errors = (tmp_path / f"{VICTIM}.err").read_text()
    # The mechanism: the restarted node copied a live peer's model and that peer's Adam state.
    sponsor = stats[VICTIM]["joined_from"]
    assert sponsor in NAMES and sponsor != VICTIM, errors[-3000:]
    assert stats[VICTIM]["optimizer_state_from"] == sponsor, errors[-3000:]
    assert stats[sponsor]["served_state"] >= 1
    # From the restart on, no other node's accuracy fell by more than 2 points.
    for name, accuracy in before.items():
        after = [acc for at, acc in smoothed(evaluations(tmp_path, name)) if at > killed_at]
        assert after and min(after) >= accuracy - 0.02, (name, accuracy, after)
    # 50 steps after its restart, the restarted node is within 2 points of the others.
    restarted = [r for r in evaluations(tmp_path, VICTIM) if r[0] == 1]
    at_50 = next(r for r in restarted if r[1] == 50)
    others = []
    for name in before:
        rows = [r for r in evaluations(tmp_path, name) if r[3] <= at_50[3]][-WINDOW:]
        others.append(sum(r[2] for r in rows) / len(rows))
    mean_others = sum(others) / len(others)
    assert at_50[2] >= mean_others - 0.02, (at_50, others)
