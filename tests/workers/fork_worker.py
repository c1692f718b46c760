"""A node process forks a child (like a data-loader worker) that is then sent SIGTERM.

Run by tests/test_shutdown.py in a fresh interpreter, so that no framework with threads of
its own (JAX warns about fork) is loaded when it forks. Exits 0 when the parent's node keeps
its kept-alive connection and keeps pulling; otherwise an assertion says what went wrong.

Usage: python fork_worker.py CONFIG
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

from dpwa_core.node import Node


def kept_port(node: Node) -> int:
    """Local port of ``node``'s kept-alive connection to w1 (changes when it reconnects)."""
    assert node._puller is not None
    return int(node._puller._conns["w1"].sock.getsockname()[1])


def main(config: str) -> None:
    with Node(config, "w1") as a, Node(config, "w2") as b:
        a.update_send(np.ones(10, np.float32), 1.0)

        def pull() -> bool:
            b.update_send(np.zeros(10, np.float32), 1.0)
            return b.update_wait(1.0) is not None

        assert any(pull() for _ in range(50)), "no pull succeeded before the fork"
        before = kept_port(b)
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: say it is up, then wait for the signal like a worker
            os.write(ready_w, b"x")
            signal.pause()
            os._exit(0)
        os.read(ready_r, 1)  # a signal that arrives while fork() is returning may be lost
        os.close(ready_r)
        os.close(ready_w)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
        assert all(pull() for _ in range(5)), "pulls failed after the child was terminated"
        # The same kept-alive connection served them: the child did not shut it down.
        assert kept_port(b) == before, "the parent's connection was cut"
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
