"""Third-party strategies: discovery from an installed package, and registration at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dpwa_core import registry
from dpwa_core.config import load_config
from dpwa_core.errors import ConfigError
from dpwa_core.hookspec import hookimpl

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "interpolation_plugin"

ANNEALED_CONFIG = {
    "nodes": [{"name": "w1", "host": "localhost", "port": 45000}],
    "interpolation": "annealed",
    "annealed": {"start": 0.5, "end": 0.0, "half_life": 10},
}

# Loads a config naming the sample plugin's strategy and prints factors at three clocks.
LOAD_ANNEALED = textwrap.dedent(
    f"""
    from dpwa_core.config import load_config
    strategy = load_config({ANNEALED_CONFIG!r}).make_strategy()
    print([strategy(clock, 0, 1.0, 1.0) for clock in (0, 10, 20)])
    """
)


def run_python(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run this interpreter in a fresh process, with ``pythonpath`` as its only PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.pop("DPWA_NODE", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def sample_installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the sample plugin into a private folder; returns the folder."""
    # Build from a copy so pip's in-tree build leaves no build/ or egg-info in the repo.
    workdir = tmp_path_factory.mktemp("sample")
    source = workdir / "src"
    shutil.copytree(SAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = workdir / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--quiet",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return target


def test_an_installed_plugin_is_found_and_usable_from_a_config(sample_installed: Path) -> None:
    result = run_python("-c", LOAD_ANNEALED, pythonpath=sample_installed)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0.5, 0.25, 0.125]"


def test_dpwa_plugins_lists_the_installed_plugin_and_its_distribution(
    sample_installed: Path,
) -> None:
    result = run_python("-m", "dpwa_core.cli", "plugins", pythonpath=sample_installed)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "dpwa-sample-plugin 0.1.0 (dpwa_sample_plugin)" in rows["annealed"]
    assert "Start by averaging hard" in rows["annealed"]
    assert {"clock", "constant", "loss"} <= set(rows)


def test_without_the_plugin_the_same_config_says_not_installed() -> None:
    installed = [
        name
        for name, info in registry.strategies().items()
        if not info.source.startswith("registered at run time")
    ]
    assert {"clock", "constant", "loss"} <= set(installed)
    result = run_python("-c", LOAD_ANNEALED)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr
    assert (
        "Interpolation 'annealed' not found. It is either misspelled or not installed. "
        f"Installed: {', '.join(installed)}." in result.stderr
    )


def test_a_plugin_that_fails_to_import_is_named(tmp_path: Path) -> None:
    # A distribution whose entry point names a module that does not exist.
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[dpwa.interpolation]\nbroken = no_such_module_xyz\n")
    result = run_python("-m", "dpwa_core.cli", "plugins", pythonpath=tmp_path)
    assert result.returncode == 1
    assert "Could not load interpolation plugin 'broken'" in result.stderr
    assert "broken = no_such_module_xyz" in result.stderr and "broken-plugin" in result.stderr
    assert "ModuleNotFoundError" in result.stderr


class Doubler:
    """A run-time plugin: ``twice`` returns twice the peer's share of the clocks, capped at 1."""

    @hookimpl
    def dpwa_register_interpolations(self) -> dict[str, Any]:
        return {"twice": Twice}


class Twice:
    """Take twice the clock strategy's factor, capped at 1."""

    def __init__(self, cap: float = 1.0) -> None:
        self.cap = cap

    def __call__(self, clock: float, peer_clock: float, loss: float, peer_loss: float) -> float:
        return min(self.cap, 2 * peer_clock / (clock + peer_clock))


@pytest.fixture
def doubler() -> Iterator[Doubler]:
    plugin = Doubler()
    registry.register(plugin, name="doubler")
    yield plugin
    registry.unregister(plugin)


def test_register_makes_a_name_usable_in_a_config(doubler: Doubler) -> None:
    info = registry.strategies()["twice"]
    assert info.source == f"registered at run time (plugin 'doubler', module {__name__})"
    nodes = ANNEALED_CONFIG["nodes"]
    config = load_config({"nodes": nodes, "interpolation": "twice"})
    assert config.make_strategy()(300, 100, 0, 0) == 0.5
    capped = load_config({"nodes": nodes, "interpolation": "twice", "twice": {"cap": 0.8}})
    assert capped.make_strategy()(100, 300, 0, 0) == 0.8
    registry.unregister(doubler)
    with pytest.raises(ConfigError, match="Interpolation 'twice' not found"):
        load_config({"nodes": nodes, "interpolation": "twice"})
