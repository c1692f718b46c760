"""Flow control: failing peers are picked rarely, and come back after a success."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dpwa_core.peers import MIN_SCORE, PeerTable


def table() -> PeerTable:
    return PeerTable(
        [("a", "127.0.0.1", 1001), ("b", "127.0.0.1", 1002), ("c", "127.0.0.1", 1003)],
        random.Random(0),
    )


def test_scores_move_as_documented() -> None:
    peers = table()
    peers.record_failure("a")
    peers.record_timeout("b")
    assert peers.scores() == {"a": 0.5, "b": 0.25, "c": 1.0}
    peers.record_success("b")
    assert peers.scores()["b"] == pytest.approx(0.625)
    for _ in range(20):
        peers.record_timeout("a")
    assert peers.scores()["a"] == MIN_SCORE


def test_a_dead_peer_is_rarely_chosen_but_still_probed() -> None:
    peers = table()
    for _ in range(10):
        peers.record_failure("c")
    picks = Counter(p.name for p in (peers.choose() for _ in range(4000)) if p)
    assert picks["c"] < 0.02 * 4000
    assert picks["c"] > 0  # still probed now and then, so it can come back
    assert abs(picks["a"] - picks["b"]) < 0.1 * 4000


def test_a_peer_that_comes_back_is_used_again() -> None:
    peers = table()
    for _ in range(10):
        peers.record_failure("c")
    for _ in range(4):
        peers.record_success("c")
    assert peers.scores()["c"] > 0.9


def test_add_remove_and_choose_empty() -> None:
    peers = PeerTable([], random.Random(0))
    assert peers.choose() is None
    peers.add("x", "127.0.0.1", 5000)
    chosen = peers.choose()
    assert chosen is not None and chosen.address == ("127.0.0.1", 5000)
    with pytest.raises(KeyError, match="no peer named 'y'; peers: x"):
        peers.remove("y")
    with pytest.raises(ValueError, match="outside 1..65535"):
        peers.add("z", "127.0.0.1", 70000)
    peers.remove("x")
    assert peers.names() == []


def test_counts_report_each_peers_outcomes() -> None:
    peers = table()
    peers.record_success("a")
    peers.record_failure("b")
    peers.record_timeout("b")
    counts = peers.counts()
    assert counts["a"] == {"score": 1.0, "ok": 1, "failed": 0, "timed_out": 0, "seconds": None}
    assert counts["b"] == {"score": 0.125, "ok": 0, "failed": 1, "timed_out": 1, "seconds": None}
    assert counts["c"]["ok"] == counts["c"]["failed"] == 0


def test_pull_time_is_a_moving_average() -> None:
    peers = table()
    peers.record_success("a", 1.0)
    peers.record_success("a", 2.0)
    assert peers.counts()["a"]["seconds"] == pytest.approx(1.3)
    peers.record_success("a")  # not timed: the average stays
    assert peers.counts()["a"]["seconds"] == pytest.approx(1.3)
