"""dpwa's builtin interpolation strategies: ``constant``, ``clock`` and ``loss``.

They are an ordinary plugin: dpwa's ``pyproject.toml`` declares this package in the
``dpwa.interpolation`` entry-point group, exactly as a third-party plugin would, and the
registry finds them the same way.

Example:
    >>> from dpwa_interpolation import dpwa_register_interpolations
    >>> sorted(dpwa_register_interpolations())
    ['clock', 'constant', 'loss']
"""

from __future__ import annotations

from collections.abc import Mapping

from dpwa_core.hookspec import StrategyFactory, hookimpl
from dpwa_interpolation.clock import Clock
from dpwa_interpolation.constant import Constant
from dpwa_interpolation.loss import Loss

__all__ = ["Clock", "Constant", "Loss", "dpwa_register_interpolations"]


@hookimpl
def dpwa_register_interpolations() -> Mapping[str, StrategyFactory]:
    """Register the builtin strategies under the names a config's ``interpolation:`` uses.

    Returns:
        ``{"clock": Clock, "constant": Constant, "loss": Loss}``.
    """
    return {"clock": Clock, "constant": Constant, "loss": Loss}
