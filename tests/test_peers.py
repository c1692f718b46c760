"""Flow control: failing peers are picked rarely, and come back after a success."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from dpwa_core.peers import MIN_SCORE, PeerTable, exponential_hop


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


@pytest.mark.parametrize("count", range(2, 18))
def test_every_round_of_the_exponential_graph_is_a_permutation_without_fixed_points(
    count: int,
) -> None:
    hops = (count - 1).bit_length()
    for round_ in range(2 * hops):
        asked = [exponential_hop(i, count, round_) for i in range(count)]
        assert sorted(asked) == list(range(count))  # nobody is asked by two pullers
        assert all(a != i for i, a in enumerate(asked))  # nobody asks itself


@pytest.mark.parametrize("count", [2, 4, 8, 16])
def test_blends_at_half_along_the_exponential_graph_reach_the_exact_average(count: int) -> None:
    values = np.random.default_rng(count).normal(size=count)
    for round_ in range((count - 1).bit_length()):
        values = (values + values[[exponential_hop(i, count, round_) for i in range(count)]]) / 2
    assert np.allclose(values, values.mean())


def test_exponential_hop_refuses_a_position_outside_the_ring() -> None:
    with pytest.raises(ValueError, match="position"):
        exponential_hop(4, 4, 0)
    with pytest.raises(ValueError, match="position"):
        exponential_hop(0, 1, 0)


def scheduled_table() -> PeerTable:
    peers = [(name, "127.0.0.1", 1000 + i) for i, name in enumerate("bcd")]
    return PeerTable(peers, random.Random(0), ring=["a", "b", "c", "d"], me="a")


def test_next_peer_follows_the_schedule_and_a_failed_peer_gives_way_to_the_draw() -> None:
    peers = scheduled_table()
    names = []
    for _ in range(4):
        chosen = peers.next_peer()
        assert chosen is not None
        names.append(chosen.name)
    assert names == ["b", "c", "b", "c"]  # a at 0 of 4: hops of 1 and 2
    assert peers.rounds == peers.scheduled == 4
    peers.record_failure("b")  # score 0.5, under SCHEDULED_SCORE
    drawn = Counter()
    for _ in range(200):
        chosen = peers.next_peer()
        assert chosen is not None
        drawn[chosen.name] += 1
    assert peers.scheduled == 4 + 100  # only c's rounds were scheduled
    assert drawn["d"] > 0  # the draw reaches the peer the schedule never names for a
    peers.record_success("b")  # 0.75: scheduled again
    assert [peers.next_peer().name for _ in range(2)] == ["b", "c"]  # type: ignore[union-attr]


def test_a_random_table_never_schedules_and_a_bad_ring_is_refused() -> None:
    peers = table()
    for _ in range(10):
        peers.next_peer()
    assert peers.rounds == 10 and peers.scheduled == 0
    with pytest.raises(ValueError, match="ring"):
        PeerTable([], ring=["a", "b"], me="z")
    with pytest.raises(ValueError, match="ring"):
        PeerTable([], ring=["a", "a"], me="a")
