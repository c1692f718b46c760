"""``dpwa status``: ask every node of a config for its counters, and show them as a table.

Each node answers a STATUS request on its dpwa port (docs/PROTOCOL.md) with a small JSON object:
its clock, loss, steps, pull and byte counters, transport, the peer it last blended, its peers'
flow-control scores and its view of the swarm's progress; never parameters. The request goes
through the same TLS and shared-secret handshake as a pull when the config has them (the tool
proves a member's name: ``as_name``, by default the first other node of the config).

The answer comes from the network: it is at most 64 KiB (the header says so before a byte is
read), parsed as JSON (never evaluated), and every field is checked and bounded before it is
shown; text is truncated and, in the table, never read as markup.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dpwa_core.auth import MAC_SIZE, MessageMac, client_handshake
from dpwa_core.config import Config
from dpwa_core.errors import DpwaError
from dpwa_core.tls import client_context
from dpwa_core.wire import HEADER, MessageType, decode_header, encode_header, recv_exact, send_all

__all__ = ["NodeStatus", "query", "query_all", "table"]

_COUNTS = (
    "steps",
    "samples",
    "pulls_ok",
    "pulls_failed",
    "pulls_timed_out",
    "pulls_shm",
    "pulls_served",
    "served_shm",
    "bytes_in",
    "bytes_out",
    "swarm_nodes",
)
_NUMBERS = ("clock", "loss", "swarm_samples", "uptime_s")
_TEXTS = ("name", "joined_from", "last_peer", "transport", "wire_dtype")
_MAX_TEXT = 64  # characters of one peer-supplied string shown at most
_MAX_SCORES = 1024  # peers' scores kept from one answer


@dataclass(frozen=True)
class NodeStatus:
    """One node's answer to a STATUS request, or why there was none.

    Attributes:
        name: the node's name in the config.
        address: ``host:port`` from the config.
        up: whether it answered.
        error: why it did not (refused, unreachable, a bad answer), else None.
        fields: the checked fields of its answer: counters (``steps``, ``samples``, ``pulls_ok``,
            ``pulls_failed``, ``pulls_timed_out``, ``pulls_shm``, ``pulls_served``,
            ``served_shm``, ``bytes_in``, ``bytes_out``, ``swarm_nodes``), numbers (``clock``,
            ``loss``, ``swarm_samples``, ``uptime_s``), names (``joined_from``, ``last_peer``,
            ``transport``, ``wire_dtype``) and ``scores`` (peer name to score).
        seconds: how long the request took.
    """

    name: str
    address: str
    up: bool
    error: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The status as a JSON-ready dict (``dpwa status --json``)."""
        return asdict(self)


