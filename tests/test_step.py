"""The non-blocking step, lazy publishing, and the shared start (start: shared) on loopback.

Every test runs real nodes with real sockets in this process and asserts the mechanism: who
blended what, which values reached which model, how many copies were made.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import dpwa_core
from dpwa_core import ConfigError, Node, load_config
from dpwa_core.wire import MIN_TRANSFER_RATE, recv_exact, send_all, transfer_deadline

Cluster = Callable[..., dict[str, Any]]


def steps_until(
    nodes: dict[Node, np.ndarray], done: Callable[[], bool], seconds: float = 20
) -> None:
    """Step every node (non-blocking) every few milliseconds until ``done()``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, {n.name: n.stats() for n in nodes}
        for node, params in nodes.items():
            node.step(params, 1.0)
        time.sleep(0.002)


def test_step_never_waits_and_blends_a_landed_pull_later(make_cluster: Cluster) -> None:
    """A pull that has not landed is left running; the step after it lands blends it."""
    config = make_cluster(2)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        pa, pb = np.zeros(1000, np.float32), np.full(1000, 8.0, np.float32)
        b.publish(pb, 1.0)
        first = a.step(pa, 1.0)  # starts the pull; it cannot have been blended yet
        assert first is None and a.stats()["pulls_ok"] == 0
        results = []
        deadline = time.monotonic() + 20
        while not results:
            assert time.monotonic() < deadline, a.stats()
            time.sleep(0.01)
            result = a.step(pa, 1.0)
            if result is not None:
                results.append(result)
        (result,) = results
        assert result.peer == "w2" and result.factor == 0.5 and not result.joined
        assert result.steps_behind >= 1  # requested at an earlier step than the blend
        assert np.all(pa == 4.0)  # blended in place, against the model as it was then
        stats = a.stats()
        assert stats["blocked_s"] == 0.0 and stats["last_steps_behind"] == result.steps_behind


def test_at_most_one_pull_in_flight(make_cluster: Cluster) -> None:
    config = make_cluster(2)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        pa = np.zeros(10, np.float32)
        b.publish(np.ones(10, np.float32), 1.0)
        a.publish(pa, 1.0)
        assert a.start_pull()
        assert not a.start_pull()  # one is in flight already
        assert a.collect(1.0, wait=True) is not None
        assert a.start_pull()


def test_nobody_pulling_costs_no_copy(make_cluster: Cluster) -> None:
    """Lazy publishing: the first step publishes, later ones only when a peer asked."""
    config = make_cluster(2, constant={"value": 0.0})  # blends keep each node's own values
    with Node(config, "w1") as a, Node(config, "w2") as b:
        pa = np.zeros(1000, np.float32)
        for _ in range(50):
            a.step(pa, 1.0)
        assert a.stats()["snapshots_published"] == 1 and a.stats()["steps"] == 50
        # A peer's pull asks for a fresh copy: the next step makes exactly one.
        b.publish(np.zeros(1000, np.float32), 1.0)
        assert b.start_pull(blocking=True)
        got = b.collect(1.0, wait=True)
        assert got is not None and got.peer == "w1"
        a.step(pa, 1.0)
        a.step(pa, 1.0)
        assert a.stats()["snapshots_published"] == 2


def test_a_lazy_trainer_answers_with_its_model_as_it_is_now(make_cluster: Cluster) -> None:
    """The server waits (FRESH_WAIT) for the next step's copy instead of a stale snapshot."""
    config = make_cluster(2, constant={"value": 0.0}, timeout_ms=2000)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        pa = np.zeros(100, np.float32)
        a.step(pa, 1.0)  # publishes zeros
        pa[:] = 5.0  # trained on; nobody asked, so this is not copied yet
        for _ in range(5):
            a.step(pa, 1.0)
        assert a.stats()["snapshots_published"] == 1
        stop = threading.Event()

        def train() -> None:
            while not stop.is_set():
                a.step(pa, 1.0)
                time.sleep(0.01)

        trainer = threading.Thread(target=train)
        trainer.start()
        try:
            b.publish(np.zeros(100, np.float32), 1.0)
            b.start_pull(blocking=True)
            got = b.collect(1.0, wait=True)
        finally:
            stop.set()
            trainer.join()
        assert got is not None and np.all(got.params == 5.0)


def test_blocking_config_makes_step_wait_like_the_seed(make_cluster: Cluster) -> None:
    config = make_cluster(2, blocking=True)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        pb = np.full(10, 2.0, np.float32)
        b.publish(pb, 1.0)
        pa = np.zeros(10, np.float32)
        result = a.step(pa, 1.0)  # publishes, pulls, waits, blends: all in this call
        assert result is not None and result.steps_behind == 0
        assert np.all(pa == 1.0)


