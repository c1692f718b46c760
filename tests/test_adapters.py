"""The adapter registry, exercised without any deep-learning framework.

A toy adapter for plain Python lists stands in for a framework; fake installed distributions
(a ``*.dist-info`` folder on ``sys.path``) stand in for third-party adapter packages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from dpwa_core.adapters import (
    Adapter,
    FlatArray,
    StateT,
    available_adapters,
    detect_adapter,
    get_adapter,
    lerp_inplace,
    register_adapter,
    unregister_adapter,
    validate_factor,
    validate_flat,
)
from dpwa_core.errors import AdapterError
from dpwa_core.layout import Layout


class ListAdapter(Adapter):
    """Treats a list of floats as a model; ``builtins`` is always imported."""

    framework_name: ClassVar[str] = "builtins"

    def handles(self, state: object) -> bool:
        return isinstance(state, list) and all(isinstance(x, float) for x in state)

    def layout(self, state: object) -> Layout:
        assert isinstance(state, list)
        return Layout.flat(len(state))

    def to_flat(self, state: object, out: FlatArray | None = None) -> FlatArray:
        assert isinstance(state, list)
        if out is None:
            out = np.empty(len(state), dtype=np.float32)
        validate_flat(out, self.layout(state), name="out", writable=True)[:] = state
        return out

    def from_flat(self, state: StateT, flat: FlatArray) -> StateT:
        assert isinstance(state, list)
        state[:] = validate_flat(flat, self.layout(state)).tolist()
        return state


class Opaque:
    """An object no adapter handles."""


@pytest.fixture
def list_adapter() -> Iterator[type[ListAdapter]]:
    register_adapter("PyList", ListAdapter)
    yield ListAdapter
    unregister_adapter("pylist")


def _write_distribution(
    root: Path, name: str, entry_points: dict[str, str], extras: list[str]
) -> None:
    """Install a fake distribution (metadata only) under ``root``."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 0.1"]
    metadata += [f"Provides-Extra: {extra}" for extra in extras]
    (info / "METADATA").write_text("\n".join(metadata) + "\n")
    lines = ["[dpwa.adapters]"] + [f"{key} = {value}" for key, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Adapter packages whose framework is missing, is lazily imported, or is importable."""
    modules = {
        # Imports a framework that is not installed, at its top, like dpwa_torch does.
        "fake_missing_adapter": "import dpwa_fake_framework_xyz\n",
        # Its framework has no matching extra in the distribution.
        "fake_unlisted_adapter": "import dpwa_unlisted_framework_xyz\n",
        # Imports its framework only when instantiated, so its install_hint can be read.
        "fake_lazy_adapter": """
            from dpwa_core.adapters import Adapter

            class LazyAdapter(Adapter):
                framework_name = "dpwa_lazy_framework_xyz"
                install_hint = "pip install lazy-framework-from-hint"

                def __init__(self):
                    import dpwa_lazy_framework_xyz  # noqa: F401

                handles = layout = to_flat = from_flat = None
        """,
        # A framework that is importable: the module fake_tensor_fw defines its tensor type.
        "fake_tensor_fw": """
            class FakeTensor:
                def __init__(self, values):
                    self.values = list(values)
        """,
        "fake_tensor_adapter": """
            import numpy as np
            import fake_tensor_fw
            from dpwa_core.adapters import Adapter, validate_flat
            from dpwa_core.layout import Layout

            class FakeTensorAdapter(Adapter):
                framework_name = "fake_tensor_fw"

                def handles(self, state):
                    return isinstance(state, fake_tensor_fw.FakeTensor)

                def layout(self, state):
                    return Layout.flat(len(state.values))

                def to_flat(self, state, out=None):
                    return np.asarray(state.values, dtype=np.float32)

                def from_flat(self, state, flat):
                    state.values = validate_flat(flat, self.layout(state)).tolist()
                    return state

            NOT_AN_ADAPTER = 42
        """,
    }
    for module, source in modules.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    _write_distribution(
        tmp_path,
        "fakedpwa",
        {
            "fakemissing": "fake_missing_adapter:MissingAdapter",
            "fakeunlisted": "fake_unlisted_adapter:UnlistedAdapter",
            "fakelazy": "fake_lazy_adapter:LazyAdapter",
            "fake_tensor_fw": "fake_tensor_adapter:FakeTensorAdapter",
            "faketensor": "fake_tensor_adapter:FakeTensorAdapter",
            "fakebroken": "fake_tensor_adapter:NOT_AN_ADAPTER",
        },
        extras=["dpwa-fake-framework-xyz"],
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in modules:
        sys.modules.pop(module, None)


def test_registered_adapter_is_found_by_name_case_insensitively(list_adapter: type) -> None:
    adapter = get_adapter("pylist")
    assert isinstance(adapter, ListAdapter)
    assert get_adapter("PYLIST") is adapter
    assert available_adapters()["pylist"] == f"{__name__}:ListAdapter (registered)"


def test_registered_adapter_round_trips_and_interpolates(list_adapter: type) -> None:
    adapter = get_adapter("pylist")
    state = [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(adapter.to_flat(state), [1.0, 2.0, 3.0])
    assert adapter.from_flat(state, np.array([4.0, 5.0, 6.0], np.float32)) is state
    assert state == [4.0, 5.0, 6.0]
    # The base class's interpolate: to_flat, blend, from_flat.
    adapter.interpolate(state, np.array([0.0, 1.0, 2.0], np.float32), 0.25)
    assert state == pytest.approx([3.0, 4.0, 5.0])
    adapter.interpolate(state, np.array([7.0, 8.0, 9.0], np.float32), 1.0)
    assert state == [7.0, 8.0, 9.0]


@pytest.mark.parametrize("factor", [0.0, 0.2, 0.5, 0.75, 1.0])
def test_lerp_inplace_blends_in_blocks(factor: float) -> None:
    rng = np.random.default_rng(0)
    size = 3 * 64 * 1024 + 17  # several blocks and a ragged end
    local = rng.standard_normal(size).astype(np.float32)
    peer = rng.standard_normal(size).astype(np.float32)
    start = local.copy()
    assert lerp_inplace(local, peer, factor) is local
    expected = (1 - factor) * start.astype(np.float64) + factor * peer.astype(np.float64)
    np.testing.assert_allclose(local, expected, rtol=0, atol=1e-6)
    if factor in (0.0, 1.0):  # the ends are exact
        np.testing.assert_array_equal(local, start if factor == 0.0 else peer)


def test_lerp_inplace_handles_shapes_and_strides_and_refuses_mismatches() -> None:
    local = np.arange(12, dtype=np.float32).reshape(3, 4)
    lerp_inplace(local, np.zeros((3, 4), np.float32), 0.5)
    np.testing.assert_array_equal(local, np.arange(12).reshape(3, 4) / 2)
    strided = np.arange(8, dtype=np.float32)[::2]  # not contiguous: blended and written back
    lerp_inplace(strided, np.full(4, 10, np.float32), 1.0)
    assert strided.tolist() == [10.0] * 4
    with pytest.raises(ValueError, match="shapes"):
        lerp_inplace(np.zeros(3, np.float32), np.zeros(4, np.float32), 0.5)
    frozen = np.zeros(3, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        lerp_inplace(frozen, np.ones(3, np.float32), 0.5)


def test_prepare_defaults_to_the_state_itself(list_adapter: type) -> None:
    state = [1.0, 2.0]
    adapter = get_adapter("pylist")
    assert adapter.prepare(state) is state
    assert adapter.prepare(state, zero_copy=False) is state
    assert state == [1.0, 2.0]


def test_base_interpolate_validates_before_writing(list_adapter: type) -> None:
    adapter = get_adapter("pylist")
    state = [1.0, 2.0]
    bad_peers = [
        np.zeros(3, np.float32),
        np.zeros(2, np.float64),
        np.zeros((1, 2), np.float32),
        [0.0, 0.0],
    ]
    for peer in bad_peers:
        with pytest.raises(AdapterError):
            adapter.interpolate(state, peer, 0.5)  # type: ignore[arg-type]
    for factor in (float("nan"), -0.1, 1.5, "0.5"):
        with pytest.raises(AdapterError, match="factor"):
            adapter.interpolate(state, np.zeros(2, np.float32), factor)  # type: ignore[arg-type]
    assert state == [1.0, 2.0]


def test_registered_adapter_is_detected(list_adapter: type) -> None:
    adapter = detect_adapter([0.5, 1.5])
    assert adapter is get_adapter("pylist")
    assert detect_adapter([2.5]) is adapter


def test_unregistered_adapter_is_gone(list_adapter: type) -> None:
    unregister_adapter("pylist")
    with pytest.raises(AdapterError, match="not found"):
        get_adapter("pylist")
    with pytest.raises(AdapterError):
        detect_adapter([0.5])
    register_adapter("pylist", ListAdapter)  # for the fixture's teardown


def test_register_instance_is_returned_as_is() -> None:
    instance = ListAdapter()
    register_adapter("listinstance", instance)
    try:
        assert get_adapter("ListInstance") is instance
    finally:
        unregister_adapter("listinstance")


def test_register_rejects_what_is_not_an_adapter() -> None:
    with pytest.raises(AdapterError, match="Adapter subclass or instance"):
        register_adapter("nope", object)  # type: ignore[arg-type]
    with pytest.raises(AdapterError, match="name"):
        register_adapter("  ", ListAdapter)
    with pytest.raises(AdapterError, match="No adapter was registered"):
        unregister_adapter("never-registered")


def test_unknown_name_lists_installed_adapters() -> None:
    with pytest.raises(AdapterError) as info:
        get_adapter("foo")
    installed = available_adapters()
    assert "torch" in installed and "pt" in installed and "pytorch" in installed
    assert str(info.value) == (
        "Adapter 'foo' not found. It is either misspelled or not installed. "
        f"Installed: {', '.join(sorted(installed))}"
    )


def test_entry_points_are_listed_without_loading() -> None:
    listed = available_adapters()
    assert listed["torch"] == listed["pytorch"] == listed["pt"] == "dpwa_torch:TorchAdapter"
    assert list(listed) == sorted(listed)


def test_detecting_a_plain_object_names_what_was_tried(list_adapter: type) -> None:
    with pytest.raises(AdapterError) as info:
        detect_adapter(Opaque())
    message = str(info.value)
    assert f"'{__name__}.Opaque'" in message
    assert "Tried: pylist (registered)" in message
    assert 'framework="..."' in message


def test_missing_framework_says_which_extra_to_install(fake_packages: Path) -> None:
    with pytest.raises(AdapterError) as info:
        get_adapter("fakemissing")
    message = str(info.value)
    assert "'dpwa_fake_framework_xyz' is not installed" in message
    assert "pip install 'fakedpwa[dpwa-fake-framework-xyz]'" in message


def test_missing_framework_without_extra_gets_a_generic_hint(fake_packages: Path) -> None:
    with pytest.raises(AdapterError, match="pip install dpwa_unlisted_framework_xyz"):
        get_adapter("fakeunlisted")


def test_lazy_adapter_uses_its_install_hint(fake_packages: Path) -> None:
    with pytest.raises(AdapterError, match="pip install lazy-framework-from-hint"):
        get_adapter("fakelazy")


def test_entry_point_that_is_not_an_adapter_is_rejected(fake_packages: Path) -> None:
    with pytest.raises(AdapterError, match="not an Adapter subclass"):
        get_adapter("fakebroken")


def test_detection_only_tries_imported_frameworks(fake_packages: Path) -> None:
    assert "fake_tensor_fw" not in sys.modules
    with pytest.raises(AdapterError) as info:
        detect_adapter(Opaque())
    message = str(info.value)
    # Named in the message but never imported: the framework module was not loaded.
    assert "fake_tensor_fw/faketensor (fake_tensor_adapter:FakeTensorAdapter)" in message
    assert "Not tried because their framework is not imported" in message
    assert "fake_tensor_fw" not in sys.modules
    assert "fake_tensor_adapter" not in sys.modules

    import fake_tensor_fw  # type: ignore[import-not-found]

    state = fake_tensor_fw.FakeTensor([1.0, 2.0])
    adapter = detect_adapter(state)
    assert type(adapter).__name__ == "FakeTensorAdapter"
    # Aliases of one entry point share one instance, and detection returns that instance.
    assert get_adapter("faketensor") is adapter is get_adapter("FAKE_TENSOR_FW")
    adapter.interpolate(state, np.array([3.0, 4.0], np.float32), 0.5)
    assert state.values == [2.0, 3.0]


def test_validate_flat_accepts_only_fitting_float32_vectors() -> None:
    layout = Layout([(2, 2), (3,)])
    flat = np.zeros(7, np.float32)
    assert validate_flat(flat, layout) is flat
    with pytest.raises(AdapterError, match="7 elements"):
        validate_flat(np.zeros(6, np.float32), layout)
    with pytest.raises(AdapterError, match="float32"):
        validate_flat(np.zeros(7, ">f4"), layout)
    readonly = np.frombuffer(bytes(28), np.float32)
    assert validate_flat(readonly, layout) is readonly
    with pytest.raises(AdapterError, match="writable"):
        validate_flat(readonly, layout, writable=True)
    with pytest.raises(AdapterError, match="writable"):
        validate_flat(np.zeros(14, np.float32)[::2], layout, name="out", writable=True)


def test_validate_factor() -> None:
    assert validate_factor(0) == 0.0
    assert validate_factor(np.float32(0.25)) == 0.25  # type: ignore[arg-type]
    assert validate_factor(1) == 1.0
    for bad in (True, float("inf"), float("nan"), -1e-9, 1.0000001, None):
        with pytest.raises(AdapterError):
            validate_factor(bad)  # type: ignore[arg-type]


def test_importing_the_registry_imports_no_framework() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        import dpwa_core.adapters as adapters
        from dpwa_core.errors import AdapterError

        frameworks = ("torch", "tensorflow", "jax")
        report = {"after_import": [f for f in frameworks if f in sys.modules]}
        try:
            adapters.detect_adapter(object())
        except AdapterError as exc:
            report["error"] = str(exc)
        report["after_detect"] = [f for f in frameworks if f in sys.modules]
        adapters.available_adapters()
        report["after_listing"] = [f for f in frameworks if f in sys.modules]
        print(json.dumps(report))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(result.stdout)
    assert report["after_import"] == []
    assert report["after_detect"] == []
    assert report["after_listing"] == []
    assert "Tried: none" in report["error"]
    assert "pt/pytorch/torch (dpwa_torch:TorchAdapter)" in report["error"]


def test_adapters_without_a_training_callback_say_how_to_gossip(list_adapter: type) -> None:
    with pytest.raises(AdapterError, match=r"update_send\(loss\) before each step"):
        get_adapter("pylist").callback(gossip=None)
