"""The ``constant`` strategy: always take the same fraction of the peer's model."""

from __future__ import annotations

import math

__all__ = ["Constant"]


class Constant:
    """Take a fixed fraction of the peer's model on every pull (the papers' choice).

    Args:
        value: the interpolation factor, a number in ``[0, 1]``; 0.5 averages the two models.

    Raises:
        ValueError: ``value`` is not a finite number in ``[0, 1]``.

    Example:
        >>> Constant(value=0.25)(clock=10, peer_clock=20, loss=1.0, peer_loss=2.0)
        0.25
    """

    def __init__(self, value: float = 0.5) -> None:
        # bool is an int to Python, but `value: true` in a config is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"value must be a number in [0, 1], got {value!r}")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"value must be in [0, 1], got {value!r}")
        self.value = float(value)

    def __call__(self, clock: float, peer_clock: float, loss: float, peer_loss: float) -> float:
        """Return ``value``, whatever the clocks and losses."""
        return self.value

    def __repr__(self) -> str:
        return f"Constant(value={self.value!r})"