def test_gossip_step_on_a_torch_model(make_cluster: Cluster) -> None:
    torch = pytest.importorskip("torch")
    config = make_cluster(2)
    one, two = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in one.parameters():
            p.fill_(0.0)
        for p in two.parameters():
            p.fill_(2.0)
    with dpwa_core.connect(one, config, "w1") as a, dpwa_core.connect(two, config, "w2") as b:
        assert not a.blocking
        deadline = time.monotonic() + 20
        while a.last is None:
            assert time.monotonic() < deadline, a.node.stats()
            assert a.step(1.0) is one  # updated in place
            b.step(1.0)
            time.sleep(0.005)
        assert a.last.peer == "w2"
        assert a.node.stats()["blocked_s"] == 0.0
    with dpwa_core.connect(torch.nn.Linear(4, 3), config, "w1", blocking=True) as c:
        assert c.blocking


def test_shared_start_copies_the_first_node_and_never_spreads_a_joiner(
    make_cluster: Cluster,
) -> None:
    """w1 starts the cluster's model; w2 and w3 copy it; nobody ever blends their own start."""
    config = make_cluster(3, start="shared")
    with Node(config, "w1") as w1, Node(config, "w2") as w2, Node(config, "w3") as w3:
        params = {
            w1: np.full(100, 1.0, np.float32),
            w2: np.full(100, 100.0, np.float32),
            w3: np.full(100, -50.0, np.float32),
        }
        joined: dict[str, Any] = {}

        def all_joined() -> bool:
            for node in params:
                joined[node.name] = node.stats()["joined_from"]
            return None not in joined.values() and all(
                node.stats()["pulls_ok"] >= 3 for node in params
            )

        steps_until(params, all_joined)
        # w1 starts the model; a joiner copies w1, or a joiner that already copied w1 when w1
        # was busy sending (IF_IDLE spreads joiners over the nodes that have the model).
        assert joined["w1"] == "w1", joined
        assert joined["w2"] in ("w1", "w3") and joined["w3"] in ("w1", "w2"), joined
        assert "w1" in (joined["w2"], joined["w3"]), joined
        for node, values in params.items():
            # No node's starting weights reached any model: all hold w1's exactly.
            assert np.all(values == 1.0), (node.name, values[:3])


def test_a_restarted_node_copies_a_peer_before_it_is_pulled(make_cluster: Cluster) -> None:
    config = make_cluster(2, start="shared")
    with Node(config, "w1") as w1:
        p1 = np.full(50, 3.0, np.float32)
        with Node(config, "w2") as w2:
            p2 = np.full(50, 7.0, np.float32)
            steps_until({w1: p1, w2: p2}, lambda: w2.stats()["joined_from"] == "w1")
        assert np.all(p1 == 3.0) and np.all(p2 == 3.0)
        # w2 restarts with fresh weights and clock 0; w1 keeps pulling meanwhile.
        with Node(config, "w2") as again:
            fresh = np.full(50, -9.0, np.float32)
            results = []

            def restarted_and_pulled() -> bool:
                return again.stats()["joined_from"] == "w1" and w1.stats()["pulls_ok"] >= 6

            deadline = time.monotonic() + 20
            while not restarted_and_pulled():
                assert time.monotonic() < deadline, (w1.stats(), again.stats())
                w1.step(p1, 1.0)
                result = again.step(fresh, 1.0)
                if result is not None:
                    results.append(result)
                time.sleep(0.002)
            assert results[0].joined and results[0].factor == 1.0 and results[0].peer == "w1"
            assert again.clock >= w1.clock / 2  # took the peer's clock, not 0
            assert np.all(p1 == 3.0) and np.all(fresh == 3.0)


def test_a_dead_first_node_does_not_hold_the_start(make_cluster: Cluster) -> None:
    """w1 is configured but never starts: w2 starts the model, w3 copies it."""
    config = make_cluster(3, start="shared")
    with Node(config, "w2") as w2, Node(config, "w3") as w3:
        params = {w2: np.full(10, 2.0, np.float32), w3: np.full(10, 5.0, np.float32)}
        steps_until(params, lambda: w3.stats()["joined_from"] is not None)
        assert w2.stats()["joined_from"] == "w2" and w3.stats()["joined_from"] == "w2"
        assert np.all(params[w3] == 2.0)