def query(
    config: Config, name: str, *, timeout: float = 2.0, as_name: str | None = None
) -> NodeStatus:
    """Ask node ``name`` of ``config`` for its status.

    Args:
        config: the cluster's config (its ``tls`` and ``auth`` sections are used).
        name: the node to ask.
        timeout: seconds for the whole exchange.
        as_name: the member name to prove with ``auth``; defaults to the first other node.

    Returns:
        Its :class:`NodeStatus`; never raises for what the node or the network does.
    """
    spec = config.node(name)
    address = f"{spec.host}:{spec.port}"
    began = time.monotonic()
    try:
        fields = _exchange(config, name, timeout, as_name)
    except (OSError, DpwaError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        return NodeStatus(
            name, address, False, _clip(reason, 300), seconds=time.monotonic() - began
        )
    return NodeStatus(name, address, True, None, fields, time.monotonic() - began)


def query_all(
    config: Config, *, timeout: float = 2.0, as_name: str | None = None
) -> list[NodeStatus]:
    """Ask every node of ``config`` at once; their statuses in config order."""
    names = [node.name for node in config.nodes]
    results: dict[str, NodeStatus] = {}

    def ask(name: str) -> None:
        results[name] = query(config, name, timeout=timeout, as_name=as_name)

    threads = [threading.Thread(target=ask, args=(n,), daemon=True) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return [
        results.get(n, NodeStatus(n, _address(config, n), False, "no answer in time"))
        for n in names
    ]


def table(statuses: list[NodeStatus]) -> Any:
    """A ``rich`` table of ``statuses``: one row per node, peer text never read as markup."""
    from rich.table import Table
    from rich.text import Text

    grid = Table(title="dpwa cluster", expand=False)
    for column in (
        "node",
        "state",
        "clock",
        "loss",
        "steps",
        "pulls ok/failed/timed out",
        "in",
        "out",
        "transport",
        "pulls from",
        "peers' scores",
        "swarm",
    ):
        grid.add_column(column)
    for status in statuses:
        f = status.fields
        if not status.up:
            grid.add_row(
                Text(status.name), Text("down", style="red"), *[""] * 8, Text(status.error or "")
            )
            continue
        scores = ", ".join(f"{peer} {score:.2f}" for peer, score in f.get("scores", {}).items())
        loss = f.get("loss")
        grid.add_row(
            Text(status.name),
            Text("up", style="green"),
            f"{f.get('clock', 0):.0f}",
            "-" if loss is None else f"{loss:.4f}",
            str(f.get("steps", 0)),
            f"{f.get('pulls_ok', 0)}/{f.get('pulls_failed', 0)}/{f.get('pulls_timed_out', 0)}",
            _bytes(f.get("bytes_in", 0)),
            _bytes(f.get("bytes_out", 0)),
            Text(f"{f.get('transport', '?')}, {f.get('wire_dtype', '?')}"),
            Text(f.get("last_peer") or "-"),
            Text(scores or "-"),
            f"{f.get('swarm_samples', 0):.0f} samples, {f.get('swarm_nodes', 0)} nodes",
        )
    return grid


def _exchange(config: Config, name: str, timeout: float, as_name: str | None) -> dict[str, Any]:
    spec = config.node(name)
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((spec.host, spec.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if config.tls is not None:
            context = client_context(config.tls, config.source)
            hostname = spec.host if context.check_hostname else None
            sock = context.wrap_socket(sock, server_hostname=hostname)
        session = None
        if config.auth is not None:
            me = as_name or next((n.name for n in config.nodes if n.name != name), name)
            session = client_handshake(sock, config.auth.secret, deadline, name=me, peer=name)
        request = encode_header(MessageType.STATUS)
        if session is not None:
            request += session.send.tag(request)
        send_all(sock, request, deadline)
        head = bytearray(HEADER.size)
        recv_exact(sock, memoryview(head), deadline)
        mac = session.receive.begin() if session is not None else None
        if mac is not None:
            mac.update(head)
        header = decode_header(head)
        if header.type is not MessageType.STATUS_REPLY:
            raise DpwaError(f"the node answered {header.type.name}, not a status")
        payload = bytearray(header.length)  # at most 64 KiB: decode_header checked it
        recv_exact(sock, memoryview(payload), deadline)
        if mac is not None:
            mac.update(payload)
            tag = bytearray(MAC_SIZE)
            recv_exact(sock, memoryview(tag), deadline)
            MessageMac.verify(mac, tag)
    finally:
        sock.close()
    try:
        answer = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DpwaError(f"the node's status is not JSON: {exc}") from None
    return _checked(answer)


def _checked(answer: object) -> dict[str, Any]:
    """The known fields of a status answer, each checked and bounded; others dropped."""
    if not isinstance(answer, dict):
        raise DpwaError("the node's status is not a JSON object")
    fields: dict[str, Any] = {}
    for key in _COUNTS:
        value = answer.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
            fields[key] = value
    for key in _NUMBERS:
        value = answer.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            fields[key] = float(value)
        elif key == "loss":
            fields[key] = None
    for key in _TEXTS:
        value = answer.get(key)
        fields[key] = _clip(value, _MAX_TEXT) if isinstance(value, str) else None
    scores = answer.get("scores")
    fields["scores"] = {}
    if isinstance(scores, dict):
        for peer, score in list(scores.items())[:_MAX_SCORES]:
            if isinstance(score, (int, float)) and math.isfinite(score):
                fields["scores"][_clip(str(peer), _MAX_TEXT)] = float(score)
    return fields


def _clip(text: str, limit: int) -> str:
    """``text`` without control characters, at most ``limit`` characters."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _address(config: Config, name: str) -> str:
    spec = config.node(name)
    return f"{spec.host}:{spec.port}"


def _bytes(count: int) -> str:
    for size, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"
