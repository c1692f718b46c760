"""Drift correction: cancel the part of a node's own progress that its peers keep pulling back.

On label-skewed shards each node's gradient has a steady bias toward its own classes, and
pair-wise blends, which only halve the distance to one peer now and then, leave every node a
steady distance from the others (a proportional controller leaves a steady-state error under a
constant disturbance). Each blend tells the node which way its peers pull it: the blended lead
``f * (peer - reference)``. :class:`DriftCorrection` keeps a leaky average of those leads per
step, ``c``, and adds ``c * k`` (``k`` = training steps since the last blend) to the next
blend: the integral term of the controller. It learns ``c`` ~ minus the node's own bias, which
is what gradient tracking (D^2, Tang et al. 2018) gets by sending a second vector; here it costs
no byte, only one model-sized float32 buffer and one pass over it per blend (two for a slice,
whose share of ``c`` is measured first; the lead's length comes with the pull, see
:func:`dpwa_core.delta.subtract_squared`).

The correction added at one blend is at most :data:`BOUND` times as long as the blend's own
lead ``f * ||peer - reference||`` (which ``robust.clip`` bounds), so a peer can move the model
by at most ``1 + BOUND`` times what a plain blend allows.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DriftCorrection"]

_CHUNK = 64 * 1024
BOUND = 2.0
"""The correction added at one blend is at most this many times the blend's own lead."""
LEAK = 0.98
"""Share of ``c`` kept at each blend: older pulls are forgotten, so ``c`` follows a bias that
changes as training goes on (about the last 50 blends count)."""
_MAX_STEPS = 1000  # a longer gap (a node that paused) counts as this many steps


class DriftCorrection:
    """The per-step correction ``c`` of one node (see the module docstring).

    Args:
        size: elements of the model's flat buffer.
        rate: weight of a blend's lead per step in ``c``: ``c = LEAK * c + rate * lead / k``
            (the config's ``drift_correction``), in ``(0, 1]``.
    """

    def __init__(self, size: int, rate: float) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"drift correction rate must be in (0, 1], got {rate!r}")
        self.rate = rate
        self.c = np.zeros(size, np.float32)
        """The learned correction per training step, float32 like the model."""
        self.blends = 0
        """Blends corrected so far."""
        self.last_norm = 0.0
        """Length of the correction added at the last blend."""
        self._c_sq = 0.0  # ||c||**2, kept up to date by apply()
        # Two chunk-sized scratch buffers, allocated once: apply() runs on every pull.
        self._lesson = np.empty(min(_CHUNK, size), np.float32)
        self._added = np.empty(min(_CHUNK, size), np.float32)

    def apply(
        self,
        lead: np.ndarray,
        factor: float,
        steps: int,
        offset: int = 0,
        *,
        squares: float | None = None,
    ) -> None:
        """Add the correction to a blend and learn from it, in place.

        Args:
            lead: ``peer - reference`` (clipped), which the caller blends with ``factor``; on
                return it holds ``lead + c * steps / factor`` (``c`` as it was before this
                blend, shortened to the bound), so the blend adds ``factor * lead + c * steps``.
                For a slice of the model (:mod:`dpwa_core.slices`), the slice's lead only:
                ``c`` is then read and learned on those elements.
            factor: the blend's interpolation factor; nothing is done when it is 0.
            steps: training steps since these elements were last blended; nothing is done
                below 1.
            offset: where ``lead`` starts in the model (0 for the whole model).
            squares: ``||lead||**2`` when the caller knows it already (the puller sums it as
                the answer lands), which saves a pass over the lead.
        """
        if not factor > 0 or steps < 1:
            return
        steps = min(steps, _MAX_STEPS)
        c = self.c[offset : offset + lead.size]
        whole = c.size == self.c.size
        lead_sq = 0.0 if squares is None else squares
        old_sq = 0.0
        if squares is None or not whole:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is handled below
                for start in range(0, c.size, _CHUNK):
                    if squares is None:
                        part = lead[start : start + _CHUNK]
                        lead_sq += float(np.dot(part, part))
                    if not whole:
                        mine = c[start : start + _CHUNK]
                        old_sq += float(np.dot(mine, mine))
        if whole:
            old_sq = self._c_sq
        limit = BOUND * factor * math.sqrt(lead_sq)
        correction = steps * math.sqrt(old_sq)
        if not (math.isfinite(limit) and math.isfinite(correction)):
            self.c[...] = 0.0  # cannot happen with finite leads; never let it reach the model
            self._c_sq, self.last_norm = 0.0, 0.0
            return
        add = steps / factor
        if correction > limit:
            add = add * limit / correction if correction > 0 else 0.0
        self.last_norm = min(correction, limit)
        learn = np.float32(self.rate * factor / steps)
        keep, add32 = np.float32(LEAK), np.float32(add)
        c_sq = 0.0
        for start in range(0, c.size, _CHUNK):
            mine, theirs = c[start : start + _CHUNK], lead[start : start + _CHUNK]
            learned, added = self._lesson[: mine.size], self._added[: mine.size]
            np.multiply(theirs, learn, out=learned)  # this blend's lesson, from its own lead
            np.multiply(mine, add32, out=added)  # the correction learned before this blend
            theirs += added
            mine *= keep
            mine += learned
            c_sq += float(np.dot(mine, mine))
        self._c_sq = max(0.0, self._c_sq - old_sq) + c_sq if c.size < self.c.size else c_sq
        self.blends += 1
