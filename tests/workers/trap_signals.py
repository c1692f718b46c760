"""A node for launcher tests: logs each signal it gets, then exits (or ignores it).

Usage: python trap_signals.py WORKDIR [ignore]
Writes WORKDIR/NAME.ready once its handlers are set, and appends one line per SIGINT or SIGTERM
to WORKDIR/NAME.signals. Exits 0 half a second after the first signal (so a signal delivered
twice would be logged twice), or, with ``ignore``, never exits on its own.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

workdir = Path(sys.argv[1])
ignore = sys.argv[2:] == ["ignore"]
name = os.environ["DPWA_NODE"]
got: list[float] = []


def on_signal(signum: int, frame: object) -> None:
    with open(workdir / f"{name}.signals", "a") as log:
        log.write(signal.Signals(signum).name + "\n")
    print(f"got {signal.Signals(signum).name}", flush=True)
    got.append(time.monotonic())


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
(workdir / f"{name}.ready").touch()
print("ready", flush=True)
while not got or ignore or time.monotonic() < got[0] + 0.5:
    time.sleep(0.02)
sys.exit(0)
