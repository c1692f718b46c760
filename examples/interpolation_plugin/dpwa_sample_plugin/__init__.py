"""A sample dpwa plugin: the ``annealed`` interpolation strategy.

Install it (``pip install examples/interpolation_plugin``) and a config can say::

    interpolation: annealed
    annealed: {start: 0.5, end: 0.05, half_life: 10000}

Example:
    >>> strategy = Annealed(start=0.5, end=0.0, half_life=100)
    >>> strategy(clock=100, peer_clock=0, loss=1.0, peer_loss=1.0)
    0.25
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from dpwa_core.hookspec import StrategyFactory, hookimpl

__all__ = ["Annealed", "dpwa_register_interpolations"]


class Annealed:
    """Start by averaging hard, then trust the local model more as it trains.

    The factor starts at ``start`` and approaches ``end``, halving the gap every ``half_life``
    units of our own clock: ``end + (start - end) * 0.5 ** (clock / half_life)``. Early on the
    nodes pull each other together; later each keeps most of what it learned.

    Args:
        start: the factor at clock 0, in ``[0, 1]``.
        end: the factor the strategy approaches, in ``[0, 1]``.
        half_life: clock units (samples trained) over which the gap to ``end`` halves, > 0.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(self, start: float = 0.5, end: float = 0.0, half_life: float = 10_000) -> None:
        for name, value in (("start", start), ("end", end)):
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not (isinstance(half_life, (int, float)) and math.isfinite(half_life) and half_life > 0):
            raise ValueError(f"half_life must be a positive number, got {half_life!r}")
        self.start = float(start)
        self.end = float(end)
        self.half_life = float(half_life)

    def __call__(self, clock: float, peer_clock: float, loss: float, peer_loss: float) -> float:
        """Return the factor for our current clock; the peer's state does not matter."""
        age = max(float(clock), 0.0) / self.half_life
        return self.end + (self.start - self.end) * math.pow(0.5, age)


@hookimpl
def dpwa_register_interpolations() -> Mapping[str, StrategyFactory]:
    """Tell dpwa about this plugin's strategies: name -> factory."""
    return {"annealed": Annealed}
