"""Robust blending: what a member that knows the secret can do to our model is bounded.

Configured by the ``robust`` section (docs/CONFIG.md); on by default.

Self-centered clipping (He, Karimireddy and Jaggi, "Byzantine-robust decentralized learning via
self-centered clipping", 2022): before a pulled vector is blended, its difference to our own
published snapshot is clipped to a radius, ``peer <- local + min(1, radius / ||peer - local||) *
(peer - local)``, so one pull moves our model by at most ``factor * radius`` whatever the peer
sent. The radius is ``clip_scale`` times the median, over the peers, of each peer's median of
its last ``clip_window`` distances ``||peer - local||`` (all of them, clipped or not): a
minority of liars among the peers cannot move that median far however often they are pulled (a
liar that answers promptly keeps a high flow-control score while honest peers that time out lose
theirs, so a median over pulls could fill with its distances), and the radius follows the honest
distances as models converge or drift apart. Until the window is full (``clip_window`` distances
recorded in all) the radius is also at most ``clip_scale * ||local||``, so the first pulls,
before any history, cannot move the model by more than ``factor * clip_scale * ||local||``:
models started from different random weights (about ``sqrt(2) * ||local||`` apart) are shortened
a little during the warm-up but still blend, and a liar's first answer cannot wreck the model.
The one exception is a model of exactly all zeros, which gives no scale: its pulls are bounded
by the median alone (nothing before the first pull), so a liar that answers an all-zero node's
very first pull moves it once, by ``factor * ||peer||``; from then on the model has a norm and
the cap applies.

All arithmetic is chunked (one 64 Ki-element float32 scratch) and overflow-safe: a chunk whose
float32 sum of squares overflows is summed again in float64, and a clipped vector is rewritten
in float64 a chunk at a time.
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass

import numpy as np

__all__ = ["Clipper", "RobustSettings", "distance_and_norm"]

_CHUNK = 64 * 1024
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    clip_scale: float = 1.0
    clip_window: int = 16
    max_clock_lead: float = 2.0


def distance_and_norm(
    peer: np.ndarray, local: np.ndarray, scratch: np.ndarray, *, norm: bool
) -> tuple[float, float]:
    """``(||peer - local||, ||local||)`` of two 1-D float32 vectors, a chunk at a time.

    Args:
        peer: the received vector.
        local: our snapshot, same size.
        scratch: float32 buffer of at least ``min(size, 64 Ki)`` elements.
        norm: also compute ``||local||`` (else 0.0 is returned for it).

    Returns:
        Both Euclidean norms as Python floats; NaN when ``peer`` holds NaN.
    """
    squares = 0.0
    own = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, peer.size, _CHUNK):
            stop = min(start + _CHUNK, peer.size)
            part = scratch[: stop - start]
            mine = local[start:stop]
            np.subtract(peer[start:stop], mine, out=part)
            chunk = float(np.dot(part, part))
            if not math.isfinite(chunk):  # float32 overflowed (or NaN): redo in float64
                wide = peer[start:stop].astype(np.float64)
                wide -= mine
                chunk = float(np.dot(wide, wide))
            squares += chunk
            if norm:
                mine_sq = float(np.dot(mine, mine))
                if not math.isfinite(mine_sq):
                    wide = mine.astype(np.float64)
                    mine_sq = float(np.dot(wide, wide))
                own += mine_sq
    return math.sqrt(squares), math.sqrt(own)


def shrink_toward(peer: np.ndarray, local: np.ndarray, scale: float) -> None:
    """Rewrite ``peer`` in place as ``local + scale * (peer - local)``, in float64 chunks.

    ``scale`` in ``[0, 1]``; the result lies between ``local`` and ``peer``, clamped into the
    float32 range, so it is finite wherever both are.
    """
    for start in range(0, peer.size, _CHUNK):
        stop = min(start + _CHUNK, peer.size)
        mine = local[start:stop]
        wide = peer[start:stop].astype(np.float64)
        wide -= mine
        wide *= scale
        wide += mine
        np.clip(wide, -_FLOAT32_MAX, _FLOAT32_MAX, out=wide)
        np.copyto(peer[start:stop], wide, casting="unsafe")


class Clipper:
    """The clipping state of one node: recent distances, the radius, the counts.

    Not thread-safe: the node's puller thread calls :meth:`clip`; :meth:`stats` reads plain
    attributes.

    Args:
        settings: the ``robust`` section.
        size: number of parameters.
    """

    def __init__(self, settings: RobustSettings, size: int) -> None:
        self.settings = settings
        # Each peer's last distances: the radius is the median over peers of each one's median,
        # so a liar counts as one peer however often it is pulled (a prompt liar keeps a high
        # flow-control score while slow honest peers' scores fall).
        self._by_peer: dict[str, collections.deque[float]] = {}
        self._seen = 0  # distances recorded in all
        self._scratch = np.empty(min(size, _CHUNK), np.float32)
        self.radius: float | None = None
        """The radius of the last pull (None before the first)."""
        self.distance: float | None = None
        """``||peer - local||`` of the last pull, before clipping."""
        self.clipped = 0
        """Pulls whose vector was clipped."""
        self.by_peer: dict[str, int] = {}
        """Clipped pulls per peer name."""

    def clip(self, peer: np.ndarray, local: np.ndarray, name: str, scale: float = 1.0) -> bool:
        """Clip ``peer`` in place toward ``local``; True when it was clipped.

        Args:
            peer: the received vector (the node's receive buffer), rewritten when clipped.
            local: the snapshot the node published for this step.
            name: the peer's name, for the per-peer count.
            scale: for one slice of the model, ``sqrt(model size / slice size)``: distances
                and norms are scaled by it to whole-model terms, so that slices and whole
                pulls share one median and one radius.

        Returns:
            True when ``||peer - local||`` exceeded the radius and ``peer`` was shrunk to it.
            False otherwise, and for a vector holding NaN (accepted only with
            ``reject_nonfinite: false``), which is left alone.
        """
        distance, norm = distance_and_norm(peer, local, self._scratch, norm=self.warming)
        radius = self._radius(distance * scale, norm * scale, name)
        if radius is None:
            return False
        shrink_toward(peer, local, radius / (distance * scale))
        return True

    @property
    def warming(self) -> bool:
        """Whether the window is not full yet, so the radius is also capped by our norm."""
        return self._seen < self.settings.clip_window

    def clip_lead(
        self,
        lead: np.ndarray,
        squares: float,
        name: str,
        local: np.ndarray,
        scale: float = 1.0,
    ) -> float:
        """Clip a lead ``peer - local`` in place, given its sum of squares; the new sum.

        The same rule as :meth:`clip`, for a buffer the puller already turned into the lead
        (:func:`~dpwa_core.delta.subtract_squared` summed its squares as it landed), so
        clipping costs no pass unless it shortens the lead (one multiplication).

        Args:
            lead: ``peer - local`` (a staleness-corrected pull's lead, or a slice of it).
            squares: ``||lead||**2``; NaN when the lead holds NaN (then it is left alone).
            name: the peer's name, for the per-peer count.
            local: what the lead is measured from (the pull's reference); read only while the
                window fills, for its norm.
            scale: as for :meth:`clip`.

        Returns:
            ``||lead||**2`` after clipping.
        """
        distance = math.sqrt(squares) if squares >= 0 else math.nan
        norm = 0.0
        if self.warming and math.isfinite(distance):
            norm = distance_and_norm(local, local, self._scratch, norm=True)[1]
        radius = self._radius(distance * scale, norm * scale, name)
        if radius is None:
            return squares
        shrink = np.float32(radius / (distance * scale))
        for start in range(0, lead.size, _CHUNK):
            lead[start : start + _CHUNK] *= shrink  # at most 1: finite stays finite
        return squares * float(shrink) ** 2

    def _radius(self, distance: float, norm: float, name: str) -> float | None:
        """Record ``distance`` (whole-model terms); the radius to clip to, or None to keep."""
        settings = self.settings
        if not math.isfinite(distance):
            return None
        warming = self.warming
        medians = [statistics.median(d) for d in self._by_peer.values()]
        median = statistics.median(medians) if medians else math.inf
        radius = settings.clip_scale * median
        if warming and norm > 0:  # an all-zero model has no scale yet (see the module doc)
            radius = min(radius, settings.clip_scale * norm)
        recent = self._by_peer.get(name)
        if recent is None:
            recent = self._by_peer[name] = collections.deque(maxlen=settings.clip_window)
        recent.append(distance)
        self._seen += 1
        self.radius = radius
        self.distance = distance
        if distance <= radius:
            return None
        self.clipped += 1
        self.by_peer[name] = self.by_peer.get(name, 0) + 1
        return radius