def test_start_own_blends_peers_from_the_first_step(make_cluster: Cluster) -> None:
    config = make_cluster(2, start="own")
    with Node(config, "w1") as w1, Node(config, "w2") as w2:
        p1, p2 = np.zeros(10, np.float32), np.full(10, 4.0, np.float32)
        steps_until({w1: p1, w2: p2}, lambda: w1.stats()["pulls_ok"] >= 1)
        assert w1.stats()["joined_from"] == "w1" and not np.all(p1 == 0.0)


def test_config_keys_are_checked(make_cluster: Cluster) -> None:
    assert load_config(make_cluster(2, blocking=True)).blocking is True
    assert load_config({"nodes": make_cluster(2)["nodes"]}).start == "shared"
    with pytest.raises(ConfigError, match="'blocking' must be true or false"):
        load_config(make_cluster(2, blocking="yes"))
    with pytest.raises(ConfigError, match="'start' must be one of shared, own"):
        load_config(make_cluster(2, start="mine"))


def test_a_stalled_answer_fails_after_the_idle_timeout_not_the_far_deadline() -> None:
    """recv_exact with ``idle``: a peer that stops sending mid-payload is dropped quickly."""
    a, b = socket.socketpair()
    with a, b:
        send_all(b, b"x" * 10, time.monotonic() + 1)
        view = memoryview(bytearray(1000))
        far = time.monotonic() + 60
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="then nothing for 0.2 s"):
            recv_exact(a, view, far, idle=0.2)
        assert time.monotonic() - start < 30  # the idle timeout, not the 60 s deadline
    assert transfer_deadline(0.0, 10 * MIN_TRANSFER_RATE, 2.5) == pytest.approx(12.5)


def test_a_late_blend_keeps_the_steps_taken_since_the_request(make_cluster: Cluster) -> None:
    """Staleness correction: local_now + f * (peer_then - local_then), not a plain lerp."""
    # The arithmetic of the staleness correction alone: tests/test_drift.py adds the drift's.
    config = make_cluster(2, robust={"clip": False}, drift_correction=0)
    with Node(config, "w1") as a, Node(config, "w2") as b:
        b.publish(np.full(100, 8.0, np.float32), 1.0)
        pa = np.zeros(100, np.float32)
        a.publish(pa, 1.0)
        assert a.start_pull(current=pa)  # our model at the request: 0
        pa += 10.0  # the steps trained while the pull ran
        result = a.collect(1.0, wait=True, current=pa)
        assert result is not None and result.factor == 0.5
        assert np.all(result.params == 18.0)  # 10 now + (8 - 0): the peer's lead over us then
        result.blend_into(pa)
        assert np.all(pa == 14.0)  # a plain blend would give 9, losing half our 10
        # Without the current model, collect hands out the (clipped) peer itself.
        assert a.start_pull(current=pa)
        result = a.collect(1.0, wait=True)
        assert result is not None and np.all(result.params == 8.0)


def test_a_joiner_keeps_training_and_its_copy_keeps_those_steps(make_cluster: Cluster) -> None:
    """The join copy is staleness-corrected too: peer_then + (joiner_now - joiner_then)."""
    config = make_cluster(2, start="shared")
    with Node(config, "w1") as w1, Node(config, "w2") as w2:
        p1 = np.full(10, 1.0, np.float32)
        steps_until({w1: p1}, lambda: w1.stats()["joined_from"] == "w1")
        p2 = np.full(10, 100.0, np.float32)
        w2.publish(p2, 1.0)
        assert not w2.joined and w2.start_pull(current=p2)  # a join round, p2 as reference
        p2 += 5.0  # trained on while the copy ran
        result = w2.collect(1.0, wait=True, current=p2)  # w1 has a model: the round copies it
        assert result is not None and result.joined and result.factor == 1.0
        result.blend_into(p2)
        assert np.all(p2 == 6.0)  # w1's 1 plus the joiner's own 5 steps' worth


def test_a_later_node_started_first_waits_for_the_first_node_to_start_the_model(
    make_cluster: Cluster,
) -> None:
    """w2 comes up 2 s before w1 (within the seed grace): it does not start a second model."""
    config = make_cluster(2, start="shared")
    with Node(config, "w2") as w2:
        p2 = np.full(10, 5.0, np.float32)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            w2.step(p2, 1.0)
            time.sleep(0.01)
        assert w2.stats()["joined_from"] is None  # still waiting for the node before it
        with Node(config, "w1") as w1:
            p1 = np.full(10, 1.0, np.float32)
            steps_until({w1: p1, w2: p2}, lambda: w2.stats()["joined_from"] is not None)
            assert w1.stats()["joined_from"] == "w1" and w2.stats()["joined_from"] == "w1"
            assert np.all(p2 == 1.0)
