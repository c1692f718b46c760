"""The package's promises: no framework on import, and a docstring on every public name."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

import pytest
from conftest import free_ports

import dpwa_core

FRAMEWORKS = ("torch", "tensorflow", "jax", "flax", "keras")


def test_import_dpwa_core_imports_no_framework() -> None:
    port = free_ports(1)[0]
    code = (
        "import json, sys, numpy as np\n"
        "import dpwa_core\n"
        "from dpwa_core import registry\n"
        "registry.strategies()\n"
        f"nodes = [{{'name': 'a', 'host': '127.0.0.1', 'port': {port}}}]\n"
        "node = dpwa_core.Node({'nodes': nodes}, 'a')\n"
        "node.update_send(np.zeros(3, np.float32), 1.0)\n"
        "node.close()\n"
        f"print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def _core_modules() -> list[str]:
    return ["dpwa_core"] + [
        f"dpwa_core.{m.name}"
        for m in pkgutil.iter_modules(dpwa_core.__path__)
        if not m.name.startswith("_")
    ]


@pytest.mark.parametrize("module_name", _core_modules())
def test_every_public_name_is_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    missing = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not inspect.isfunction(member):
                    continue
                if not inspect.getdoc(member):
                    missing.append(f"{name}.{attr}")
    assert missing == [], f"{module_name}: undocumented public names {missing}"


def test_public_api_is_exported() -> None:
    for name in dpwa_core.__all__:
        assert hasattr(dpwa_core, name), name
    for name in (
        "Node",
        "PullResult",
        "connect",
        "load_config",
        "ConfigError",
        "hookimpl",
        "get_adapter",
    ):
        assert name in dpwa_core.__all__
