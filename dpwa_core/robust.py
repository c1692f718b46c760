"""Robust blending: what a member that knows the secret can do to our model is bounded.

Configured by the ``robust`` section (docs/CONFIG.md); on by default.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RobustSettings"]


@dataclass(frozen=True)
class RobustSettings:
    """The ``robust`` config section.

    Args:
        clip: clip ``peer - local`` to a radius adapted from recent distances (self-centered
            clipping, He, Karimireddy and Jaggi 2022).
        clip_scale: the radius is this many times the median of the recent distances.
        clip_window: how many recent distances the median is taken over.
        max_clock_lead: a peer's claimed clock counts at most this many times ours.
    """

    clip: bool = True
    clip_scale: float = 2.0
    clip_window: int = 16
    max_clock_lead: float = 2.0
