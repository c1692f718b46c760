"""The race's "stays from" figure: the mark from which the mean accuracy stays at the target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
race = pytest.importorskip("benchmarks.race")


def test_held_from_is_the_start_of_the_last_run_at_target() -> None:
    curve = [(0.0, 0.1), (1.0, 0.91), (2.0, 0.8), (3.0, 0.9), (4.0, 0.95), (5.0, 0.92)]
    assert race.held_from(curve, 0.9) == 3.0  # reached at 1 s, dropped, stayed from 3 s


def test_held_from_is_none_when_the_run_ends_below_target() -> None:
    assert race.held_from([(0.0, 0.95), (1.0, 0.85)], 0.9) is None
    assert race.held_from([], 0.9) is None
