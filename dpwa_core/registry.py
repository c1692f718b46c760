"""Find interpolation strategies: every plugin in the ``dpwa.interpolation`` entry-point group.

dpwa's own strategies (constant, clock, loss) are a plugin like any other, so there is one
code path for builtins and third-party strategies. A plugin implements the hook in
:mod:`dpwa_core.hookspec`; this module loads the plugins, attributes each strategy name to the
distribution it came from, and builds strategies whose factors are checked on every call.

Example:
    >>> from dpwa_core.registry import make_strategy
    >>> strategy = make_strategy("constant", {"value": 0.25})
    >>> strategy(clock=1, peer_clock=2, loss=0.5, peer_loss=0.5)
    0.25
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import math
import numbers
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pluggy

from dpwa_core.errors import ConfigError, InterpolationError, PluginError
from dpwa_core.hookspec import PROJECT, Strategy, StrategyFactory

__all__ = [
    "ENTRY_POINT_GROUP",
    "StrategyInfo",
    "make_strategy",
    "plugin_manager",
    "register",
    "strategies",
    "strategy_info",
    "unregister",
]

ENTRY_POINT_GROUP = "dpwa.interpolation"
"""The entry-point group a plugin declares its hook module in (builtins included)."""

# The manager and the name table are built once per process; register()/unregister() are the
# only ways the table changes, and they rebuild it. The lock keeps threads from building twice.
_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_table: Mapping[str, StrategyInfo] | None = None

# The hook specs' module, by its full name: the package re-exports only the `hookimpl` marker.
_HOOKSPECS = importlib.import_module("dpwa_core.hookspec")


@dataclass(frozen=True)
class StrategyInfo:
    """One installed interpolation strategy and where it came from.

    Args:
        name: the name a config's ``interpolation:`` key uses.
        factory: builds the strategy from the keyword arguments of its config section.
        source: where the name came from, e.g. ``"dpwa 0.1.0 (dpwa_interpolation.constant)"``.
    """

    name: str
    factory: StrategyFactory
    source: str

    @property
    def description(self) -> str:
        """The first line of the factory's docstring, or ``""`` when it has none."""
        doc = inspect.getdoc(self.factory) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


def plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading the installed plugins on first use.

    Register plugins through :func:`register` rather than the manager's own ``register`` so
    the strategy table is rebuilt.

    Returns:
        A :class:`pluggy.PluginManager` for project ``"dpwa"`` with every plugin of the
        ``dpwa.interpolation`` entry-point group loaded.

    Raises:
        PluginError: an entry point could not be imported or registered; the message names it.
    """
    global _manager
    with _lock:
        if _manager is None:
            manager = pluggy.PluginManager(PROJECT)
            manager.add_hookspecs(_HOOKSPECS)
            _load_entry_points(manager)
            _check_hook_names(manager, "An installed plugin")
            _manager = manager  # only a fully loaded manager is kept, so a failure retries
        return _manager


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    """Load the group one entry point at a time, so a failure can name the one that failed."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except Exception as exc:
            dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
            raise PluginError(
                f"Could not load interpolation plugin {ep.name!r} (entry point "
                f"'{ep.name} = {ep.value}' of {dist}): {type(exc).__name__}: {exc}. "
                f"Fix or uninstall {dist}."
            ) from exc


def _check_hook_names(manager: pluggy.PluginManager, what: str) -> None:
    """Reject a marked hook with a misspelled name, which would otherwise be silently ignored."""
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{what} has an unknown hook: {exc}") from exc


def strategies() -> Mapping[str, StrategyInfo]:
    """Return every installed interpolation strategy, by name, in sorted order.

    Returns:
        A read-only mapping from strategy name to :class:`StrategyInfo`.

    Raises:
        PluginError: a plugin failed to load, its hook raised or returned something other than
            a mapping of names to factories, or two plugins register the same name (the
            message names both sources).

    Example:
        >>> sorted(strategies())[:3]
        ['clock', 'constant', 'loss']
    """
    global _table
    with _lock:
        if _table is None:
            _table = _collect(plugin_manager())
        return _table


