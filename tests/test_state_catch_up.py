"""Optimizer state at catch-up: a joiner takes its sponsor's optimizer state over the real wire.

Real nodes and loopback sockets in this process, real frameworks. The sponsor stops training
once the joiner connects, so the state it serves is fixed and the joiner's copy must equal it
bit for bit. The hostile cases answer a STATE pull from a raw socket.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import dpwa_core
from dpwa_core import Gossip
from dpwa_core.wire import (
    FLAG_STATE,
    HEADER,
    DType,
    MessageType,
    decode_header,
    encode_header,
    recv_exact,
    send_all,
)

Cluster = Callable[..., dict[str, Any]]


def step_until(gossips: list[Gossip[Any]], done: Callable[[], bool], seconds: float = 30) -> None:
    """Call every gossip's non-blocking step (no training) until ``done()``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, [g.node.stats() for g in gossips]
        for gossip in gossips:
            gossip.step(1.0)
        time.sleep(0.002)


def torch_case(kind: str, seed: int) -> tuple[Any, Any, Callable[[], None]]:
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def train() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return model, optimizer, train


def torch_state(optimizer: Any) -> list[np.ndarray]:
    return [
        value.detach().numpy().copy()
        for group in optimizer.param_groups
        for param in group["params"]
        for _, value in sorted(optimizer.state[param].items())
        if value is not None
    ]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_torch_joiner_takes_its_sponsors_optimizer_state(
    make_cluster: Cluster, kind: str
) -> None:
    config = make_cluster(2, start="shared")
    m1, o1, train1 = torch_case(kind, 0)
    m2, o2, train2 = torch_case(kind, 1)
    with dpwa_core.connect(m1, config, "w1", optimizer=o1) as g1:
        for _ in range(5):
            train1()
            g1.step(1.0)
        assert g1.node.join() is None  # the first node starts the cluster's model
        with dpwa_core.connect(m2, config, "w2", optimizer=o2) as g2:
            train2()  # the joiner's optimizer state exists, and differs
            assert not all(
                np.array_equal(a, b) for a, b in zip(torch_state(o1), torch_state(o2), strict=True)
            )
            step_until([g1, g2], lambda: g2.node.stats()["optimizer_state_from"] == "w1")
            for mine, theirs in zip(torch_state(o2), torch_state(o1), strict=True):
                np.testing.assert_array_equal(mine, theirs)
            assert g1.node.stats()["served_state"] == 1
            assert g2.node.stats()["joined_from"] == "w1"
            flat1, flat2 = g1.adapter.to_flat(m1), g2.adapter.to_flat(m2)
            # and the model, copied at the join (peer + (ours now - ours then): rounding only)
            np.testing.assert_allclose(flat2, flat1, rtol=1e-6, atol=1e-6)
            assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"]
            # The copy is one transfer: ordinary pulls after it carry parameters only.
            served = g1.node.stats()["served_state"]
            step_until([g1, g2], lambda: g2.node.stats()["pulls_ok"] >= 3)
            assert g1.node.stats()["served_state"] == served


