"""The ``dpwa`` command: plugins, check, --version, and usage errors."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpwa_core.cli import main
from dpwa_core.config import Config, load_config

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
    assert "transport             auto" in out and "wire_dtype            auto" in out
    assert "auth                  off" in out and "tls                   off" in out
    assert "this node" not in out


def test_check_shows_where_the_secret_comes_from_never_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLI_TEST_SECRET", "hunter2-very-secret")
    path = tmp_path / "cluster.yaml"
    nodes = [{"name": "w1", "host": "127.0.0.1", "port": 45000}]
    path.write_text(yaml.safe_dump({"nodes": nodes, "auth": {"secret_env": "CLI_TEST_SECRET"}}))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "CLI_TEST_SECRET" in out
    assert "hunter2" not in out


def test_check_with_a_node_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["check", str(SEED), "--name", "w2"]) == 0
    assert "this node             w2, peers: w1, w3, w4" in capsys.readouterr().out
    monkeypatch.setenv("DPWA_NODE", "w3")
    assert main(["check", str(SEED)]) == 0
    assert "w3 (from DPWA_NODE), peers: w1, w2, w4" in capsys.readouterr().out


def test_check_names_the_node_a_launcher_rank_picks(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert main(["check", str(SEED)]) == 0
    out = capsys.readouterr().out
    assert "this node             w3 (from SLURM_PROCID=2 (Slurm srun)), peers: w1, w2, w4" in out


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


def test_config_init_prints_a_commented_config_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "init", "--nodes", "3"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    config = load_config(path)
    assert [(n.name, n.host, n.port) for n in config.nodes] == [
        ("w1", "127.0.0.1", 45000),
        ("w2", "127.0.0.1", 45001),
        ("w3", "127.0.0.1", 45002),
    ]
    defaults = Config(nodes=config.nodes)
    assert (config.pull_probability, config.timeout_ms, config.interpolation) == (
        defaults.pull_probability,
        defaults.timeout_ms,
        defaults.interpolation,
    )
    assert config.divergence_threshold == defaults.divergence_threshold
    assert dict(config.methods["constant"]) == {"value": 0.5}
    # Every key is written out, each under a comment that explains it.
    lines = text.splitlines()
    keys = [line.split(":")[0] for line in lines if line[:1].isalpha()]
    assert keys == [
        "nodes",
        "pull_probability",
        "timeout_ms",
        "interpolation",
        "constant",
        "divergence_threshold",
        "drift_correction",
        "pull_slices",
        "peer_choice",
        "reject_nonfinite",
        "transport",
        "wire_dtype",
    ]
    assert config.reject_nonfinite == defaults.reject_nonfinite
    assert config.pull_slices == defaults.pull_slices
    assert config.peer_choice == defaults.peer_choice
    assert (config.transport, config.wire_dtype) == (defaults.transport, defaults.wire_dtype)
    for index, line in enumerate(lines):
        if line[:1].isalpha():
            assert lines[index - 1].startswith("# "), f"no comment above {line!r}"


def test_config_init_writes_a_file_and_refuses_to_overwrite_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cluster.yaml"
    args = ["config", "init", "--nodes", "2", "--host", "node1.lan", "--base-port", "50000"]
    assert main([*args, "-o", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"wrote {path}: 2 nodes" in captured.err
    config = load_config(path)
    assert [n.address for n in config.nodes] == [("node1.lan", 50000), ("node1.lan", 50001)]
    assert main(["check", str(path)]) == 0
    capsys.readouterr()

    before = path.read_text()
    assert main(["config", "init", "--nodes", "5", "-o", str(path)]) == 1
    err = capsys.readouterr().err
    assert "already exists; not overwriting it. Pass --force" in err
    assert path.read_text() == before
    assert main(["config", "init", "--nodes", "5", "-o", str(path), "--force"]) == 0
    assert len(load_config(path).nodes) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yaml"]  # no temporary left


@pytest.mark.parametrize("host", ["::1", "10.0.0.5", "123", "true", "my_node-2.cluster.local"])
def test_config_init_hosts_round_trip(host: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "init", "--nodes", "2", "--host", host]) == 0
    config = load_config(yaml.safe_load(capsys.readouterr().out))
    assert [n.host for n in config.nodes] == [host, host]


def test_config_init_spreads_nodes_over_hosts_in_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cluster.yaml"
    args = ["config", "init", "--nodes", "4", "--host", "a,b", "--base-port", "50000"]
    assert main([*args, "-o", str(path)]) == 0
    assert "wrote " in capsys.readouterr().err
    config = load_config(path)
    assert [(n.name, n.host, n.port) for n in config.nodes] == [
        ("w1", "a", 50000),
        ("w2", "a", 50001),
        ("w3", "b", 50000),
        ("w4", "b", 50001),
    ]
    header = path.read_text().splitlines()[0]
    assert header == (
        "# dpwa cluster config: 4 nodes on 2 hosts (a, b), 2 per host, ports 50000-50001 on each."
    )
    assert main(["config", "init", "--nodes", "3", "--host", "a,b,c,d"]) == 1
    assert "none on d" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes must be a whole number >= 1"),
        (["--nodes", "-3"], "--nodes must be a whole number >= 1"),
        (["--nodes", "2", "--base-port", "0"], "--base-port must be a port number 1..65535"),
        (["--nodes", "2", "--base-port", "70000"], "--base-port must be a port number 1..65535"),
        (
            ["--nodes", "10", "--base-port", "65530"],
            "10 nodes from port 65530 need ports up to 65539, past 65535. "
            "Use --base-port 65526 or lower",
        ),
        (["--nodes", "2", "--host", "bad host"], "neither an IP address nor a valid host name"),
        (["--nodes", "2", "--host", ""], "--host must be a host name or IP address"),
        (["--nodes", "2", "--host=-x.lan"], "neither an IP address nor a valid host name"),
    ],
)
def test_config_init_rejects_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    path = tmp_path / "cluster.yaml"
    assert main(["config", "init", *args, "-o", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("dpwa: error: ") and message in captured.err
    assert not path.exists()


def test_config_init_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "init"]) == 2
    assert "--nodes" in capsys.readouterr().err
    assert main(["config", "init", "--nodes", "two"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert main(["config"]) == 2
    assert "init" in capsys.readouterr().err
    assert main(["config", "init", "--nodes", "65535", "--base-port", "1"]) == 0
    assert capsys.readouterr().out.count("{name: w") == 65535
