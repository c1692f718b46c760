"""The ``clock`` strategy: weigh the peer by how much it has trained relative to us."""

from __future__ import annotations

from dpwa_interpolation._share import share

__all__ = ["Clock"]


class Clock:
    """Weigh the peer by its share of the two clocks: peer_clock / (clock + peer_clock).

    A clock counts the samples a model has trained on, so an older (more-trained) peer counts
    more. Two fresh models (both clocks 0) meet halfway. Negative clocks count as 0.

    Example:
        >>> Clock()(clock=100, peer_clock=300, loss=1.0, peer_loss=1.0)
        0.75
    """

    def __call__(self, clock: float, peer_clock: float, loss: float, peer_loss: float) -> float:
        """Return the peer's fraction of the combined clock, 0.5 when both are 0."""
        return share(peer_clock, clock)

    def __repr__(self) -> str:
        return "Clock()"
