"""A hostile "peer" for tests/test_floods.py: answers every PULL with a different bad answer.

Usage: bad_answers.py PORT

Three answers in four are LAYOUT_MISMATCH with 64 KiB of distinct text holding forged log lines
and terminal escapes; the rest are random bytes. It serves until killed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import string
import sys
import threading

from dpwa_core.wire import HEADER, MAX_TEXT_PAYLOAD, MessageType, encode_header

FORGED = "\n2026-12-01 12:00:00 CRITICAL dpwa.node: secret leaked \x1b[31mRED\x1b[0m\r\x07"
_numbers = itertools.count(1)  # next() on it is atomic: every answer differs


def answer(number: int) -> bytes:
    if number % 4 == 0:
        return os.urandom(HEADER.size)
    tag = "".join(random.choice(string.ascii_lowercase) for _ in range(16))  # not a number
    text = f"{tag} {FORGED} ".encode()
    text = (text * (MAX_TEXT_PAYLOAD // len(text) + 1))[:MAX_TEXT_PAYLOAD]
    return encode_header(MessageType.LAYOUT_MISMATCH, size=number, length=len(text)) + text


def serve(conn: socket.socket) -> None:
    with contextlib.suppress(OSError), conn:
        while conn.recv(HEADER.size):
            conn.sendall(answer(next(_numbers)))


def main(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]))
