"""Partial pulls: ask a peer for one slice of the model at a time, cycling through the slices.

On a slow link a whole-model pull runs under several training steps, and its blend lands that
many steps after it was asked: the peer's snapshot and our reference are that old. Cut the
model into ``n`` slices (:func:`~dpwa_core.wire.slice_bounds`) and pull one slice per pull, the
next one each time, and each exchange is ``n`` times shorter: the same bytes per second cross the
link, but every blend is fresher. In the lab (docs/RACE.md) that is what closes the gap that
label-skewed shards leave between nodes on a 100 Mbit/s link.

A slice is blended like a whole pull, with the same factor, on its elements only (elsewhere the
blend leaves the model as it is); the clock moves by the factor times the slice's share of the
model. Only non-blocking pulls (``step``) over TCP are sliced: a co-located peer (shared memory)
and a blocking pull are pulled whole.

:class:`SliceSchedule` decides the count. With ``pull_slices: auto`` it starts whole, and when a
pull takes more than :data:`HIGH` training steps from request to answer, or fewer than
:data:`LOW` while the model is cut, it rescales the count so that a pull would take
:data:`TARGET` steps (the count times the steps the last pull took over :data:`TARGET`,
rounded), between 1 and :data:`AUTO_MAX`: on a fast link pulls stay whole, on a slow one each
slice lands within about two steps, from the second pull on.
"""

from __future__ import annotations

__all__ = ["AUTO_MAX", "HIGH", "LOW", "TARGET", "SliceSchedule"]

AUTO_MAX = 16
"""The most slices ``pull_slices: auto`` cuts the model into."""
HIGH = 2.0
"""Training steps a pull may take before ``auto`` cuts the model into more slices."""
LOW = 0.75
"""Training steps under which ``auto`` cuts the model into fewer slices."""
TARGET = 1.5
"""Training steps ``auto`` aims a pull at when it rescales the count."""
_STEP_MEMORY = 0.9  # weight of the old step interval in its running average
_MAX_GAP = 60.0  # a longer pause between two steps (evaluation, a checkpoint) is not a step


class SliceSchedule:
    """How many slices the next pull cuts the model into, and which one it asks for.

    Args:
        setting: the config's ``pull_slices``: ``"auto"`` or a count from 1 (whole pulls).
        size: elements of the model's flat buffer (a model has at most one slice per element).
    """

    def __init__(self, setting: int | str, size: int) -> None:
        self.auto = setting == "auto"
        self._limit = max(1, min(size, AUTO_MAX if self.auto else int(setting)))
        self.slices = 1 if self.auto else self._limit
        """The count the next pull uses (1: the whole model)."""
        self.index = 0
        """The slice the next pull asks for."""
        self.sliced = 0
        """Pulls that landed holding one slice of a model cut into several."""
        self.step_s: float | None = None
        """Running average of the seconds between two training steps."""
        self._last_step: float | None = None

    def stepped(self, now: float) -> None:
        """Note a training step at ``now`` (``time.monotonic()``)."""
        last, self._last_step = self._last_step, now
        if last is None or not 0 < now - last < _MAX_GAP:
            return
        gap = now - last
        self.step_s = (
            gap if self.step_s is None else _STEP_MEMORY * self.step_s + (1 - _STEP_MEMORY) * gap
        )

    def landed(self, sliced: bool, over_tcp: bool, elapsed: float) -> None:
        """Note a pull that landed: move to the next slice, and let ``auto`` adjust the count.

        Args:
            sliced: the answer held one slice of several.
            over_tcp: the pull went over TCP (only those are ever sliced).
            elapsed: seconds from its request to its answer.
        """
        if sliced:
            self.sliced += 1
            self.index = (self.index + 1) % self.slices
        if not (self.auto and over_tcp and self.step_s):
            return
        steps = elapsed / self.step_s
        if steps > HIGH or (steps < LOW and self.slices > 1):
            wanted = round(self.slices * steps / TARGET)
            self.slices = max(1, min(self._limit, wanted))
        self.index %= self.slices
