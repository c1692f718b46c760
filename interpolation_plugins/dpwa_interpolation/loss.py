"""The ``loss`` strategy: take more of the peer the worse our loss is compared with its."""

from __future__ import annotations

import math

from dpwa_interpolation._share import share

__all__ = ["Loss"]


class Loss:
    """Take more of the peer the worse our loss: loss / (loss + peer_loss).

    The worse our loss relative to the peer's, the more of the peer's model we take. Two
    equal losses (including both 0) meet halfway. Negative losses count as 0, and an infinite
    loss is simply the worst one.

    Example:
        >>> Loss()(clock=0, peer_clock=0, loss=3.0, peer_loss=1.0)
        0.75
    """

    def __call__(self, clock: float, peer_clock: float, loss: float, peer_loss: float) -> float:
        """Return our fraction of the combined loss, 0.5 when both are 0."""
        if math.isinf(loss) or math.isinf(peer_loss):
            # inf / (inf + x) would be NaN; the side with the infinite loss is the worse one.
            own, peer = max(loss, 0.0), max(peer_loss, 0.0)
            return 0.5 if own == peer else float(own > peer)
        return share(loss, peer_loss)

    def __repr__(self) -> str:
        return "Loss()"
