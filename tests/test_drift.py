"""Drift correction (dpwa_core/drift.py): the arithmetic, its bound, and what it learns.

The unit tests check the exact update; the two-node tests run real nodes with real sockets
whose models drift apart on purpose (a constant push per step each, in opposite directions, as
label-skewed shards do) and assert the mechanism: the correction learned points against each
node's own push, and it closes most of the gap that plain blends leave.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dpwa_core import ConfigError, Node, load_config
from dpwa_core.drift import BOUND, LEAK, DriftCorrection

Cluster = Callable[..., dict[str, Any]]


def test_the_first_blend_is_plain_and_later_ones_add_what_was_learned() -> None:
    drift = DriftCorrection(10, rate=0.2)
    lead = np.ones(10, np.float32)
    drift.apply(lead, factor=0.5, steps=2)
    assert np.all(lead == 1.0)  # nothing learned before the first blend
    assert np.allclose(drift.c, 0.2 * 0.5 / 2)  # rate * factor * lead / steps
    lead = np.ones(10, np.float32)
    drift.apply(lead, factor=0.5, steps=2)
    # The blend adds factor * lead + c * steps: lead grows by c * steps / factor.
    assert np.allclose(lead, 1.0 + 0.05 * 2 / 0.5)
    assert np.allclose(drift.c, LEAK * 0.05 + 0.05)
    assert drift.blends == 2
    assert math.isclose(drift.last_norm, 2 * 0.05 * math.sqrt(10), rel_tol=1e-6)


def test_the_correction_is_bounded_by_the_blends_own_lead() -> None:
    drift = DriftCorrection(4, rate=1.0)
    drift.apply(np.full(4, 100.0, np.float32), factor=1.0, steps=1)  # learns c = 100
    lead = np.full(4, 1.0, np.float32)
    drift.apply(lead, factor=0.5, steps=10)  # c * steps = 1000 per value, far past the bound
    added = 0.5 * (lead - 1.0)  # what the blend moves the model by beyond its plain lead
    assert math.isclose(float(np.linalg.norm(added)), BOUND * 0.5 * 2.0, rel_tol=1e-5)
    assert math.isclose(drift.last_norm, BOUND * 0.5 * 2.0, rel_tol=1e-6)
    zero = np.zeros(4, np.float32)
    drift.apply(zero, factor=0.5, steps=3)
    assert np.all(zero == 0.0)  # a blend with no lead gets no correction either


def test_nothing_happens_without_a_factor_or_a_step() -> None:
    drift = DriftCorrection(3, rate=0.5)
    drift.apply(np.ones(3, np.float32), 1.0, 1)
    learned = drift.c.copy()
    for factor, steps in ((0.0, 5), (0.5, 0)):
        lead = np.ones(3, np.float32)
        drift.apply(lead, factor, steps)
        assert np.all(lead == 1.0) and np.array_equal(drift.c, learned)
    assert drift.blends == 1


def test_an_overflowing_lead_resets_the_correction_and_is_left_alone() -> None:
    drift = DriftCorrection(3, rate=0.5)
    drift.apply(np.ones(3, np.float32), 1.0, 1)
    huge = np.full(3, 3e38, np.float32)  # finite, but its squared length is not
    drift.apply(huge, 0.5, 1)
    assert np.all(huge == np.float32(3e38)) and np.all(drift.c == 0.0)
    assert np.isfinite(drift.c).all()


def test_a_slice_reads_and_learns_only_its_own_elements() -> None:
    drift = DriftCorrection(8, rate=0.5)
    drift.apply(np.ones(8, np.float32), factor=1.0, steps=1)  # c = 0.5 everywhere
    lead = np.full(4, 2.0, np.float32)
    drift.apply(lead, factor=0.5, steps=4, offset=4)  # the second half, once every 4 steps
    # The blend adds c * steps there (0.5 * 4 = 2 per value, within the bound 2 * 0.5 * 4).
    assert np.allclose(0.5 * (lead - 2.0), 2.0)
    assert np.allclose(drift.c[:4], 0.5)  # the first half is untouched
    assert np.allclose(drift.c[4:], LEAK * 0.5 + 0.5 * 0.5 * 2.0 / 4)
    assert math.isclose(drift._c_sq, float(np.dot(drift.c, drift.c)), rel_tol=1e-5)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, math.nan])
def test_a_rate_outside_0_1_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="drift correction rate"):
        DriftCorrection(3, rate)


def test_config_default_and_range(make_cluster: Cluster) -> None:
    assert load_config(make_cluster(2)).drift_correction == 0.2
    assert load_config(make_cluster(2, drift_correction=0)).drift_correction == 0.0
    for bad in (-0.1, 1.5, "fast", True):
        with pytest.raises(ConfigError, match="drift_correction"):
            load_config(make_cluster(2, drift_correction=bad))


def _drift_apart(config: dict[str, Any], steps: int) -> tuple[float, list[Node], np.ndarray]:
    """Two nodes, each pushed 0.01 per step along +push or -push plus a third as much noise
    (SGD's); returns the mean gap over the second half of the steps."""
    size = 2000
    push = np.where(np.arange(size) % 2 == 0, 1.0, -1.0).astype(np.float32) * 0.01
    noise = np.random.default_rng(0)
    nodes = [Node(config, "w1"), Node(config, "w2")]
    params = [np.zeros(size, np.float32), np.zeros(size, np.float32)]
    gaps = []
    try:
        for step in range(steps):
            for sign, node, p in zip((1.0, -1.0), nodes, params, strict=True):
                p += sign * push + noise.normal(0.0, 0.003, size).astype(np.float32)
                node.step(p, 1.0)
            if step >= steps // 2:
                gaps.append(float(np.linalg.norm(params[0] - params[1])))
            time.sleep(0.002)
        gap = float(np.mean(gaps))
    finally:
        for node in nodes:
            node.close()
    return gap, nodes, push


def test_real_nodes_learn_to_cancel_their_own_push(make_cluster: Cluster) -> None:
    """The correction each node learned points against its own push (the mechanism)."""
    _, (a, b), push = _drift_apart(make_cluster(2), steps=400)
    for node, sign in ((a, 1.0), (b, -1.0)):
        assert node._drift is not None and node._drift.blends >= 10, node.stats()
        c = node._drift.c
        cosine = float(np.dot(c, sign * push) / (np.linalg.norm(c) * np.linalg.norm(push)))
        assert cosine < -0.8, cosine


def test_drift_correction_closes_the_gap_plain_blends_leave(make_cluster: Cluster) -> None:
    plain, nodes, _ = _drift_apart(make_cluster(2, drift_correction=0), steps=400)
    assert all(node._drift is None for node in nodes)
    corrected, nodes, _ = _drift_apart(make_cluster(2), steps=400)
    # Plain blends leave a gap of a few steps' pushes; the correction removes about
    # 60% of it here (the noise floor remains).
    print(f"gap after 400 steps: plain {plain:.3f}, corrected {corrected:.3f}")
    assert corrected < 0.6 * plain, (corrected, plain)
