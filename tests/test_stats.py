"""``Node.stats()`` and the log: two real nodes on loopback, every counter checked."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

import numpy as np
import pytest
from conftest import cluster

from dpwa_core import Node
from dpwa_core.wire import HEADER

SIZE = 1000
ANSWER = HEADER.size + 4 * SIZE  # one PARAMS answer: header + float32 payload


def params(value: float) -> np.ndarray:
    return np.full(SIZE, value, np.float32)


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("dpwa") and r.levelno >= logging.WARNING and text in r.getMessage()
    ]


def wait_until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_counters_follow_pulls_bytes_factor_age_and_scores(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Over TCP, so every parameter byte crosses the socket and is counted.
    # The clock math below is unbounded: a peer's clock of 10 against our 3 is beyond the
    # default robust.max_clock_lead of 2.
    config = cluster(
        2,
        timeout_ms=10_000,
        constant={"value": 0.25},
        transport="tcp",
        robust={"max_clock_lead": 100.0},
    )
    with Node(config, "w1", seed=1) as a, Node(config, "w2", seed=2) as b:
        start = a.stats()
        assert (start["pulls_ok"], start["pulls_failed"], start["pulls_timed_out"]) == (0, 0, 0)
        assert (start["bytes_in"], start["bytes_out"]) == (0, 0)
        assert start["last_factor"] is None and start["last_age"] is None
        assert start["scores"] == {"w2": 1.0}

        # w2 publishes at clock 10. Its own pull finds w1 not started yet: no bytes move.
        b.update_send(params(2.0), 1.0, samples=10)
        assert b.update_wait(1.0) is None
        caplog.set_level(logging.DEBUG, logger="dpwa")
        caplog.clear()

        a.update_send(params(1.0), 2.0, samples=3)  # w1's clock: 3
        result = a.update_wait(2.0)
        assert result is not None and result.peer == "w2"
        stats = a.stats()
        assert (stats["pulls_ok"], stats["pulls_failed"], stats["pulls_timed_out"]) == (1, 0, 0)
        assert stats["bytes_in"] == ANSWER
        assert stats["last_factor"] == 0.25  # the constant strategy's value
        assert stats["last_age"] == 10 - 3  # peer clock minus ours, before blending
        assert stats["scores"] == {"w2": 1.0}
        # The pull's time splits into the peer's wait, the transfer and the work after it
        # (the puller adds it up a moment after it hands over the result).
        wait_until(lambda: a.stats()["pull_s"] > 0.0)
        stats = a.stats()
        assert stats["pull_s"] < 10.0
        # Both are counted: a round trip and a pass over the answer each take some time.
        assert stats["pull_wait_s"] > 0.0 and stats["pull_post_s"] > 0.0
        assert stats["pull_wait_s"] + stats["pull_post_s"] <= stats["pull_s"]
        # The server counts an answer once its send returns, which may be a moment after
        # the puller has it all.
        wait_until(lambda: (b.stats()["bytes_out"], b.stats()["pulls_served"]) == (ANSWER, 1))
        assert a.clock == 0.25 * 10 + 0.75 * 3

        # A second round: w2 pulls from w1 too, so bytes flow both ways.
        b.update_send(params(2.0), 1.0, samples=10)  # w2's clock: 20
        assert b.update_wait(1.0) is not None
        a.update_send(params(1.0), 2.0, samples=1)  # w1's clock: 4.75 + 1
        assert a.update_wait(2.0) is not None
        wait_until(lambda: (a.stats()["bytes_out"], a.stats()["pulls_served"]) == (ANSWER, 1))
        wait_until(lambda: b.stats()["bytes_out"] == 2 * ANSWER)
        stats, peer = a.stats(), b.stats()
        assert stats["pulls_ok"] == 2 and stats["bytes_in"] == 2 * ANSWER
        assert stats["last_age"] == 20 - 5.75
        assert peer["pulls_ok"] == 1 and peer["bytes_in"] == ANSWER
        assert peer["scores"] == {"w1": 1.0}
        # Successful pulls are not events worth a log line.
        assert [r for r in caplog.records if r.levelno >= logging.INFO] == []

        # w2 goes away: pulls fail, each failure halves its score, and the log says so once.
        b.close()
        for expected_score in (0.5, 0.25):
            a.update_send(params(1.0), 2.0)
            assert a.update_wait(2.0) is None
            assert a.stats()["scores"] == {"w2": expected_score}
        stats = a.stats()
        assert (stats["pulls_ok"], stats["pulls_failed"], stats["pulls_timed_out"]) == (2, 2, 0)
        assert stats["bytes_in"] == 2 * ANSWER  # nothing counted for failed pulls
        assert len(warnings(caplog, "pull from w2 failed")) == 1

        # w2 comes back: one INFO line says so, and its next outage warns again.
        with Node(config, "w2", seed=3) as again:
            again.update_send(params(2.0), 1.0)
            wait_until(lambda: _pull(a))
        recovered = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
        assert recovered == ["w1: w2 answers again after 2 failed pulls"]
        a.update_send(params(1.0), 2.0)
        assert a.update_wait(2.0) is None
        assert len(warnings(caplog, "pull from w2 failed")) == 2


def _pull(node: Node) -> bool:
    node.update_send(params(1.0), 2.0)
    return node.update_wait(2.0) is not None


def test_a_peer_not_started_yet_counts_as_not_ready() -> None:
    config = cluster(2, timeout_ms=10_000)
    with Node(config, "w1") as a, Node(config, "w2"):
        a.update_send(params(1.0), 1.0)  # w2 listens but has published nothing
        assert a.update_wait(1.0) is None
        stats = a.stats()
        assert (stats["pulls_failed"], stats["pulls_not_ready"]) == (0, 1)
        assert stats["scores"] == {"w2": 1.0}  # an idle peer is not penalised


def test_a_peer_that_never_answers_counts_as_timed_out(caplog: pytest.LogCaptureFixture) -> None:
    config = cluster(2, timeout_ms=1000)
    port = config["nodes"][1]["port"]
    # Accepted by the kernel's backlog, never answered: every pull waits out its deadline.
    with socket.create_server(("127.0.0.1", port)) as silent, Node(config, "w1") as node:
        assert silent.getsockname()[1] == port
        caplog.set_level(logging.DEBUG, logger="dpwa")
        for _ in range(2):
            node.update_send(params(1.0), 1.0)
            assert node.update_wait(1.0) is None
        stats = node.stats()
        assert (stats["pulls_ok"], stats["pulls_failed"], stats["pulls_timed_out"]) == (0, 0, 2)
        assert stats["bytes_in"] == 0 and stats["last_factor"] is None
        # Each timeout quarters the score; the puller may record the second one just after
        # update_wait gave up on it.
        wait_until(lambda: node.stats()["scores"] == {"w2": 0.25 * 0.25})
        assert len(warnings(caplog, "pull from w2 timed out")) == 1
