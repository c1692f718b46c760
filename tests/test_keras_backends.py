"""Keras 3 on every backend (TensorFlow, JAX, torch): one adapter, one canonical layout.

Keras reads ``KERAS_BACKEND`` once, when it is first imported, so every backend runs in its
own processes (tests/workers/keras_backend_*.py); a backend whose library is not installed is
skipped with the reason.

- keras_backend_check.py, once per backend: the layout, bit-exact from_flat/to_flat/
  interpolate, detection and connect() pick the Keras adapter (a Keras model on torch is also
  a torch Module), no TensorFlow import on the other backends, the optimizer hooks, and a
  write from a callback in the middle of ``fit`` kept by ``fit`` (JAX holds its state outside
  the variables). Then across backends: equal layouts, equal outputs for one vector, equal
  optimizer fingerprints.
- keras_backend_node.py, one cluster per backend: two Keras nodes training with
  ``model.fit`` and the GossipCallback, plus, on JAX, a flax node and, on torch, a PyTorch node
  of the same architecture. Every node blends the others' models; they end near each other.
- docs/KERAS.md's example, run as two nodes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import cluster, free_ports, spread, wait_files

WORKERS = Path(__file__).parent / "workers"
ROOT = Path(__file__).parent.parent
BACKENDS = ("tensorflow", "jax", "torch")
# The flax node needs flax on top of jax; the torch node only torch.
NATIVE = {"tensorflow": None, "jax": "flax", "torch": "torch"}
TRAIN_STEPS = 40


def _env(backend: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _require(backend: str) -> None:
    """Skip, with the reason, unless keras and the backend's library can be imported."""
    for module in ("keras", backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"Keras on {backend}: {module} is not installed")


_runs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}


