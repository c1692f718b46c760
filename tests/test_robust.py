"""A member with the secret cannot wreck the model: robust blending in a real 8-node cluster.

Eight node processes on 127.0.0.1 train softmax regression on scikit-learn's digits, each on its
own shard, from its own random weights, gossiping every step. In the attack runs, w8 is a plain
Node that passes every protocol check but serves (a) huge finite values, alternating +-3e38,
(b) its model with the sign flipped and scaled by 5, or (c) a model trained on wrong labels,
with a clock of 1e9 samples per step under ``interpolation: clock``. The mechanism is asserted
first (the honest nodes' stats show the attacker's pulls clipped and its clock bounded, their
models stay finite and close together), the accuracy second. Asking every honest node to end
within 3 points of the accuracy of the same cluster without an attacker, measured in the same
run, was not deterministic: the bounds are looser (see the test, and the report mode for the
numbers).

This file is also the node process (``python tests/test_robust.py worker ...``) and, by hand,
a report of the same runs with ``robust`` on and off: ``python tests/test_robust.py report``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FEATURES, CLASSES = 64, 10
SIZE = FEATURES * CLASSES + CLASSES
NODES = 8
ATTACKER = "w8"
STEPS = 250
BATCH = 32
LEARNING_RATE = 0.5
PORT_TAKEN = 3  # a worker's exit code when its port was taken; the cluster is started again


# --- the node process ----------------------------------------------------------------------


def _loss_and_gradient(
    params: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray]:
    weights = params[: FEATURES * CLASSES].reshape(FEATURES, CLASSES)
    logits = x @ weights + params[FEATURES * CLASSES :]
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    loss = float(-np.log(prob[np.arange(len(y)), y] + 1e-12).mean())
    prob[np.arange(len(y)), y] -= 1
    prob /= len(y)
    gradient = np.concatenate([(x.T @ prob).ravel(), prob.sum(axis=0)]).astype(np.float32)
    return loss, gradient


def _worker(config_path: str, workdir: str, role: str, steps: int) -> int:
    import dpwa_core

    folder = Path(workdir)
    config = dpwa_core.load_config(config_path)
    name = os.environ["DPWA_NODE"]
    index = int(name[1:]) - 1
    data = np.load(folder / "data.npz")
    x, y = data["x"][index::NODES], data["y"][index::NODES]
    if role == "clock":
        y = (y + 1) % CLASSES  # the attacker's crafted model: trained on wrong labels
    rng = np.random.default_rng(index)
    params = rng.normal(0, 0.1, SIZE).astype(np.float32)  # every node from its own weights
    served = params
    try:
        node = dpwa_core.Node(config, name, seed=index)
    except OSError as exc:  # the port was taken since it was chosen: the parent retries
        print(f"{name}: {exc}", file=sys.stderr)
        return PORT_TAKEN
    with node:
        node.wait_for_peers(timeout=30)
        loss = 2.3
        for step in range(steps):
            if role == "huge":
                served = np.full(SIZE, 3e38, np.float32)
                served[step % 2 :: 2] = -3e38
            elif role == "flip":
                served = -5 * params
            elif role == "clock":
                served = params
            node.update_send(served, loss, samples=10**9 if role == "clock" else BATCH)
            pick = rng.integers(0, len(y), BATCH)
            loss, gradient = _loss_and_gradient(params, x[pick], y[pick])
            params -= LEARNING_RATE * gradient
            result = node.update_wait(loss)
            if result is not None and role == "honest":
                blend = getattr(result, "blend_into", None)
                if blend is not None:
                    blend(params)
                else:  # the code before robust blending, for the report
                    params += result.factor * (result.params - params)
        np.save(folder / f"{name}.npy", params)
        (folder / f"{name}.json").write_text(json.dumps(node.stats(), default=str))
        # Keep serving until every node has finished, so nobody loses its partners early.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all((folder / f"w{i + 1}.npy").exists() for i in range(NODES)):
                break
            node.update_send(served, loss, samples=0)
            node.update_wait(loss)
            time.sleep(0.005)
    return 0


# --- running a cluster ---------------------------------------------------------------------


def _write_data(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The digits, scaled to [0, 1]: the training part for the nodes, the rest returned."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = (x[order] / 16.0).astype(np.float32), y[order]
    np.savez(folder / "data.npz", x=x[400:], y=y[400:])
    return x[:400], y[:400]


def accuracy(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    if not np.isfinite(params).all():
        return 0.0
    weights = params[: FEATURES * CLASSES].reshape(FEATURES, CLASSES).astype(np.float64)
    with np.errstate(all="ignore"):
        logits = x @ weights + params[FEATURES * CLASSES :]
    return float((logits.argmax(axis=1) == y).mean())


def run_cluster(
    folder: Path, attack: str | None, *, robust: dict[str, Any] | None = None, steps: int = STEPS
) -> dict[str, Any]:
    """Run 8 nodes (w8 the attacker unless ``attack`` is None); their final params and stats."""
    for _ in range(3):
        run = _run_cluster_once(folder, attack, robust, steps)
        if run is not None:
            return run
    raise AssertionError("three clusters in a row found a port taken")


def _run_cluster_once(
    folder: Path, attack: str | None, robust: dict[str, Any] | None, steps: int
) -> dict[str, Any] | None:
    """One try of :func:`run_cluster`; None when a node found its port taken."""
    from conftest import cluster

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("w*.*"):
        stale.unlink()
    options: dict[str, Any] = {"timeout_ms": 500, "transport": "tcp"}
    if attack == "clock":
        options["interpolation"] = "clock"
    if robust is not None:
        options["robust"] = robust
    config = cluster(NODES, **options)
    import yaml

    (folder / "cluster.yaml").write_text(yaml.safe_dump(config))
    if not (folder / "data.npz").exists():
        np.savez(folder / "data.npz", **dict(np.load(folder.parent / "data.npz")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    procs = {}
    for number in range(1, NODES + 1):
        name = f"w{number}"
        role = attack if (attack is not None and name == ATTACKER) else "honest"
        procs[name] = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "worker",
                str(folder / "cluster.yaml"),
                str(folder),
                role,
                str(steps),
            ],
            env={**env, "DPWA_NODE": name},
        )
    try:
        deadline = time.monotonic() + 120
        while any(proc.poll() is None for proc in procs.values()):
            if any(proc.poll() == PORT_TAKEN for proc in procs.values()):
                return None  # the others are killed below
            assert time.monotonic() < deadline, "the cluster took more than 120 s"
            time.sleep(0.05)
        codes = {name: proc.returncode for name, proc in procs.items()}
        if PORT_TAKEN in codes.values():
            return None
        assert set(codes.values()) == {0}, f"nodes exited with {codes}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    names = [f"w{i + 1}" for i in range(NODES)]
    return {
        "params": {n: np.load(folder / f"{n}.npy") for n in names},
        "stats": {n: json.loads((folder / f"{n}.json").read_text()) for n in names},
    }


def honest_names(attack: str | None) -> list[str]:
    return [f"w{i + 1}" for i in range(NODES) if attack is None or f"w{i + 1}" != ATTACKER]


def summary(run: dict[str, Any], attack: str | None, x: np.ndarray, y: np.ndarray) -> dict:
    honest = honest_names(attack)
    params = np.stack([run["params"][n] for n in honest]).astype(np.float64)
    with np.errstate(all="ignore"):
        mean = params.mean(axis=0)
        spread = float(np.linalg.norm(params - mean, axis=1).max() / np.linalg.norm(mean))
    stats = run["stats"]
    return {
        "accuracy": {n: accuracy(run["params"][n], x, y) for n in honest},
        "mean_model_accuracy": accuracy(mean.astype(np.float32), x, y),
        "finite": bool(np.isfinite(params).all()),
        "spread": spread,
        "clipped_from_attacker": {
            n: stats[n]["peers"].get(ATTACKER, {}).get("clipped") for n in honest
        },
        "pulls_from_attacker": {n: stats[n]["peers"].get(ATTACKER, {}).get("ok") for n in honest},
        "clocks_bounded": {n: stats[n].get("clocks_bounded") for n in honest},
        "pulls_clipped": {n: stats[n].get("pulls_clipped") for n in honest},
        "max_clock": max(stats[n]["clock"] for n in honest),
    }


# --- the tests -----------------------------------------------------------------------------

if __name__ != "__main__":
    import pytest

    @pytest.fixture(scope="module")
    def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
        folder = tmp_path_factory.mktemp("robust")
        x, y = _write_data(folder)
        return folder, x, y

    @pytest.fixture(scope="module")
    def baseline(digits: tuple[Path, np.ndarray, np.ndarray]) -> dict[str, Any]:
        folder, x, y = digits
        result = summary(run_cluster(folder / "none", None), None, x, y)
        assert result["finite"]
        return result

    @pytest.mark.parametrize("attack", ["huge", "flip", "clock"])
    def test_an_attacker_cannot_wreck_the_cluster(
        digits: tuple[Path, np.ndarray, np.ndarray], baseline: dict[str, Any], attack: str
    ) -> None:
        folder, x, y = digits
        result = summary(run_cluster(folder / attack, attack), attack, x, y)
        report = json.dumps({"baseline": baseline, "attack": result}, indent=1)
        # Mechanism first.
        assert result["finite"], report
        pulled = {n: c for n, c in result["pulls_from_attacker"].items() if c}
        assert len(pulled) >= 3, report  # ~35 of each honest node's pulls go to w8
        if attack in ("huge", "flip"):
            for name, count in pulled.items():
                clipped = result["clipped_from_attacker"][name]
                assert clipped >= 0.8 * count, (name, report)
        else:
            for name in pulled:
                assert result["clocks_bounded"][name] >= 1, (name, report)
        assert result["spread"] <= 2.0, report  # without clipping: NaN, or 1e38 away
        # Accuracy second, with generous bounds: a run-to-run comparison within 3 points was
        # not deterministic (20 runs with the other core busy). One pull moves a node by at
        # most factor x radius, but toward whatever the attacker chose, so the node whose last
        # pull was the attacker's can end well below the others; the honest nodes' mean model
        # averages that out. Without robust blending every honest node ends at 0-1 %.
        # A crafted model within the honest distances, taken at the bounded factor 2/3 on
        # every pull of it (c), is not stopped by distance: it biases the honest nodes, and
        # once in 20 loaded runs it took them over. Only the mechanism is asserted for (c).
        reference = baseline["mean_model_accuracy"]
        if attack == "huge":
            assert result["mean_model_accuracy"] >= reference - 0.05, report
            assert min(result["accuracy"].values()) >= 0.2, report  # chance is 0.1
        elif attack == "flip":  # a model pulling one way on every pull keeps a bias
            assert result["mean_model_accuracy"] >= 0.5, report
            assert min(result["accuracy"].values()) >= 0.2, report


# --- by hand -------------------------------------------------------------------------------


def _report(arguments: list[str]) -> None:
    import tempfile

    attacks = [None, "huge", "flip", "clock"]
    settings = {
        "on": None,
        "scale2": {"clip_scale": 2.0},
        "off": {"clip": False, "max_clock_lead": 1e300},
    }
    modes = arguments or list(settings)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        x, y = _write_data(folder)
        for mode in modes:
            for attack in attacks:
                start = time.monotonic()
                run = run_cluster(folder / f"{mode}-{attack}", attack, robust=settings[mode])
                seconds = time.monotonic() - start
                result = summary(run, attack, x, y)
                acc = list(result["accuracy"].values())
                print(
                    json.dumps(
                        {
                            "robust": mode,
                            "attack": attack,
                            "accuracy_mean": round(float(np.mean(acc)), 4),
                            "accuracy_min": round(float(np.min(acc)), 4),
                            "finite": result["finite"],
                            "spread": round(result["spread"], 4),
                            "clipped_from_attacker": sum(
                                c or 0 for c in result["clipped_from_attacker"].values()
                            ),
                            "pulls_from_attacker": sum(
                                c or 0 for c in result["pulls_from_attacker"].values()
                            ),
                            "pulls_clipped": sum(c or 0 for c in result["pulls_clipped"].values()),
                            "max_clock": result["max_clock"],
                            "seconds": round(seconds, 1),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    _report(sys.argv[2:])
