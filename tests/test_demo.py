"""``dpwa demo``: real node processes on loopback, the table, the PNG, and failures."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpwa_core.cli import main
from dpwa_demo.options import MIXED, node_frameworks
from dpwa_demo.report import distances_to_mean

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIXED_NEEDS = ("tensorflow", "keras", "jax", "flax", "optax")


def _demo(
    out: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dpwa_core.cli", "demo", "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def _rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """The table's rows, keyed by (run, node)."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if (
            len(cells) >= 3
            and cells[0] in ("gossip", "isolated")
            and re.fullmatch(r"w\d+", cells[1])
        ):
            rows[(cells[0], cells[1])] = cells
    return rows


def test_demo_compare_trains_reports_and_plots(tmp_path: Path) -> None:
    run = _demo(tmp_path, "--nodes", "3", "--steps", "200", "--compare")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _rows(run.stdout)
    assert sorted(rows) == [(label, f"w{i}") for label in ("gossip", "isolated") for i in (1, 2, 3)]
    gossip_acc, isolated_acc, gossip_dist, isolated_dist = [], [], [], []
    for (label, _node), cells in rows.items():
        # run node framework steps pulls_ok failed timed_out train_loss test_acc dist
        assert cells[2] == "torch" and cells[3] == "200", cells
        acc = float(cells[8].rstrip("%")) / 100
        dist = float(cells[9])
        if label == "gossip":
            assert int(cells[4]) > 0, cells  # the nodes really pulled from each other
            gossip_acc.append(acc)
            gossip_dist.append(dist)
        else:
            assert cells[4:7] == ["-", "-", "-"], cells  # isolated nodes never pull
            isolated_acc.append(acc)
            isolated_dist.append(dist)
    # Each node sees a third of the digits: alone it cannot pass about a third of the test set,
    # with gossip it learns the others' digits and the models stay close together.
    assert max(isolated_acc) < 0.5, run.stdout
    assert np.mean(gossip_acc) > np.mean(isolated_acc) + 0.2, run.stdout
    assert max(gossip_dist) < min(isolated_dist), run.stdout
    assert "gossip: mean test accuracy" in run.stdout
    assert "isolated: mean test accuracy" in run.stdout
    gains = re.search(r"^test accuracy, gossip minus isolated, in points: (.+)$", run.stdout, re.M)
    assert gains, run.stdout
    for i in (1, 2, 3):  # each node's gain is its two rows' difference
        node = f"w{i}"
        expected = float(rows[("gossip", node)][8][:-1]) - float(rows[("isolated", node)][8][:-1])
        gain = re.search(rf"{node} \(torch\) ([+-][\d.]+)", gains.group(1))
        assert gain and abs(float(gain.group(1)) - expected) < 0.2, gains.group(1)
    png = Path(re.search(r"^plot: (.+)$", run.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert png == (tmp_path / "dpwa-demo.png").resolve()
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    # Non-tty progress: plain lines, one per node, without terminal escapes.
    assert re.search(r"^\[gossip\] w1 torch .*step 200/200", run.stdout, re.M), run.stdout
    assert "\x1b[" not in run.stdout


def test_mixed_frameworks_reach_consensus(tmp_path: Path) -> None:
    """`dpwa demo --mixed`: a PyTorch, a Keras and a JAX node average one model."""
    missing = [m for m in MIXED_NEEDS if importlib.util.find_spec(m) is None]
    if missing:  # looked up, not imported: importing them here would cost seconds
        pytest.skip(f"--mixed needs {', '.join(missing)}")
    run = _demo(tmp_path, "--mixed", "--steps", "400")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _rows(run.stdout)
    assert sorted(rows) == [("gossip", "w1"), ("gossip", "w2"), ("gossip", "w3")], run.stdout
    assert [rows[("gossip", f"w{i}")][2] for i in (1, 2, 3)] == ["torch", "tensorflow", "jax"]
    for cells in rows.values():
        assert cells[3] == "400" and int(cells[4]) >= 100, cells  # trained, and pulled
        # Alone, a node's third of the digits caps it near a third of the test set.
        assert float(cells[8].rstrip("%")) > 50, run.stdout
    # Consensus: from different seeds, the three models end close to their mean, far closer
    # than they started (isolated nodes drift further apart instead).
    start = distances_to_mean(
        {n: np.load(tmp_path / "gossip" / "params" / f"{n}_000000.npy") for n in ("w1", "w2", "w3")}
    )
    end = [float(cells[9]) for cells in rows.values()]
    assert min(start.values()) > 1.0, start
    assert max(end) < 0.2 * min(start.values()), (start, run.stdout)
    png = tmp_path / "dpwa-demo.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_a_failing_node_makes_the_exit_status_non_zero(tmp_path: Path) -> None:
    run = _demo(tmp_path, "--nodes", "2", "--steps", "40", env={"DPWA_DEMO_FAIL_NODE": "w2"})
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(
        r"^gossip\s+w2\s+torch\s+FAILED \(exit code 1\) after step 20", run.stdout, re.M
    )
    assert _rows(run.stdout)[("gossip", "w1")][3] == "40"  # the healthy node finished
    assert "fails on purpose" in run.stdout  # the failed node's log tail is shown
    assert "1 node(s) failed: gossip/w2" in run.stdout
    assert (tmp_path / "dpwa-demo.png").stat().st_size > 0


def test_missing_packages_say_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    assert main(["demo", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'dpwa[demo]'" in err
    assert not (tmp_path / "out").exists()  # nothing started
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flax" else real(name, *a)
    )
    assert main(["demo", "--mixed", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "not installed: flax" in err and "pip install 'dpwa[all]'" in err


def test_bad_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--nodes", "3", "--frameworks", "torch,torch"]) == 1
    assert "2 frameworks for 3 nodes" in capsys.readouterr().err
    assert main(["demo", "--frameworks", "cobol"]) == 1
    assert "no demo trainer for cobol" in capsys.readouterr().err
    assert main(["demo", "--interpolation", "bogus"]) == 1
    assert "Interpolation 'bogus' not found" in capsys.readouterr().err
    assert main(["demo", "--pull-probability", "2"]) == 2
    assert main(["demo", "--mixed", "--frameworks", "torch"]) == 1
    assert "--mixed sets the frameworks" in capsys.readouterr().err
    assert main(["demo", "--mixed", "--nodes", "2"]) == 1
    assert "--mixed needs at least 3 nodes" in capsys.readouterr().err


def test_mixed_gives_each_framework_a_node() -> None:
    assert MIXED == ("torch", "tensorflow", "jax")
    assert node_frameworks(None, None, mixed=True) == ["torch", "tensorflow", "jax"]
    assert node_frameworks(5, None, mixed=True) == [
        "torch",
        "tensorflow",
        "jax",
        "torch",
        "tensorflow",
    ]
    assert node_frameworks(None, None, mixed=False) == ["torch"] * 4
    assert node_frameworks(2, "jax,torch", mixed=False) == ["jax", "torch"]
    assert node_frameworks(None, "jax,torch", mixed=False) == ["jax", "torch"]
    assert node_frameworks(None, "jax", mixed=False) == ["jax"] * 4


def test_help_explains_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--nodes",
        "--steps",
        "--interpolation",
        "--pull-probability",
        "--out",
        "--compare",
        "--mixed",
    ):
        assert option in out


def test_label_shards_split_the_digits_between_nodes() -> None:
    from dpwa_demo.data import load_digits_data

    data = load_digits_data(4, "labels")
    together = np.concatenate(data.shards)
    assert sorted(together) == list(range(len(data.y_train)))  # disjoint, and nothing left out
    for i in range(4):
        _, labels = data.shard(i)
        assert len(set(labels.tolist())) <= 4  # a few digits each
    iid = load_digits_data(4, "iid")
    assert all(len(set(iid.shard(i)[1].tolist())) == 10 for i in range(4))
    assert abs(float(data.x_train.mean())) < 1e-3  # standardized


def test_live_progress_redraws_lines_in_place() -> None:
    from dpwa_demo.progress import Progress

    stream = io.StringIO()
    progress = Progress(
        stream, "gossip", [("w1", "torch"), ("w2", "torch")], 100, live=True, width=200
    )
    progress.update(
        "w1", {"event": "progress", "step": 10, "loss": 1.5, "pulls_ok": 9, "pulls_failed": 1}
    )
    progress.update(
        "w2",
        {
            "event": "eval",
            "step": 20,
            "loss": 1.2,
            "test_acc": 0.5,
            "pulls_ok": 20,
            "pulls_failed": 0,
            "swarm_samples": 12345,
            "swarm_nodes": 2,
        },
    )
    progress.finish()
    text = stream.getvalue()
    frames = text.split("\r\x1b[2K\x1b[1A\x1b[2K")  # rich: back over the 2 lines drawn
    assert len(frames) >= 3, repr(text)
    assert "w2 torch starting" in frames[0]
    last = frames[-1]
    assert "w1 torch  step  10/100  loss  1.500" in last and "pulls ok 9 failed 1" in last
    assert "acc 50.0%" in last and "swarm 12.3k samples (2 nodes)" in last