def _collect(manager: pluggy.PluginManager) -> Mapping[str, StrategyInfo]:
    """Call each plugin's hook on its own, so every name is attributed to its plugin."""
    dists = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
    found: dict[str, StrategyInfo] = {}
    for impl in manager.hook.dpwa_register_interpolations.get_hookimpls():
        try:
            provided = impl.function()
        except Exception as exc:
            raise PluginError(
                f"The dpwa_register_interpolations hook of plugin {impl.plugin_name!r} raised "
                f"{type(exc).__name__}: {exc}. Fix or remove that plugin."
            ) from exc
        if not isinstance(provided, Mapping):
            raise PluginError(
                f"The dpwa_register_interpolations hook of plugin {impl.plugin_name!r} must "
                f"return a mapping of names to factories, got {type(provided).__name__}."
            )
        for name, factory in provided.items():
            if not isinstance(name, str) or not name or not callable(factory):
                raise PluginError(
                    f"Plugin {impl.plugin_name!r} registers {name!r}: {factory!r}; a strategy "
                    "needs a non-empty string name and a callable factory."
                )
            source = _describe_source(impl.plugin_name, factory, dists.get(id(impl.plugin)))
            if name in found:
                raise PluginError(
                    f"Interpolation {name!r} is registered twice: by {found[name].source} and "
                    f"by {source}. Uninstall or unregister one of them."
                )
            found[name] = StrategyInfo(name=name, factory=factory, source=source)
    return MappingProxyType(dict(sorted(found.items())))


def _describe_source(plugin_name: str, factory: object, dist: Any | None) -> str:
    """Say where a factory came from: a distribution and module, or a run-time registration."""
    module = getattr(factory, "__module__", None) or plugin_name
    if dist is None:
        return f"registered at run time (plugin {plugin_name!r}, module {module})"
    return f"{dist.project_name} {dist.version} ({module})"


def register(plugin: object, name: str | None = None) -> None:
    """Register a plugin at run time, as an installed entry point would be (tests, notebooks).

    The plugin is any object or module with a ``dpwa_register_interpolations`` function marked
    with :data:`dpwa_core.hookspec.hookimpl`. Registration is all or nothing: if the new names
    clash with installed ones, the plugin is unregistered again and the error raised.

    Args:
        plugin: the plugin object or module.
        name: the plugin's name; defaults to pluggy's canonical name for the object.

    Raises:
        PluginError: the plugin is already registered, is not a valid plugin, its hook fails,
            or it registers a name another plugin already has.

    Example:
        >>> from dpwa_core.hookspec import hookimpl
        >>> class Halfway:
        ...     @hookimpl
        ...     def dpwa_register_interpolations(self):
        ...         return {"halfway": lambda: lambda clock, peer_clock, loss, peer_loss: 0.5}
        >>> register(Halfway(), name="halfway")  # doctest: +SKIP
    """
    global _table
    with _lock:
        manager = plugin_manager()
        try:
            manager.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"Cannot register plugin {name or plugin!r}: {exc}") from exc
        _table = None
        try:
            _check_hook_names(manager, f"Plugin {manager.get_name(plugin)!r}")
            strategies()
        except PluginError:
            manager.unregister(plugin)
            _table = None
            raise


def unregister(plugin: object) -> None:
    """Remove a plugin registered with :func:`register` (or an installed one); no-op if absent.

    Args:
        plugin: the plugin object or module that was registered.
    """
    global _table
    with _lock:
        manager = plugin_manager()
        if manager.get_name(plugin) is not None:
            manager.unregister(plugin)
            _table = None


