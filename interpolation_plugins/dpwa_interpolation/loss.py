"""The ``loss`` strategy: take more of the peer the worse our loss is compared with its."""

from __future__ import annotations

import math

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
        # A comparison rather than max(0, x): a NaN loss must stay NaN so the caller rejects it.
        own = 0.0 if loss < 0 else float(loss)
        peer = 0.0 if peer_loss < 0 else float(peer_loss)
        if math.isinf(own) or math.isinf(peer):
            # inf / (inf + x) would be NaN; the side with the infinite loss is the worse one.
            return 0.5 if own == peer else float(own > peer)
        total = own + peer
        if total == 0:
            return 0.5
        return own / total

    def __repr__(self) -> str:
        return "Loss()"