def test_a_keras_joiner_takes_its_sponsors_optimizer_state(make_cluster: Cluster) -> None:
    keras = pytest.importorskip("keras")
    config = make_cluster(2, start="shared")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 5)).astype(np.float32), rng.integers(0, 3, 32)

    def build(seed: int) -> tuple[Any, Any]:
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
        return model, model.optimizer

    m1, o1 = build(0)
    m1.fit(x, y, epochs=2, verbose=0)
    m2, o2 = build(1)
    m2.fit(x, y, epochs=1, verbose=0)
    with dpwa_core.connect(m1, config, "w1", optimizer=o1) as g1:
        g1.step(1.0)
        with dpwa_core.connect(m2, config, "w2", optimizer=o2) as g2:
            step_until([g1, g2], lambda: g2.node.stats()["optimizer_state_from"] == "w1")
            for mine, theirs in zip(o2.variables, o1.variables, strict=True):
                np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def test_an_optax_joiner_takes_its_sponsors_optimizer_state(make_cluster: Cluster) -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    config = make_cluster(2, start="shared")
    tx = optax.adam(1e-2)

    def build(seed: int) -> tuple[Any, Any]:
        key = jax.random.PRNGKey(seed)
        params = {"w": jax.random.normal(key, (4, 3)), "b": jnp.zeros(3)}
        opt_state = tx.init(params)
        grads = jax.tree_util.tree_map(jnp.ones_like, params)
        for _ in range(seed + 2):  # different step counts and moments
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state

    p1, s1 = build(0)
    p2, s2 = build(1)
    with dpwa_core.connect(p1, config, "w1", optimizer=s1) as g1:
        g1.step(1.0)
        with dpwa_core.connect(p2, config, "w2", optimizer=s2) as g2:
            step_until([g1, g2], lambda: g2.node.stats()["optimizer_state_from"] == "w1")
            mine = jax.tree_util.tree_leaves(g2.optimizer)
            theirs = jax.tree_util.tree_leaves(s1)
            assert jax.tree_util.tree_structure(g2.optimizer) == jax.tree_util.tree_structure(s1)
            for a, b in zip(mine, theirs, strict=True):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_another_optimizer_is_refused_and_the_joiner_keeps_its_own(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_cluster(2, start="shared")
    m1, o1, train1 = torch_case("adam", 0)
    m2, o2, train2 = torch_case("sgd", 1)
    with dpwa_core.connect(m1, config, "w1", optimizer=o1) as g1:
        train1()
        g1.step(1.0)
        with dpwa_core.connect(m2, config, "w2", optimizer=o2) as g2:
            train2()
            before = torch_state(o2)
            with caplog.at_level(logging.INFO, logger="dpwa"):
                step_until([g1, g2], lambda: "keeps its own optimizer state" in caplog.text)
            assert g2.node.stats()["optimizer_state_from"] is None
            for a, b in zip(torch_state(o2), before, strict=True):
                np.testing.assert_array_equal(a, b)
            # Both sides name both layouts.
            assert "optimizer mismatch: ours" in caplog.text
            assert "refused a state pull" in caplog.text
            assert "torch.optim.SGD" in caplog.text and "torch.optim.Adam" in caplog.text
            assert g2.node.joined  # the model copy itself was fine


@pytest.fixture
def fake_sponsor() -> Iterator[tuple[int, list[Callable[[socket.socket, Any], None]]]]:
    """A raw server that answers ordinary PULLs with a model of 1000 ones (float32) and STATE
    pulls with whatever the test's answer function sends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    answers: list[Callable[[socket.socket, Any], None]] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            buf = memoryview(bytearray(HEADER.size))
            while not stop.is_set():
                try:
                    recv_exact(conn, buf, time.monotonic() + 5)
                except (OSError, TimeoutError):
                    return
                request = decode_header(buf)
                if request.flags & FLAG_STATE:
                    answers[0](conn, request)
                    continue
                payload = np.ones(1000, np.float32).tobytes()
                send_all(
                    conn,
                    encode_header(
                        MessageType.PARAMS,
                        clock=5.0,
                        size=1000,
                        shape_hash=request.shape_hash,
                        length=len(payload),
                    )
                    + payload,
                    time.monotonic() + 5,
                )

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], answers
    finally:
        stop.set()
        listener.close()
        thread.join(2)


class _Layout:
    """A stand-in optimizer layout of 12 values for the node-level tests."""

    size = 12
    fingerprint = (12, 0x1234)

    def describe(self) -> str:
        return "fake optimizer, 12 values"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("nan", "NaN or Inf"),
        ("float16", "not float32"),
        ("other", "optimizer mismatch"),
    ],
)
def test_a_hostile_state_answer_is_refused_before_it_is_handed_out(
    fake_sponsor: tuple[int, list[Any]],
    make_cluster: Cluster,
    caplog: pytest.LogCaptureFixture,
    answer: str,
    expected: str,
) -> None:
    port, answers = fake_sponsor

    def send(conn: socket.socket, request: Any) -> None:
        values = np.arange(12, dtype=np.float32)
        dtype, shape_hash = DType.FLOAT32, request.shape_hash
        if answer == "nan":
            values[7] = np.nan
        if answer == "other":
            shape_hash ^= 1
        payload = values.tobytes()
        if answer == "float16":
            dtype, payload = DType.FLOAT16, values.astype(np.float16).tobytes()
        header = encode_header(
            MessageType.PARAMS, size=12, shape_hash=shape_hash, length=len(payload), dtype=dtype
        )
        send_all(conn, header + payload, time.monotonic() + 5)

    answers.append(send)
    config = make_cluster(2, start="shared")
    config["nodes"][0]["port"] = port  # w1 is the fake sponsor
    with dpwa_core.Node(config, "w2", layout=dpwa_core.Layout.flat(1000)) as node:
        node.share_optimizer_state(_Layout(), lambda out: out.fill(3.0))
        params = np.zeros(1000, np.float32)
        with caplog.at_level(logging.INFO, logger="dpwa"):
            deadline = time.monotonic() + 20
            while "keeps its own optimizer state" not in caplog.text:
                assert time.monotonic() < deadline, (caplog.text, node.stats())
                node.step(params, 1.0)
                assert node.take_optimizer_state() is None  # never handed out
                time.sleep(0.005)
        assert expected in caplog.text
        assert node.joined and np.all(params == 1.0)  # the model copy was fine


def test_a_node_without_an_optimizer_answers_not_ready_and_the_joiner_gives_up(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_cluster(2, start="shared")
    flat = dpwa_core.Layout.flat(100)
    with (
        dpwa_core.Node(config, "w1", layout=flat) as sponsor,
        dpwa_core.Node(config, "w2", layout=flat) as joiner,
    ):
        joiner.share_optimizer_state(_Layout(), lambda out: out.fill(3.0))
        p1, p2 = np.ones(100, np.float32), np.zeros(100, np.float32)
        with caplog.at_level(logging.INFO, logger="dpwa"):
            deadline = time.monotonic() + 20
            while "keeps its own optimizer state" not in caplog.text:
                assert time.monotonic() < deadline, (caplog.text, joiner.stats())
                sponsor.step(p1, 1.0)
                joiner.step(p2, 1.0)
                time.sleep(0.005)
        assert joiner.stats()["optimizer_state_from"] is None
        assert np.all(p2 == 1.0)


def test_the_sponsor_fills_its_state_on_its_training_thread_and_the_joiner_gets_it_once(
    make_cluster: Cluster,
) -> None:
    config = make_cluster(2, start="shared")
    flat = dpwa_core.Layout.flat(100)
    fills: list[str] = []

    def fill(out: np.ndarray) -> None:
        fills.append(threading.current_thread().name)
        out[:] = np.arange(12, dtype=np.float32)

    with (
        dpwa_core.Node(config, "w1", layout=flat) as sponsor,
        dpwa_core.Node(config, "w2", layout=flat) as joiner,
    ):
        sponsor.share_optimizer_state(_Layout(), fill)
        joiner.share_optimizer_state(_Layout(), lambda out: out.fill(-1.0))
        p1, p2 = np.ones(100, np.float32), np.zeros(100, np.float32)
        taken: list[np.ndarray] = []
        deadline = time.monotonic() + 20
        while not taken:
            assert time.monotonic() < deadline, joiner.stats()
            sponsor.step(p1, 1.0)
            joiner.step(p2, 1.0)
            state = joiner.take_optimizer_state()
            if state is not None:
                taken.append(state.copy())
                assert not state.flags.writeable
            time.sleep(0.005)
        np.testing.assert_array_equal(taken[0], np.arange(12, dtype=np.float32))
        assert fills == [threading.current_thread().name]  # one copy, made by the trainer
        assert joiner.take_optimizer_state() is None  # handed out once
        assert joiner.stats()["optimizer_state_from"] == "w1"
        assert sponsor.stats()["served_state"] == 1


def test_a_sponsor_whose_adam_state_would_make_us_non_finite_is_refused(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A negative second moment (Adam's sqrt of it is NaN) is refused; ours is kept."""
    torch = pytest.importorskip("torch")
    config = make_cluster(2, start="shared")
    m1, o1, train1 = torch_case("adam", 0)
    m2, o2, train2 = torch_case("adam", 1)
    with dpwa_core.connect(m1, config, "w1", optimizer=o1) as g1:
        train1()
        with torch.no_grad():
            o1.state[next(m1.parameters())]["exp_avg_sq"].fill_(-1.0)
        assert g1.node.join() is None
        with dpwa_core.connect(m2, config, "w2", optimizer=o2) as g2:
            train2()
            before = torch_state(o2)
            with caplog.at_level(logging.INFO, logger="dpwa"):
                step_until([g1, g2], lambda: "kept its own optimizer state" in caplog.text)
            assert "exp_avg_sq: ours is >= 0 everywhere" in caplog.text
            for a, b in zip(torch_state(o2), before, strict=True):
                np.testing.assert_array_equal(a, b)
            train2()
            assert all(np.isfinite(p.detach().numpy()).all() for p in m2.parameters())
