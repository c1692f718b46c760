"""A PyTorch node, a Keras node and a JAX node train one MLP and reach consensus on loopback.

Three real processes (tests/workers/mixed_worker.py), one per framework, each with its own data
and initial weights. They train with gossip, then only average; their flat parameter vectors
(the canonical layout) must agree at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cluster, spread, wait_files

WORKER = Path(__file__).parent / "workers" / "mixed_worker.py"
FRAMEWORKS = {"w1": "torch", "w2": "keras", "w3": "jax"}
TRAIN_STEPS = 30


def test_torch_keras_and_jax_nodes_reach_consensus(tmp_path: Path) -> None:
    for module in ("torch", "keras", "tensorflow", "jax", "flax", "optax"):
        pytest.importorskip(module)
    config = cluster(3, timeout_ms=3000)
    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    names = list(FRAMEWORKS)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(WORKER), str(config_path), str(tmp_path), kind, str(TRAIN_STEPS)],
            env={**env, "DPWA_NODE": name},
        )
        for name, kind in FRAMEWORKS.items()
    }
    try:
        wait_files(tmp_path, [f"{n}.done" for n in names], procs, 300)  # 3 framework imports
        (tmp_path / "settle").touch()
        wait_files(tmp_path, [f"{n}.settled" for n in names], procs)
        (tmp_path / "stop").touch()
        wait_files(tmp_path, [f"{n}.json" for n in names], procs)
        (tmp_path / "exit").touch()
        for name, proc in procs.items():
            assert proc.wait(timeout=60) == 0, f"{name} exited with {proc.returncode}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()

    layouts = {n: json.loads((tmp_path / f"{n}.layout.json").read_text()) for n in names}
    assert layouts["w1"] == layouts["w2"] == layouts["w3"] == [[10, 16], [16], [16, 3], [3]]
    init = np.stack([np.load(tmp_path / f"{n}.init.npy") for n in names])
    final = np.stack([np.load(tmp_path / f"{n}.final.npy") for n in names])
    stats = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}
    for name, s in stats.items():
        assert s["pulls_ok"] >= 20, f"{name} ({FRAMEWORKS[name]}): {s}"
        assert s["pulls_served"] >= 5, f"{name} ({FRAMEWORKS[name]}): {s}"
        assert s["rejected"] == 0, f"{name}: a peer's layout was refused: {s}"
    assert spread(init) > 1.0, spread(init)  # the three started far apart
    assert spread(final) < spread(init) / 100, (spread(init), spread(final))
    assert not np.allclose(final.mean(axis=0), init.mean(axis=0), atol=1e-3)  # they trained
