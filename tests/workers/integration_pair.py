"""Run one example script as two real node processes and read what each saved.

Used by tests/test_integrations_*.py: each example takes ``--config``, ``--name`` and ``--save
DIR`` and writes DIR/NAME.npz with its starting and final parameters and its pull count.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def run_pair(
    script: Path, config: dict[str, Any], folder: Path, *options: str, timeout: float = 150
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """Start one process per node of ``config`` running ``script``; wait for all of them.

    Returns:
        Each node's saved arrays (``start``, ``final``, ``pulls_ok``) and its stdout.
    """
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    save = folder / "saved"
    names = [node["name"] for node in config["nodes"]]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(script),
                "--config",
                str(path),
                "--name",
                name,
                "--save",
                str(save),
            ]
            + list(options),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in names
    }
    outputs: dict[str, str] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{out}\n{err}"
            outputs[name] = out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    saved = {}
    for name in names:
        with np.load(save / f"{name}.npz") as data:
            saved[name] = {key: data[key] for key in data.files}
    return saved, outputs


def assert_gossiped(saved: dict[str, dict[str, np.ndarray]]) -> None:
    """Each node pulled, and the nodes ended closer to each other than they started."""
    (a, b) = saved.values()
    for name, data in saved.items():
        assert int(data["pulls_ok"]) > 0, f"{name} never pulled"
    start = float(np.linalg.norm(a["start"] - b["start"]))
    final = float(np.linalg.norm(a["final"] - b["final"]))
    assert start > 0, "the nodes started from the same weights: nothing to show"
    assert final < start, (start, final)
