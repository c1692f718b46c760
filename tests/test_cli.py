"""The ``dpwa`` command: plugins, check, --version, and usage errors."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from dpwa_core.cli import main

SEED = Path(__file__).parent / "data" / "seed_config.yaml"
VERSION = importlib.metadata.version("dpwa")


@pytest.fixture(autouse=True)
def no_node_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPWA_NODE", raising=False)


def test_plugins_prints_an_aligned_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "DESCRIPTION"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["constant"].split("  ")[0] == "constant"
    assert f"dpwa {VERSION} (dpwa_interpolation.constant)" in rows["constant"]
    assert "Take a fixed fraction of the peer's model" in rows["constant"]
    # Aligned: every column starts at the same offset on every line.
    for header in ("SOURCE", "DESCRIPTION"):
        column = lines[0].index(header)
        for line in lines[1:]:
            assert line[column - 2 : column] == "  " and line[column] != " ", line


def test_check_summarizes_a_good_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(SEED)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{SEED}: OK (4 nodes)")
    assert "w1 localhost:45000" in out and "w4 localhost:45003" in out
    assert "constant (value=0.5)" in out
    assert "divergence_threshold  0.2" in out
    assert "this node" not in out


def test_check_with_a_node_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["check", str(SEED), "--name", "w2"]) == 0
    assert "this node             w2, peers: w1, w3, w4" in capsys.readouterr().out
    monkeypatch.setenv("DPWA_NODE", "w3")
    assert main(["check", str(SEED)]) == 0
    assert "w3, peers: w1, w2, w4" in capsys.readouterr().out


def test_check_reports_an_unknown_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(SEED), "--name", "w9"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no node named 'w9'" in captured.err and "w1, w2, w3, w4" in captured.err


def test_check_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SEED.read_text().replace("timeout_ms: 2500", "timeout_ms: -1"))
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dpwa: error: {bad}: key 'timeout_ms' must be")
    assert "Traceback" not in err
    assert main(["check", str(tmp_path / "missing.yaml")]) == 1
    assert "not found" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dpwa {VERSION}"


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "plugins" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["check"]) == 2
    assert "CONFIG" in capsys.readouterr().err


def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dpwa_core.cli", "check", str(SEED), "--name", "w1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "OK (4 nodes)" in result.stdout
