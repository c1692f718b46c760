"""Swarm progress (dpwa_core.swarm): its arithmetic, and real nodes counting each other."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dpwa_core import Node, SwarmProgress
from dpwa_core.swarm import SwarmTracker


def test_the_estimate_sums_the_clocks_and_rates_of_the_nodes_heard_from() -> None:
    tracker = SwarmTracker(window=10.0)
    tracker.trained(0, now=0.0)
    tracker.trained(100, now=1.0)  # this node: 100 samples/s
    tracker.observe("w2", 50.0, now=0.0)
    tracker.observe("w2", 250.0, now=1.0)  # w2's clock grew 200/s
    tracker.observe("w3", 80.0, now=1.0)  # heard once: assumed to train at our rate
    progress = tracker.progress(clock=120.0, now=1.0)
    assert progress == SwarmProgress(samples=120.0 + 250.0 + 80.0, samples_per_s=400.0, nodes=3)
    # Two seconds on, each peer's clock is moved on at its rate.
    later = tracker.progress(clock=120.0, now=3.0)
    assert later.samples == pytest.approx(120.0 + (250.0 + 2 * 200.0) + (80.0 + 2 * 100.0))
    assert later.as_dict() == {"samples": later.samples, "samples_per_s": 400.0, "nodes": 3}


def test_a_peer_not_heard_within_the_window_or_gone_keeps_its_samples_but_not_its_node() -> None:
    tracker = SwarmTracker(window=5.0)
    tracker.observe("w2", 10.0, now=0.0)
    tracker.observe("w3", 10.0, now=4.0)
    # w2 was last heard 6 s ago: it counts its last clock, but as no node and with no rate.
    assert tracker.progress(clock=1.0, now=6.0) == SwarmProgress(21.0, 0.0, 2)
    tracker.forget("w3")  # its pull failed
    assert tracker.progress(clock=1.0, now=6.0) == SwarmProgress(21.0, 0.0, 1)
    assert tracker.progress(clock=12.0, now=7.0).samples == 32.0  # our own training goes on
    tracker.observe("w3", 20.0, now=8.0)  # back again: a node again
    assert tracker.progress(clock=12.0, now=8.0) == SwarmProgress(42.0, 2.5, 2)  # +10 in 4 s


def test_rates_ignore_a_clock_that_a_blend_lowered_and_answers_too_close_together() -> None:
    tracker = SwarmTracker(window=60.0)
    tracker.observe("w2", 100.0, now=0.0)
    assert tracker.progress(clock=0.0, now=0.0).samples == 100.0
    tracker.observe("w2", 90.0, now=1.0)  # blended toward a slower peer: no negative rate
    assert tracker.progress(clock=0.0, now=1.0).samples_per_s == 0.0
    assert tracker.progress(clock=0.0, now=1.0).samples == 100.0  # nor a falling estimate
    tracker.observe("w2", 190.0, now=2.0)  # +100 in 1 s: the latest growth is the rate
    rate = tracker.progress(clock=0.0, now=2.0).samples_per_s
    assert rate == pytest.approx(100.0)
    tracker.observe("w2", 1e6, now=2.05)  # too soon after the last one to measure a rate
    assert tracker.progress(clock=0.0, now=2.05).samples_per_s == pytest.approx(rate)
    assert tracker.progress(clock=0.0, now=2.05).samples == pytest.approx(1e6, rel=1e-3)
    tracker.observe("w2", float("nan"), now=3.0)  # ignored
    assert np.isfinite(tracker.progress(clock=0.0, now=3.0).samples)


def test_epoch_counts_whole_passes() -> None:
    assert SwarmProgress(2999.0, 10.0, 3).epoch(1000) == 2
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="samples_per_epoch"):
            SwarmProgress(1.0, 0.0, 1).epoch(bad)
    with pytest.raises(ValueError, match="window"):
        SwarmTracker(window=0)


def test_real_nodes_count_each_other_in_their_stats(
    make_cluster: Callable[..., dict[str, Any]],
) -> None:
    """Three nodes step until each has pulled from both peers: each counts 3 nodes, and its
    estimate is its clock plus its peers' clocks as last heard (moved on at their rates)."""
    config = make_cluster(3)
    config["start"] = "own"
    nodes = [Node(config, f"w{i}", seed=i) for i in (1, 2, 3)]
    try:
        params = {n: np.full(100, float(i), np.float32) for i, n in enumerate(nodes)}
        deadline = time.monotonic() + 30
        while not all(n.swarm().nodes == 3 for n in nodes):
            assert time.monotonic() < deadline, [n.stats() for n in nodes]
            for node, p in params.items():
                node.step(p, 1.0, samples=10)
            time.sleep(0.005)
        for node in nodes:
            stats = node.stats()
            assert stats["swarm_nodes"] == 3 and stats["samples"] == 10 * stats["steps"]
            # Each clock is at least 10 and the sum grows with the steps every node took.
            assert stats["swarm_samples"] >= stats["clock"] + 2 * 10
            assert stats["swarm_samples_per_s"] >= 0.0
    finally:
        for node in nodes:
            node.close()