def _run(backend: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Run ``backend``'s cluster once per session: (w1's check report, every node's result).

    Two Keras nodes (w1 also runs keras_backend_check.check() before it starts), plus a flax
    node on JAX and a PyTorch node on torch, when those are installed.
    """
    _require(backend)
    if backend not in _runs:
        kinds = {"w1": "keras", "w2": "keras"}
        native = NATIVE[backend]
        if native is not None and importlib.util.find_spec(native) is not None:
            kinds["w3"] = native
        workdir = tmp_path_factory.mktemp(f"keras_{backend}")
        nodes = _run_cluster(workdir, backend, kinds)
        check = json.loads((workdir / "w1.check.json").read_text())
        _runs[backend] = (check, nodes)
    return _runs[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_on_backend(backend: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    report, _ = _run(backend, tmp_path_factory)
    assert report["backend"] == backend
    if backend != "tensorflow":  # importing keras and dpwa_tensorflow, and fit, left TF out
        assert "tensorflow" not in report["imported"], report["imported"]
        assert "tensorflow" not in report["imported_end"], report["imported_end"]
    # conv kernel HWIO, conv bias, BatchNorm gamma, beta, moving mean and variance, Dense
    assert report["layout"] == [[3, 3, 2, 4], [4], [4], [4], [4], [4], [4, 3], [3]]
    assert report["detected"] == report["connect_adapter"] == "KerasAdapter"
    assert report["torch_handles"] in (False, None), "the torch adapter took a Keras model"
    if backend == "torch":
        assert report["torch_handles"] is False
    assert report["roundtrip"] and report["to_flat_out"], report
    assert report["interpolate"], "interpolate differs from lerp_inplace"
    assert report["bfloat16_roundtrip"], report
    optimizer = report["optimizer"]
    assert optimizer["kind"] == "keras.optimizers.Adam", optimizer
    names = ["iteration", "0.momentum", "0.velocity", "1.momentum", "1.velocity"]
    assert optimizer["names"] == names
    assert optimizer["counter_before"] == 2.0  # two batches
    assert optimizer["roundtrip"], optimizer  # bit-identical, the counter written as 7
    assert optimizer["counter_after_fit"] == 9.0  # fit went on from the written counter
    assert report["mid_fit_write_kept"], "fit dropped the weights a callback wrote"
    assert report["mid_fit_counter"] == 103.0  # written as 100 after batch 0, 3 batches since


def test_backends_share_the_canonical_layout(tmp_path_factory: pytest.TempPathFactory) -> None:
    available = [b for b in BACKENDS if all(importlib.util.find_spec(m) for m in ("keras", b))]
    if "tensorflow" not in available or len(available) < 2:
        pytest.skip(f"needs Keras on TensorFlow and another backend; have {available}")
    reference, _ = _run("tensorflow", tmp_path_factory)
    for backend in available[1:]:
        report, _ = _run(backend, tmp_path_factory)
        assert report["layout"] == reference["layout"], backend
        assert report["shape_hash"] == reference["shape_hash"], backend
        # One vector, written on each backend, computes the same function: same weights.
        np.testing.assert_allclose(report["outputs"], reference["outputs"], rtol=1e-5, atol=1e-5)
        # A Keras-on-JAX or -torch node can catch up its optimizer from a Keras-on-TF node.
        assert report["optimizer"]["fingerprint"] == reference["optimizer"]["fingerprint"]


def _run_cluster(workdir: Path, backend: str, kinds: dict[str, str]) -> dict[str, Any]:
    """Run one node per entry of ``kinds`` (name -> keras/flax/torch) to the end."""
    config = cluster(len(kinds), timeout_ms=3000)
    config_path = workdir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    worker = str(WORKERS / "keras_backend_node.py")
    check_port = str(free_ports(1)[0])
    procs = {
        name: subprocess.Popen(
            [sys.executable, worker, str(config_path), str(workdir), kind, str(TRAIN_STEPS)],
            env=_env(
                backend,
                DPWA_NODE=name,
                **({"KERAS_CHECK_PORT": check_port} if name == "w1" else {}),
            ),
        )
        for name, kind in kinds.items()
    }
    try:
        wait_files(workdir, [f"{n}.done" for n in kinds], procs, 240)
        (workdir / "settle").touch()
        wait_files(workdir, [f"{n}.settled" for n in kinds], procs)
        (workdir / "stop").touch()
        wait_files(workdir, [f"{n}.json" for n in kinds], procs)
        (workdir / "exit").touch()
        for name, proc in procs.items():
            assert proc.wait(timeout=60) == 0, f"{name} exited with {proc.returncode}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return {
        name: {
            **json.loads((workdir / f"{name}.json").read_text()),
            "kind": kind,
            "init": np.load(workdir / f"{name}.init.npy"),
            "final": np.load(workdir / f"{name}.final.npy"),
        }
        for name, kind in kinds.items()
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_gossips_with_keras_and_native_nodes(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, nodes = _run(backend, tmp_path_factory)
    native = NATIVE[backend]
    if native is not None and "w3" not in nodes:
        pytest.skip(f"the {native} node needs {native}")

    layouts = {name: node["layout"] for name, node in nodes.items()}
    assert all(layout == [[3, 3, 2, 4], [4], [4, 3], [3]] for layout in layouts.values()), layouts
    for name, node in nodes.items():
        summary = {k: v for k, v in node.items() if k not in ("init", "final")}
        assert node["pulls_ok"] > 0, summary
        assert node["rejected"] == 0, f"{name}: a layout was refused: {summary}"
        others = set(nodes) - {name}
        assert set(node["blended"]) <= others and node["blended"], summary
        if node["kind"] == "keras":
            assert node["adapter"] == "KerasAdapter", summary  # on torch too
            assert node["backend"] == backend
            # the GossipCallback blended inside model.fit
            assert node["blended_in_training"], summary
    # Keras blended the two Keras nodes' models with each other...
    assert "w2" in nodes["w1"]["blended"] or "w1" in nodes["w2"]["blended"]
    if native is not None:  # ...and with the flax or PyTorch node's, both ways
        assert "w3" in nodes["w1"]["blended"] + nodes["w2"]["blended"]
        assert {"w1", "w2"} & set(nodes["w3"]["blended"])
    init = np.stack([node["init"] for node in nodes.values()])
    final = np.stack([node["final"] for node in nodes.values()])
    assert spread(init) > 1.0, spread(init)  # they started far apart
    assert spread(final) < spread(init) / 10, (spread(init), spread(final))


def _doc_example() -> str:
    text = (ROOT / "docs" / "KERAS.md").read_text()
    found = re.search(r"<!-- example: keras_two_nodes -->\s*```python\n(.*?)```", text, re.S)
    assert found, "docs/KERAS.md lost its example"
    return found.group(1)


def test_doc_example_runs_as_two_nodes(tmp_path: Path) -> None:
    backend = "jax"  # the quickest backend to import; the example sets no backend itself
    _require(backend)
    script = tmp_path / "keras_two_nodes.py"
    script.write_text(_doc_example())
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(cluster(2, timeout_ms=3000)))
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(script), str(config), name],
            env=_env(backend),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("w1", "w2")
    }
    outputs = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, out + err
            outputs[name] = out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, out in outputs.items():
        found = re.search(rf"{name}: backend jax, pulls ok (\d+)", out)
        assert found, out
        assert int(found.group(1)) > 0, out
