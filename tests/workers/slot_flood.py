"""Hold a node's connection slots with started requests (for tests/test_floods.py).

Usage: slot_flood.py HOST PORT SOURCE CONNECTIONS SECONDS SIZE [CLAIMED_NAME SERVER_NAME]

Each of CONNECTIONS threads connects from the address SOURCE, sends a valid PULL for a layout of
SIZE elements plus the first byte of the next request, and waits for the server to close the
connection; then it starts again. With CLAIMED_NAME (and DPWA_SECRET in the environment) it
first passes the auth handshake as that member: an attacker that knows the secret. Prints the
number of connections it made.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

from dpwa_core.auth import client_handshake
from dpwa_core.layout import Layout
from dpwa_core.wire import MessageType, encode_header


def main(argv: list[str]) -> None:
    host, port, source, count, seconds, size = argv[:6]
    claimed = argv[6:8]
    size_, shape_hash = Layout.flat(int(size)).fingerprint
    pull = encode_header(MessageType.PULL, size=size_, shape_hash=shape_hash)
    end = time.monotonic() + float(seconds)
    made = [0]

    def attack() -> None:
        while time.monotonic() < end:
            with contextlib.suppress(OSError), socket.socket() as sock:
                sock.bind((source, 0))
                sock.settimeout(5)
                sock.connect((host, int(port)))
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

    threads = [threading.Thread(target=attack, daemon=True) for _ in range(int(count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(float(seconds) + 10)
    print(made[0])


if __name__ == "__main__":
    main(sys.argv[1:])
