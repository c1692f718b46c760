"""Floods from hostile peers, against real node processes: memory, logs and connection slots.

A peer that answers every pull with a different bad answer must leave the victim's memory and
log bounded and its log free of forged lines and control characters. Hundreds of connections
that each hold a started request must not keep honest peers from their pulls.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

Cluster = Callable[..., dict[str, Any]]
WORKERS = Path(__file__).parent / "workers"
PULLS = 3000


def test_thousands_of_distinct_bad_answers_leave_memory_and_log_bounded(
    make_cluster: Cluster, tmp_path: Path
) -> None:
    config = make_cluster(2, timeout_ms=1000, transport="tcp")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    port = config["nodes"][1]["port"]
    hostile = subprocess.Popen([sys.executable, str(WORKERS / "bad_answers.py"), str(port)])
    try:
        time.sleep(0.5)  # let it listen
        out = tmp_path / "victim.json"
        done = subprocess.run(
            [
                sys.executable,
                str(WORKERS / "flood_victim.py"),
                str(path),
                "w1",
                str(PULLS),
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        hostile.kill()
        hostile.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    stats = record["stats"]
    # The flood really happened: thousands of answers were refused, none accepted.
    assert stats["pulls_failed"] >= PULLS * 0.9 and stats["pulls_ok"] == 0
    lines = done.stderr.splitlines()
    # Bounded log: one line per kind of refusal, not one per answer (3000 here).
    assert len(lines) < 50, "\n".join(lines[:60])
    assert len(done.stderr) < 50_000
    # Peer text is escaped and cut: no control characters, no forged line of its own.
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", done.stderr)
    assert all(line.split(" ", 1)[0] in ("INFO", "WARNING") for line in lines), lines
    assert "\\x1b[31m" in done.stderr  # the escapes were shown, escaped
    # Bounded memory: 3000 distinct 64 KiB texts would be 190 MiB if any were kept.
    start, end = record["rss"]
    assert end - start < 40 * 2**20, f"RSS grew by {(end - start) / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    ("with_auth", "source", "mode"),
    [
        (False, "127.0.0.1", "stall"),
        (True, "127.0.0.1", "stall"),
        (False, "127.0.0.2", "stall"),
        (True, "127.0.1.1+400", "silent"),
    ],
    ids=["plain-same-host", "auth-same-host", "plain-other-host", "auth-400-hosts-silent"],
)
def test_stalled_requests_cannot_keep_honest_peers_from_their_pulls(
    make_cluster: Cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    with_auth: bool,
    source: str,
    mode: str,
) -> None:
    options: dict[str, Any] = {"timeout_ms": 1000, "transport": "tcp", "robust": {"clip": False}}
    if with_auth:
        monkeypatch.setenv("DPWA_SECRET", "flood-test-secret")
        options["auth"] = {"secret_env": "DPWA_SECRET"}
    config = make_cluster(3, **options)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    seconds = 6.0
    nodes = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(WORKERS / "recording_node.py"),
                str(path),
                name,
                "1.0",
                str(seconds + 30),
                str(tmp_path / f"{name}.json"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("w1", "w2", "w3")
    }
    port = config["nodes"][0]["port"]
    claimed = ["w2", "w1"] if with_auth and mode == "stall" else []
    count = 400 if "+" in source else 300
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"{n}.json.pulled").exists() for n in nodes):
            assert time.monotonic() < deadline, "the nodes never pulled from each other"
            assert all(p.poll() is None for p in nodes.values()), "a node died"
            time.sleep(0.05)
        flood = subprocess.run(
            [
                sys.executable,
                str(WORKERS / "slot_flood.py"),
                "127.0.0.1",
                str(port),
                source,
                str(count),
                str(seconds),
                "64",
                mode,
                *claimed,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    finally:
        for name in nodes:
            (tmp_path / f"{name}.json.stop").touch()
        logs = {name: proc.communicate(timeout=30)[1] for name, proc in nodes.items()}
    assert flood.returncode == 0, flood.stderr[-2000:]
    assert int(flood.stdout) >= count  # every attacking connection was made at least once
    for name in ("w2", "w3"):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        w1 = record["stats"]["peers"]["w1"]
        tried = w1["ok"] + w1["failed"] + w1["timed_out"]
        print(f"{name}: {w1['ok']} of {tried} pulls from w1 ok during the flood")
        assert tried >= 20, (name, w1, logs[name][-2000:])
        assert w1["ok"] / tried >= 0.9, (name, w1, logs[name][-2000:])
