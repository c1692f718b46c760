"""SIGINT and SIGTERM end a training process within about a second, with sockets closed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dpwa_core.layout import Layout
from dpwa_core.node import Node

Cluster = Callable[..., dict[str, Any]]
WORKER = Path(__file__).parent / "workers" / "train_worker.py"
BOUND = 2.0  # seconds from the signal to the exit: about one, doubled for a loaded machine


@pytest.mark.parametrize(
    ("sig", "mode"),
    [
        (signal.SIGTERM, "with"),
        (signal.SIGTERM, "bare"),
        (signal.SIGINT, "with"),
        (signal.SIGINT, "bare"),
    ],
)
def test_a_signal_ends_training_promptly_and_frees_everything(
    make_cluster: Cluster, tmp_path: Path, sig: signal.Signals, mode: str
) -> None:
    config = make_cluster(2, timeout_ms=1000)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    ready = tmp_path / "ready"
    port = config["nodes"][1]["port"]
    with Node(config, "w1", layout=Layout.flat(1000)) as peer:
        peer.update_send(np.ones(1000, np.float32), 1.0)
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(path), "w2", str(ready), mode],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the worker never pulled"
                time.sleep(0.02)
            # The worker is pulling from us; let it serve us too, so both sides hold sockets.
            for _ in range(20):
                peer.update_send(np.ones(1000, np.float32), 1.0)
                peer.update_wait(1.0)
            assert peer.stats()["connections"] >= 1
            start = time.monotonic()
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=30)
            elapsed = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -sig, stderr  # died of the signal, as without dpwa
        assert elapsed < BOUND, f"exit took {elapsed:.2f} s"
        assert "w2 closed" in stderr  # the node was closed, not just abandoned
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in stderr  # Ctrl+C is not swallowed
        socket.create_server(("127.0.0.1", port)).close()  # the port is free
        deadline = time.monotonic() + 5
        while peer.stats()["connections"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert peer.stats()["connections"] == 0  # its connection to us was closed


def test_a_users_own_sigterm_handler_is_left_alone(make_cluster: Cluster) -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with Node(make_cluster(1), "w1"):
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler) and handler.__module__ == __name__
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_that_gets_sigterm_leaves_the_parents_node_alone(
    make_cluster: Cluster, tmp_path: Path
) -> None:
    """Data-loader workers are forked and may be terminated; the parent's sockets survive.

    Runs in a fresh interpreter: this pytest process may hold framework threads (JAX's) that
    make forking it unsafe.
    """
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(make_cluster(2)))
    worker = Path(__file__).parent / "workers" / "fork_worker.py"
    done = subprocess.run(
        [sys.executable, str(worker), str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
