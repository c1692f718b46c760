"""Hold a node's connection slots with started requests (for tests/test_floods.py).

Usage: slot_flood.py HOST PORT SOURCE CONNECTIONS SECONDS SIZE MODE [CLAIMED_NAME SERVER_NAME]

Each of CONNECTIONS threads connects from the address SOURCE (or, for ``A.B.C.D+N``, from one of
the N loopback addresses from A.B.C.D on, thread i from the i-th), and with MODE ``stall`` sends a
valid PULL for a layout of SIZE elements plus the first byte of the next request, with MODE
``silent`` sends nothing; then it waits for the server to close the connection, and starts
again. With CLAIMED_NAME (and DPWA_SECRET in the environment) it
first passes the auth handshake as that member: an attacker that knows the secret. Prints the
number of connections it made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import threading
import time

from dpwa_core.auth import client_handshake
from dpwa_core.layout import Layout
from dpwa_core.wire import MessageType, encode_header


def main(argv: list[str]) -> None:
    host, port, source, count, seconds, size, mode = argv[:7]
    claimed = argv[7:9]
    first, _, many = source.partition("+")
    base = ipaddress.ip_address(first)
    sources = [str(base + i) for i in range(int(many or 1))]
    size_, shape_hash = Layout.flat(int(size)).fingerprint
    pull = encode_header(MessageType.PULL, size=size_, shape_hash=shape_hash)
    end = time.monotonic() + float(seconds)
    made = [0]

    def attack(index: int) -> None:
        while time.monotonic() < end:
            with contextlib.suppress(OSError), socket.socket() as sock:
                sock.bind((sources[index % len(sources)], 0))
                sock.settimeout(5)
                sock.connect((host, int(port)))
                if mode == "silent":
                    made[0] += 1
                    while sock.recv(65536):
                        pass
                    continue
                message = pull
                if claimed:
                    secret = os.environ["DPWA_SECRET"].encode()
                    deadline = time.monotonic() + 5
                    session = client_handshake(
                        sock, secret, deadline, name=claimed[0], peer=claimed[1]
                    )
                    message = pull + session.send.tag(pull)
                made[0] += 1
                sock.sendall(message + message[:1])
                while sock.recv(65536):  # until the server closes it
                    pass

    threads = [threading.Thread(target=attack, args=(i,), daemon=True) for i in range(int(count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(float(seconds) + 10)
    print(made[0])


if __name__ == "__main__":
    main(sys.argv[1:])
