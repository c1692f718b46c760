"""The hooks a dpwa plugin may implement.

A plugin is any module or object with functions marked ``@dpwa_core.hookimpl``. It is found
through the entry-point group ``dpwa.interpolation``; dpwa's own strategies (constant, clock,
loss) are registered the same way.

Example plugin module::

    import dpwa_core

    class Halfway:
        def __call__(self, clock, peer_clock, loss, peer_loss):
            return 0.5

    @dpwa_core.hookimpl
    def dpwa_register_interpolations():
        return {"halfway": Halfway}

and in the plugin's ``pyproject.toml``::

    [project.entry-points."dpwa.interpolation"]
    halfway = "my_package.my_module"
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import pluggy

__all__ = ["PROJECT", "Strategy", "StrategyFactory", "hookimpl", "hookspec"]

PROJECT = "dpwa"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Strategy(Protocol):
    """An interpolation strategy: computes how much of the peer's model to take.

    Called as ``strategy(clock, peer_clock, loss, peer_loss)`` and returns the factor ``f`` in
    ``[0, 1]``; the node then applies ``local = (1 - f) * local + f * peer``.
    """

    def __call__(self, clock: float, peer_clock: float, loss: float, peer_loss: float) -> float:
        """Return the interpolation factor for one pull."""
        ...


StrategyFactory = Callable[..., Strategy]
"""Builds a strategy from its config section: ``factory(**section) -> Strategy``."""


@hookspec
def dpwa_register_interpolations() -> Mapping[str, StrategyFactory]:  # type: ignore[empty-body]
    """Return the interpolation strategies this plugin provides.

    Returns:
        A mapping from strategy name (what a config's ``interpolation:`` key names) to a
        factory. The factory is called with the keyword arguments of the config section of
        the same name (``constant: {value: 0.5}`` gives ``factory(value=0.5)``) and returns a
        callable ``(clock, peer_clock, loss, peer_loss) -> float``.

    A name registered by two plugins is an error that names both.
    """
