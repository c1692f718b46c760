"""``dpwa launch``: real node processes, their output, their exit statuses and signals."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cluster

from dpwa_core.cli import main
from dpwa_core.config import load_config
from dpwa_core.launch import LaunchError, check_local, is_local_host, launch, plan

WORKERS = Path(__file__).parent / "workers"
PY = sys.executable

# Prints its name three times, once to stderr, and a last line without a newline.
ECHO = (
    "import os, sys\n"
    "name = os.environ['DPWA_NODE']\n"
    "for i in range(3):\n"
    "    print(f'line {i} of {name} argv={sys.argv[1:]}')\n"
    "print(f'{name} on stderr', file=sys.stderr)\n"
    "sys.stdout.write('no newline')\n"
)


@pytest.fixture(autouse=True)
def no_node_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPWA_NODE", raising=False)


def write_config(path: Path, count: int = 3, **options: Any) -> Path:
    path.write_text(yaml.safe_dump(cluster(count, **options)))
    return path


def run(config: Any, command: list[str], **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = launch(config, command, stdout=out, stderr=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_every_node_runs_with_its_name_and_prefixed_output(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.yaml")
    code, out, err = run(config, [PY, "-c", ECHO, "{name}", "x-{name}-y"])
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 12
    for name in ("w1", "w2", "w3"):
        mine = [line for line in lines if line.startswith(f"[{name}] ")]
        # DPWA_NODE and {name} both say the node's name; a node's lines keep their order.
        argv = f"argv=['{name}', 'x-{name}-y']"
        assert mine == [f"[{name}] line {i} of {name} {argv}" for i in range(3)] + [
            f"[{name}] no newline"
        ]
        assert f"[{name}] {name} on stderr\n" in err
        assert f"dpwa launch: {name} finished\n" in err
    assert err.rstrip().endswith("dpwa launch: all 3 nodes finished")


def test_only_starts_the_named_nodes(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.yaml")
    code, out, _ = run(config, [PY, "-c", ECHO], only="w1, w3")
    assert code == 0
    assert {line.split()[0] for line in out.splitlines()} == {"[w1]", "[w3]"}
    code, out, _ = run(config, [PY, "-c", ECHO], only=["w2"])
    assert code == 0
    assert {line.split()[0] for line in out.splitlines()} == {"[w2]"}


def test_only_rejects_unknown_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "cluster.yaml")
    with pytest.raises(LaunchError, match=r"no nodes named w4, w9 .* Known nodes: w1, w2, w3"):
        launch(config, [PY, "-c", "pass"], only="w1,w4,w9")
    with pytest.raises(LaunchError, match="names no node"):
        launch(config, [PY, "-c", "pass"], only=",")
    assert main(["launch", str(config), "--only", "w7", "--", PY, "-c", "pass"]) == 1
    err = capsys.readouterr().err
    assert "no node named w7" in err and "Known nodes: w1, w2, w3" in err


def test_cli_options_go_before_or_after_the_config(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path / "cluster.yaml"))
    code = "import os; print('env', os.environ['DPWA_NODE'])"
    # What follows -- is the node's command, even when it looks like a launcher option.
    assert main(["launch", config, "--only", "w2", "--", PY, "-c", code, "--only", "x"]) == 0
    assert capfd.readouterr().out == "[w2] env w2\n"
    assert main(["launch", "--only", "w3", config, "--", PY, "-c", code]) == 0
    assert capfd.readouterr().out == "[w3] env w3\n"
    assert main(["launch", config, "--only", "w1", PY, "-c", code]) == 2
    assert "separate the command from the options with --" in capfd.readouterr().err
    assert main(["launch", config]) == 1
    assert "no command to run. Put it after --" in capfd.readouterr().err
    assert main(["launch", config, "--only", "w1", "--help"]) == 0
    assert "--fail-fast" in capfd.readouterr().out
    assert main(["launch", config, "--", PY, "-c", code, "--help"]) == 0  # the command's --help
    assert sorted(capfd.readouterr().out.splitlines()) == [f"[w{i}] env w{i}" for i in (1, 2, 3)]


def test_a_failing_node_fails_the_launch_and_the_others_finish(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.yaml")
    code = (
        "import os, sys, time\n"
        "if os.environ['DPWA_NODE'] == 'w2': sys.exit(3)\n"
        "time.sleep(0.5)\n"
        "print('done')\n"
    )
    status, out, err = run(config, [PY, "-c", code])
    assert status == 3
    assert "[w1] done" in out and "[w3] done" in out  # gossip goes on without w2
    assert "dpwa launch: w2 exited with code 3\n" in err
    assert err.rstrip().endswith("1 of 3 nodes failed: w2 (exited with code 3)")


def test_fail_fast_stops_the_other_nodes(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.yaml")
    code = (
        "import os, sys, time\n"
        "if os.environ['DPWA_NODE'] == 'w2': time.sleep(0.3); sys.exit(5)\n"
        "time.sleep(120)\n"
    )
    status, out, err = run(config, [PY, "-c", code], fail_fast=True, grace=30)
    assert status == 5
    assert "w2 failed and --fail-fast is set; sending SIGTERM to w1, w3" in err
    assert "w1 was killed by signal SIGTERM" in err and "w3 was killed by signal SIGTERM" in err


def test_a_node_killed_by_a_signal_is_reported(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.yaml", count=1)
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    status, _, err = run(config, [PY, "-c", code])
    assert status == 128 + signal.SIGKILL
    assert "w1 was killed by signal SIGKILL" in err


def test_a_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.yaml")
    with pytest.raises(LaunchError, match="cannot start node w1's command 'no-such-program-x'"):
        launch(config, ["no-such-program-x"])
    with pytest.raises(LaunchError, match="no command to run"):
        launch(config, [])


def test_nodes_on_other_hosts_are_refused(tmp_path: Path) -> None:
    mapping = cluster(3)
    mapping["nodes"][2]["host"] = "192.0.2.7"  # TEST-NET-1: documentation only, never local
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(mapping))
    marker = f"open('{tmp_path}/{{name}}.started', 'w').close()"  # the launcher fills in {name}
    with pytest.raises(LaunchError) as caught:
        launch(config, [PY, "-c", marker])
    message = str(caught.value)
    assert "w3 on 192.0.2.7: not an address of this machine" in message
    assert "--only w1,w2" in message
    assert list(tmp_path.glob("*.started")) == []  # refused before starting anything
    code, _, err = run(config, [PY, "-c", marker], only="w1,w2")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.started")) == ["w1.started", "w2.started"]


def test_is_local_host() -> None:
    for host in ("localhost", "LOCALHOST", "127.0.0.1", "127.3.2.1", "::1", "0.0.0.0", "::"):
        assert is_local_host(host), host
    assert is_local_host("::ffff:127.0.0.1")
    assert is_local_host(socket.gethostname())
    for host in ("192.0.2.7", "2001:db8::1", "198.51.100.1"):
        assert not is_local_host(host), host


def test_plan_sets_the_environment() -> None:
    config = load_config(cluster(2))
    jobs = plan(config, ["run", "--out={name}.txt"], environ={"PATH": "/bin"})
    assert [job.argv for job in jobs] == [("run", "--out=w1.txt"), ("run", "--out=w2.txt")]
    assert dict(jobs[1].env) == {"PATH": "/bin", "PYTHONUNBUFFERED": "1", "DPWA_NODE": "w2"}
    check_local(config, ["w1", "w2"])  # 127.0.0.1: accepted


def test_plan_passes_the_config_file_on(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster(2)))
    jobs = plan(path, ["run", "--config", "{config}"], environ={})
    assert jobs[0].argv == ("run", "--config", str(path))
    assert jobs[1].env["DPWA_CONFIG"] == str(path)
    with pytest.raises(LaunchError, match="the config is not a file"):
        plan(cluster(2), ["run", "{config}"])


def start_launcher(
    config: Path, workdir: Path, *extra: str, child_args: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    """``dpwa launch`` in its own session, as a shell would run it in a terminal."""
    return subprocess.Popen(
        [PY, "-m", "dpwa_core.cli", "launch", str(config), *extra, "--"]
        + [PY, str(WORKERS / "trap_signals.py"), str(workdir), *child_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGINT, False)],
    ids=["ctrl-c-in-a-terminal", "kill-launcher-pid", "sigint-to-launcher-pid"],
)
def test_signals_are_forwarded_to_every_node_once(
    tmp_path: Path, signum: int, to_group: bool
) -> None:
    config = write_config(tmp_path / "cluster.yaml")
    launcher = start_launcher(config, tmp_path)
    names = ("w1", "w2", "w3")
    try:
        wait_until(lambda: all((tmp_path / f"{n}.ready").exists() for n in names), "nodes")
        if to_group:
            # A terminal's Ctrl+C goes to the whole foreground process group, the launcher's.
            # The nodes run in sessions of their own: each gets it once, from the launcher.
            os.killpg(launcher.pid, signum)
        else:
            launcher.send_signal(signum)  # `kill PID`: only the launcher can pass it on
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    name = signal.Signals(signum).name
    assert launcher.returncode == 128 + signum, err
    for node in names:
        assert (tmp_path / f"{node}.signals").read_text() == f"{name}\n"
        assert f"[{node}] got {name}" in out
    assert f"got {name}; sending {name} to w1, w2, w3" in err
    assert f"exit status {128 + signum}: interrupted by {name}" in err


def test_a_node_that_ignores_the_signal_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.yaml", count=2)
    launcher = start_launcher(config, tmp_path, "--grace", "0.5", child_args=("ignore",))
    try:
        wait_until(
            lambda: (tmp_path / "w2.ready").exists() and (tmp_path / "w1.ready").exists(), "nodes"
        )
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert (tmp_path / "w1.signals").read_text() == "SIGTERM\n"
    assert "killing w1, w2 (SIGKILL)" in err
    assert "w1 was killed by signal SIGKILL" in err and "w2 was killed by signal SIGKILL" in err


def test_a_second_ctrl_c_kills_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.yaml", count=1)
    launcher = start_launcher(config, tmp_path, "--grace", "600", child_args=("ignore",))
    try:
        wait_until(lambda: (tmp_path / "w1.ready").exists(), "the node")
        launcher.send_signal(signal.SIGINT)
        wait_until(lambda: (tmp_path / "w1.signals").exists(), "the forwarded SIGINT")
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=60)  # not 600 s: the second one kills
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 130, err
    assert "got SIGINT again; killing the nodes now" in err
    assert "w1 was killed by signal SIGKILL" in err


def test_two_gossip_nodes_through_dpwa_launch(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.yaml", count=2, timeout_ms=5000)
    command = [PY, str(WORKERS / "launch_gossip.py"), str(config), str(tmp_path), "5"]
    code, out, err = run(config, command)
    assert code == 0, out + err
    summaries = {line.split()[0]: line for line in out.splitlines() if "pulls_ok=" in line}
    assert set(summaries) == {"[w1]", "[w2]"}
    for prefix, line in summaries.items():
        assert line.startswith(f"{prefix} {prefix[1:-1]} pulls_ok=")
        assert int(line.split("pulls_ok=")[1].split()[0]) >= 5
