"""Shared fixtures: free loopback ports and small cluster configs."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

from dpwa_core.launchers import LAUNCHERS

# Property tests bound correctness, never time: on a loaded 2-core CI machine one example can
# take longer than hypothesis's default 200 ms deadline, which it reports as a failure.
settings.register_profile("dpwa", deadline=None)
settings.load_profile("dpwa")


def free_ports(count: int) -> list[int]:
    """Ports that were free on 127.0.0.1 a moment ago (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster(count: int, **options: Any) -> dict[str, Any]:
    """A config mapping for ``count`` nodes w1..wN on 127.0.0.1, with ``options`` on top."""
    ports = free_ports(count)
    config: dict[str, Any] = {
        "nodes": [
            {"name": f"w{i + 1}", "host": "127.0.0.1", "port": port} for i, port in enumerate(ports)
        ],
        "pull_probability": 1.0,
        "timeout_ms": 1000,
        "interpolation": "constant",
        "constant": {"value": 0.5},
        # Tests of single pulls keep the seed's start (every node pulled from its first step);
        # tests of the shared start (the default) ask for it with start="shared".
        "start": "own",
    }
    config.update(options)
    return config


@pytest.fixture(autouse=True)
def _no_launcher_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from no launcher rank, even when the suite itself runs under srun or
    torchrun: a rank variable would otherwise pick a node for every test that names none."""
    for launcher in LAUNCHERS:
        for var in (launcher.rank_var, launcher.size_var):
            if var is not None:
                monkeypatch.delenv(var, raising=False)


@pytest.fixture
def make_cluster() -> Callable[..., dict[str, Any]]:
    """Factory fixture: ``make_cluster(3, timeout_ms=200)`` returns a config mapping."""
    return cluster


def wait_files(
    folder: Path,
    files: list[str],
    procs: Mapping[str, subprocess.Popen[bytes]],
    seconds: float = 180.0,
) -> None:
    """Wait until every file exists in ``folder``; fail at once if a node process dies."""
    deadline = time.monotonic() + seconds
    while not all((folder / f).exists() for f in files):
        for name, proc in procs.items():
            assert proc.poll() is None, f"node {name} died with exit code {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {files}"
        time.sleep(0.05)


def spread(params: np.ndarray) -> float:
    """Largest distance of a node's parameters (one row each) to the mean of all nodes'."""
    return float(np.linalg.norm(params - params.mean(axis=0), axis=1).max())


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Factory fixture for the network lab: ``lab(rates_mbit=[20, 20])`` returns a built
    ``benchmarks.lab.Lab``, torn down after the test. Skips, with the reason, on a machine that
    cannot build one (not root, no iproute2, network namespaces forbidden)."""
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.lab import Lab, lab_available

    ok, reason = lab_available()
    if not ok:
        pytest.skip(f"network lab unavailable: {reason}")

    def build(rates_mbit: list[float] | None = None, **options: Any) -> Lab:
        options.setdefault("name", "pytest")
        made = Lab(rates_mbit=rates_mbit or [100.0, 100.0], **options)
        request.addfinalizer(made.close)
        return made

    return build
