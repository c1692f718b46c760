"""The strategy registry: builtins through the plugin door, checked factors, clashes, errors."""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from dpwa_interpolation import Clock, Constant, Loss

from dpwa_core import registry
from dpwa_core.errors import ConfigError, InterpolationError, PluginError
from dpwa_core.hookspec import hookimpl

DPWA_VERSION = importlib.metadata.version("dpwa")
INF = math.inf
NAN = math.nan


class FakePlugin:
    """A plugin object whose hook returns a fixed table (or raises what it is given)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    @hookimpl
    def dpwa_register_interpolations(self) -> Mapping[str, Any]:
        if isinstance(self.table, Exception):
            raise self.table
        return self.table  # type: ignore[no-any-return]


class Returns:
    """A strategy that returns whatever it was built with."""

    def __init__(self, value: Any = 0.5) -> None:
        self.value = value

    def __call__(self, clock: float, peer_clock: float, loss: float, peer_loss: float) -> Any:
        return self.value


@pytest.fixture
def use_plugin() -> Iterator[Callable[..., object]]:
    """Register plugins for one test and unregister them afterwards, even on failure."""
    added: list[object] = []

    def use(table: Any, name: str) -> object:
        plugin = FakePlugin(table)
        added.append(plugin)
        registry.register(plugin, name=name)
        return plugin

    yield use
    for plugin in added:
        registry.unregister(plugin)


# Builtins.


def test_builtins_come_through_the_entry_point_group_with_their_source() -> None:
    infos = registry.strategies()
    for name, module in [("clock", "clock"), ("constant", "constant"), ("loss", "loss")]:
        assert infos[name].source == f"dpwa {DPWA_VERSION} (dpwa_interpolation.{module})"
    assert infos["constant"].factory is Constant
    assert infos["clock"].description.startswith("Weigh the peer by its share")
    assert list(infos) == sorted(infos)
    plugin = registry.plugin_manager().get_plugin("dpwa_interpolation")
    assert plugin is not None and plugin.__name__ == "dpwa_interpolation"


@pytest.mark.parametrize(
    ("section", "expected"),
    [({}, 0.5), ({"value": 0.25}, 0.25), ({"value": 0}, 0.0), ({"value": 1}, 1.0)],
)
def test_constant_returns_its_value_whatever_the_inputs(
    section: dict[str, Any], expected: float
) -> None:
    strategy = registry.make_strategy("constant", section)
    for inputs in [(0, 0, 0.0, 0.0), (10, 1000, 5.0, 0.1), (-3, 7, 1e9, 0.0)]:
        factor = strategy(*inputs)
        assert factor == expected and type(factor) is float


@pytest.mark.parametrize("value", [2, -0.1, 1.0001, NAN, INF, "0.5", True, None])
def test_constant_rejects_a_value_outside_zero_one(value: Any) -> None:
    with pytest.raises(ValueError, match="value must be"):
        Constant(value=value)
    with pytest.raises(ConfigError, match=r"Invalid options .* for interpolation 'constant'"):
        registry.make_strategy("constant", {"value": value})


@pytest.mark.parametrize(
    ("clock", "peer_clock", "expected"),
    [
        (100, 300, 0.75),  # the older peer counts more
        (300, 100, 0.25),
        (5, 5, 0.5),
        (0, 0, 0.5),  # two fresh models meet halfway
        (0, 7, 1.0),
        (7, 0, 0.0),
        (-5, 10, 1.0),  # negative clocks count as 0
        (10, -5, 0.0),
        (-1, -1, 0.5),
        (1, 2, 2 / 3),
    ],
)
def test_clock_is_the_peers_share_of_the_clocks(
    clock: float, peer_clock: float, expected: float
) -> None:
    assert Clock()(clock, peer_clock, 1.0, 2.0) == expected
    assert registry.make_strategy("clock", None)(clock, peer_clock, 1.0, 2.0) == expected


@pytest.mark.parametrize(
    ("loss", "peer_loss", "expected"),
    [
        (3.0, 1.0, 0.75),  # our loss is worse: take more of the peer
        (1.0, 3.0, 0.25),
        (2.0, 2.0, 0.5),
        (0.0, 0.0, 0.5),
        (0.0, 4.0, 0.0),
        (-1.0, 2.0, 0.0),  # negative losses clamp to 0
        (2.0, -1.0, 1.0),
        (-2.0, -3.0, 0.5),
        (INF, 1.0, 1.0),  # an infinite loss is the worst one, not NaN
        (1.0, INF, 0.0),
        (INF, INF, 0.5),
    ],
)
def test_loss_is_our_share_of_the_losses(loss: float, peer_loss: float, expected: float) -> None:
    assert Loss()(0, 0, loss, peer_loss) == expected
    assert registry.make_strategy("loss")(0, 0, loss, peer_loss) == expected


@pytest.mark.parametrize("name", ["clock", "loss"])
def test_clock_and_loss_take_no_options(name: str) -> None:
    with pytest.raises(ConfigError, match="accepts no options"):
        registry.make_strategy(name, {"value": 1})


def test_a_nan_loss_is_rejected_not_hidden() -> None:
    strategy = registry.make_strategy("loss")
    with pytest.raises(InterpolationError, match=r"'loss'.*loss=nan.*returned nan"):
        strategy(0, 0, NAN, 1.0)


# Checked factors.


@pytest.mark.parametrize("bad", [NAN, INF, -INF, 1.5, -0.1, "0.5", None])
def test_a_bad_factor_raises_naming_the_strategy_and_inputs(
    use_plugin: Callable[..., object], bad: Any
) -> None:
    use_plugin({"wonky": lambda: Returns(bad)}, "wonky-plugin")
    strategy = registry.make_strategy("wonky")
    with pytest.raises(InterpolationError) as info:
        strategy(3, 4, 0.5, 0.25)
    message = str(info.value)
    assert "'wonky'" in message
    assert "clock=3, peer_clock=4, loss=0.5, peer_loss=0.25" in message
    assert repr(bad) in message
    assert "registered at run time (plugin 'wonky-plugin'" in message


def test_a_good_factor_comes_back_as_a_python_float(use_plugin: Callable[..., object]) -> None:
    use_plugin({"one": lambda: Returns(1)}, "ints")
    assert type(registry.make_strategy("one")(0, 0, 0, 0)) is float
    assert registry.make_strategy("one")(0, 0, 0, 0) == 1.0


def test_a_strategy_that_raises_gives_an_interpolation_error(
    use_plugin: Callable[..., object],
) -> None:
    def broken(clock: float, peer_clock: float, loss: float, peer_loss: float) -> float:
        return clock / peer_clock

    use_plugin({"divides": lambda: broken}, "divides")
    with pytest.raises(InterpolationError, match="ZeroDivisionError") as info:
        registry.make_strategy("divides")(1, 0, 0, 0)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# Names, clashes and broken plugins.


def test_unknown_name_reads_like_opentelemetry() -> None:
    installed = ", ".join(registry.strategies())
    with pytest.raises(PluginError) as info:
        registry.make_strategy("foo")
    assert str(info.value).startswith(
        f"Interpolation 'foo' not found. It is either misspelled or not installed. "
        f"Installed: {installed}."
    )
    with pytest.raises(PluginError, match="Did you mean 'constant'"):
        registry.make_strategy("constnt")


def test_a_name_registered_twice_names_both_plugins(use_plugin: Callable[..., object]) -> None:
    use_plugin({"twin": Returns}, "first")
    with pytest.raises(PluginError) as info:
        use_plugin({"twin": Returns}, "second")
    message = str(info.value)
    assert "'twin' is registered twice" in message
    assert "plugin 'first'" in message and "plugin 'second'" in message
    # All or nothing: the clash left the first registration in place and the second out.
    assert registry.plugin_manager().get_plugin("second") is None
    assert "twin" in registry.strategies()


def test_a_clash_with_a_builtin_names_the_distribution(use_plugin: Callable[..., object]) -> None:
    with pytest.raises(PluginError) as info:
        use_plugin({"constant": Returns}, "impostor")
    assert f"dpwa {DPWA_VERSION} (dpwa_interpolation.constant)" in str(info.value)
    assert "plugin 'impostor'" in str(info.value)
    assert registry.strategies()["constant"].factory is Constant


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (RuntimeError("boom"), r"plugin 'bad' raised RuntimeError: boom"),
        (["not", "a", "mapping"], r"plugin 'bad' must return a mapping"),
        ({"": Returns}, r"non-empty string name"),
        ({"x": 42}, r"callable factory"),
    ],
)
def test_a_broken_hook_is_a_plugin_error_naming_the_plugin(
    use_plugin: Callable[..., object], table: Any, match: str
) -> None:
    with pytest.raises(PluginError, match=match):
        use_plugin(table, "bad")
    assert registry.plugin_manager().get_plugin("bad") is None


def test_a_factory_that_crashes_is_a_plugin_error(use_plugin: Callable[..., object]) -> None:
    def crashes() -> Returns:
        raise RuntimeError("no GPU")

    use_plugin({"crashy": crashes}, "crashy")
    with pytest.raises(PluginError, match=r"Building interpolation 'crashy' .* no GPU"):
        registry.make_strategy("crashy")


def test_a_misspelled_option_lists_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match=r"unexpected keyword argument 'valu'.*options: value"):
        registry.make_strategy("constant", {"valu": 0.5})


def test_register_twice_and_unregister(use_plugin: Callable[..., object]) -> None:
    plugin = use_plugin({"once": Returns}, "once")
    with pytest.raises(PluginError, match="Cannot register"):
        registry.register(plugin, name="once-again")
    registry.unregister(plugin)
    assert "once" not in registry.strategies()
    registry.unregister(plugin)  # a second time does nothing


class Misspelled:
    @hookimpl
    def dpwa_register_interpolation(self) -> Mapping[str, Any]:  # no trailing "s"
        return {"lost": Returns}


def test_a_misspelled_hook_is_an_error_not_silence() -> None:
    plugin = Misspelled()
    with pytest.raises(PluginError, match="unknown hook 'dpwa_register_interpolation'"):
        registry.register(plugin, name="misspelled")
    assert registry.plugin_manager().get_plugin("misspelled") is None