def make_strategy(name: str, section: Mapping[str, Any] | None = None) -> Strategy:
    """Build the strategy ``name`` from the options of its config section.

    Args:
        name: an installed strategy name, e.g. ``"constant"``.
        section: keyword arguments for the strategy's factory; ``None`` means none.

    Returns:
        A strategy whose every factor is checked: it returns a Python float in ``[0, 1]`` or
        raises :class:`~dpwa_core.errors.InterpolationError`.

    Raises:
        PluginError: no strategy has this name (the message lists the installed ones), or the
            factory failed in a way that is the plugin's fault.
        ConfigError: the factory rejected the options (a ``TypeError`` or ``ValueError``).

    Example:
        >>> make_strategy("clock")(clock=100, peer_clock=300, loss=1.0, peer_loss=1.0)
        0.75
    """
    info = strategy_info(name)
    options = dict(section or {})
    try:
        strategy = info.factory(**options)
    except (TypeError, ValueError) as exc:
        # A TypeError is most often a misspelled option: list the ones the factory takes.
        accepted = _accepted_options(info.factory) if isinstance(exc, TypeError) else ""
        raise ConfigError(
            f"Invalid options {options!r} for interpolation {name!r}: {exc}.{accepted}"
        ) from exc
    except Exception as exc:
        raise PluginError(
            f"Building interpolation {name!r} from {info.source} raised "
            f"{type(exc).__name__}: {exc}."
        ) from exc
    if not callable(strategy):
        raise PluginError(
            f"The factory of interpolation {name!r} from {info.source} returned "
            f"{strategy!r}, which is not callable."
        )
    return _CheckedStrategy(info, strategy)


def strategy_info(name: str) -> StrategyInfo:
    """Return the installed strategy called ``name``.

    Args:
        name: a strategy name, e.g. ``"constant"``.

    Returns:
        Its :class:`StrategyInfo`.

    Raises:
        PluginError: no installed strategy has this name; the message lists those that do.
    """
    installed = strategies()
    info = installed.get(name)
    if info is None:
        raise PluginError(_not_found_message(name, list(installed)))
    return info


def _not_found_message(name: object, installed: list[str]) -> str:
    """The OpenTelemetry-style message for an unknown strategy name."""
    message = (
        f"Interpolation {name!r} not found. It is either misspelled or not installed. "
        f"Installed: {', '.join(installed)}."
    )
    if isinstance(name, str):
        close = difflib.get_close_matches(name, installed, n=1)
        if close:
            message += f" Did you mean {close[0]!r}?"
    return message


def _accepted_options(factory: StrategyFactory) -> str:
    """Name the keyword arguments a factory takes, when its signature can be read."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return ""
    names = [p.name for p in parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return f" Accepted options: {', '.join(names)}." if names else " It accepts no options."


class _CheckedStrategy:
    """Wraps a strategy so a bad factor fails loudly instead of corrupting the model."""

    def __init__(self, info: StrategyInfo, strategy: Strategy) -> None:
        self.name = info.name
        self._source = info.source
        self._strategy = strategy

    def __call__(self, clock: float, peer_clock: float, loss: float, peer_loss: float) -> float:
        """Return the wrapped strategy's factor as a float, checked to be finite in [0, 1]."""
        try:
            # Positional, as the Strategy protocol documents: plugins may name parameters freely.
            result = self._strategy(clock, peer_clock, loss, peer_loss)
        except Exception as exc:
            raise InterpolationError(
                f"{self._call(clock, peer_clock, loss, peer_loss)} raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not (isinstance(result, numbers.Real) and math.isfinite(result) and 0 <= result <= 1):
            raise InterpolationError(
                f"{self._call(clock, peer_clock, loss, peer_loss)} returned {result!r}; "
                "a factor must be a finite number in [0, 1]. Fix the strategy."
            )
        return float(result)

    def _call(self, clock: float, peer_clock: float, loss: float, peer_loss: float) -> str:
        """Describe one call, for error messages (built only when there is an error)."""
        return (
            f"Interpolation {self.name!r} ({self._source}) called with clock={clock!r}, "
            f"peer_clock={peer_clock!r}, loss={loss!r}, peer_loss={peer_loss!r}"
        )

    def __repr__(self) -> str:
        return f"<checked {self.name!r} strategy {self._strategy!r}>"
