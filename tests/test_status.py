"""``dpwa status``: real nodes answer STATUS over their dpwa port; hostile answers are bounded."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import yaml

from dpwa_core import Layout, Node, load_config
from dpwa_core.cli import main
from dpwa_core.status import NodeStatus, query, query_all, table
from dpwa_core.wire import HEADER, MAGIC, VERSION, MessageType, encode_header, recv_exact, send_all

Cluster = Callable[..., dict[str, Any]]


def trained(nodes: list[Node], steps: int = 30) -> None:
    params = {n: np.full(100, float(i), np.float32) for i, n in enumerate(nodes)}
    for _ in range(steps):
        for node, p in params.items():
            node.step(p, 0.5)
        time.sleep(0.003)


def test_status_shows_every_node_up_or_down_with_its_counters(
    make_cluster: Cluster, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_cluster(3)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    flat = Layout.flat(100)
    with Node(config, "w1", layout=flat) as a, Node(config, "w2", layout=flat) as b:
        trained([a, b])
        code = main(["status", str(path), "--json", "--timeout", "2"])
        line = json.loads(capsys.readouterr().out)
        stats = a.stats()
    assert code == 1  # w3 is down
    nodes = {n["name"]: n for n in line["nodes"]}
    assert nodes["w3"]["up"] is False and "refused" in nodes["w3"]["error"]
    w1 = nodes["w1"]["fields"]
    assert nodes["w1"]["up"] and w1["name"] == "w1"
    assert w1["steps"] == 30 and 0 < w1["pulls_ok"] <= stats["pulls_ok"]
    assert w1["loss"] == 0.5 and w1["last_peer"] == "w2" and w1["joined_from"] == "w1"
    assert set(w1["scores"]) == {"w2", "w3"} and w1["scores"]["w3"] < w1["scores"]["w2"]
    assert w1["transport"] == "auto" and w1["wire_dtype"] == "auto"
    assert "params" not in w1 and len(json.dumps(w1)) < 2000  # counters, never parameters


def test_the_table_lists_every_node(make_cluster: Cluster) -> None:
    from rich.console import Console

    config = make_cluster(2)
    with Node(config, "w1", layout=Layout.flat(100)) as a:
        trained([a], 3)
        statuses = query_all(load_config(config), timeout=2)
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(table(statuses))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "w1" in text and "up" in text and "w2" in text and "down" in text


def test_status_goes_through_auth_and_a_wrong_secret_is_refused(
    make_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DPWA_STATUS_SECRET", "s" * 64)
    monkeypatch.setenv("DPWA_WRONG_SECRET", "t" * 64)
    config = make_cluster(2, auth={"secret_env": "DPWA_STATUS_SECRET"})
    with Node(config, "w1", layout=Layout.flat(100)) as a:
        trained([a], 3)
        good = query(load_config(config), "w1", timeout=2)
        wrong = query(
            load_config({**config, "auth": {"secret_env": "DPWA_WRONG_SECRET"}}), "w1", timeout=2
        )
        plain = query(load_config({k: v for k, v in config.items() if k != "auth"}), "w1")
    assert good.up and good.fields["steps"] == 3
    assert not wrong.up and wrong.error
    assert not plain.up and plain.error  # the node requires the handshake


@pytest.fixture
def fake_node() -> Iterator[tuple[int, list[bytes]]]:
    """A raw server that answers every STATUS request with the bytes the test queues."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    replies: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    recv_exact(conn, memoryview(bytearray(HEADER.size)), time.monotonic() + 5)
                    send_all(conn, replies.pop(0), time.monotonic() + 5)
                    time.sleep(0.2)
                except (OSError, IndexError, TimeoutError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], replies
    finally:
        stop.set()
        listener.close()
        thread.join(2)


def _reply(payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return encode_header(MessageType.STATUS_REPLY, length=size) + payload


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (_reply(b"", length=10**9), "exceeds"),
        (_reply(b"{not json"), "not JSON"),
        (_reply(b"[1, 2]"), "not a JSON object"),
        (encode_header(MessageType.PARAMS, size=1, length=4) + b"\0" * 4, "not a status"),
        (MAGIC + bytes([VERSION - 1]) + b"\0" * (HEADER.size - 5), "protocol version"),
    ],
)
def test_a_bad_status_answer_is_one_error_not_a_crash(
    fake_node: tuple[int, list[bytes]], make_cluster: Cluster, reply: bytes, error: str
) -> None:
    port, replies = fake_node
    replies.append(reply)
    config = make_cluster(1)
    config["nodes"][0]["port"] = port
    status = query(load_config(config), "w1", timeout=2)
    assert not status.up and status.error is not None and error in status.error, status


def test_hostile_fields_are_checked_bounded_and_never_read_as_markup(
    fake_node: tuple[int, list[bytes]], make_cluster: Cluster
) -> None:
    from rich.console import Console

    port, replies = fake_node
    answer = {
        "name": "[bold red]boss[/]" + "x" * 500,
        "steps": -5,
        "pulls_ok": True,
        "bytes_in": 2**70,
        "clock": "1e9",
        "loss": None,
        "last_peer": "[bold red]boss[/] line\nbreak\x1b[31m",
        "scores": {f"p{i}": i for i in range(3000)} | {"bad": "x"},
        "params": [1.0] * 10,
    }
    replies.append(_reply(json.dumps(answer).encode()))
    config = make_cluster(1)
    config["nodes"][0]["port"] = port
    status = query(load_config(config), "w1", timeout=2)
    assert status.up, status
    f = status.fields
    assert len(f["name"]) == 64 and f["name"].endswith("...")
    assert "steps" not in f and "pulls_ok" not in f and "bytes_in" not in f and "clock" not in f
    assert f["loss"] is None and "\n" not in f["last_peer"] and "\x1b" not in f["last_peer"]
    assert len(f["scores"]) == 1024 and "bad" not in f["scores"] and "params" not in f
    console = Console(file=io.StringIO(), width=400, color_system=None)
    console.print(table([NodeStatus("w1", "x", True, None, f)]))
    assert "[bold red]boss" in console.file.getvalue()  # type: ignore[attr-defined]
