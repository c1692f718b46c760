"""The arithmetic the ``clock`` and ``loss`` strategies share."""

from __future__ import annotations


def share(part: float, other: float) -> float:
    """Return ``part / (part + other)``, negatives counting as 0 and 0 / 0 as an even split.

    A comparison rather than ``max(0, x)``: a NaN input must stay NaN so the registry's
    factor check rejects it instead of hiding it.
    """
    mine = 0.0 if part < 0 else float(part)
    theirs = 0.0 if other < 0 else float(other)
    total = mine + theirs
    if total == 0:
        return 0.5
    return mine / total
