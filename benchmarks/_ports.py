"""Free loopback ports for the benchmarks' node processes."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Ports that were free on 127.0.0.1 a moment ago (held open together so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
