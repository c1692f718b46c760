"""The integrations import their library only when used: dpwa_core and dpwa_torch stay light."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHECK = """
import sys
import {module}
heavy = sorted(name for name in ("lightning", "pytorch_lightning", "transformers", "accelerate")
               if name in sys.modules)
print(",".join(heavy))
"""


@pytest.mark.parametrize("module", ["dpwa_core", "dpwa_torch", "dpwa_torch.optimizer"])
def test_import_pulls_in_no_trainer_library(module: str) -> None:
    if module != "dpwa_core":
        pytest.importorskip("torch")
    run = subprocess.run(
        [sys.executable, "-c", _CHECK.format(module=module)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", f"import {module} imported {run.stdout.strip()}"


def test_dpwa_core_imports_no_framework_with_the_integrations_installed() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, dpwa_core; print(','.join(sorted(n for n in ('torch', 'tensorflow', "
            "'jax', 'keras', 'lightning', 'transformers') if n in sys.modules)))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


@pytest.mark.parametrize(
    ("module", "library"),
    [("dpwa_torch.lightning", "lightning"), ("dpwa_torch.transformers", "transformers")],
)
def test_each_integration_imports_its_own_library(module: str, library: str) -> None:
    pytest.importorskip(library)
    run = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print({library!r} in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"  # the check above could tell, then
