"""Every example runs, and shows what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cluster

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_two_nodes_learn_together(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(cluster(2)))
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "two_nodes.py"), "--config", str(config), "--steps", "100"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("w1", "w2"):
        last = [line for line in run.stdout.splitlines() if line.startswith(f"[{name}] step  100")]
        assert last, run.stdout
        pulls_ok = int(re.search(r"pulls ok (\d+)", last[0]).group(1))  # type: ignore[union-attr]
        error = float(re.search(r"\|w - w\*\| ([0-9.]+)", last[0]).group(1))  # type: ignore[union-attr]
        assert pulls_ok > 0, last[0]  # the nodes really gossiped
        assert error < 0.5, last[0]  # and learned the model
    assert "both nodes finished" in run.stdout
