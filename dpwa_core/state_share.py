"""Optimizer state at catch-up: what a node serves to a joiner, filled on its training thread.

A node that joins the cluster (``start: shared``) copies a peer's model; with an optimizer given
to :func:`~dpwa_core.connect` it then asks the same peer once for its optimizer state too: a PULL
flagged :data:`~dpwa_core.wire.FLAG_STATE` carrying the joiner's optimizer layout fingerprint
(:class:`~dpwa_core.optimizer_state.OptimizerLayout`). The peer's server thread cannot read the
optimizer while the training thread steps it, so it asks for a copy (:meth:`StateShare.request`)
and the training thread makes it at its next publish (:meth:`StateShare.serve`), as lazy
publishing does for the parameters. One transfer per join, never on ordinary pulls.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

__all__ = ["StateLayout", "StateShare"]


class StateLayout(Protocol):
    """What the wire needs of an optimizer layout: its size, fingerprint and description."""

    @property
    def size(self) -> int:
        """Elements in the flat float32 buffer."""
        ...  # pragma: no cover

    @property
    def fingerprint(self) -> tuple[int, int]:
        """``(size, hash)``, compared before any value is used."""
        ...  # pragma: no cover

    def describe(self) -> str:
        """A short human-readable summary, for log lines."""
        ...  # pragma: no cover


class StateShare:
    """One node's optimizer state, copied into a buffer when a joiner asks for it.

    Args:
        layout: the optimizer's layout.
        fill: writes the optimizer state into a ``layout.size`` float32 buffer; called only
            on the training thread, from :meth:`serve`.
    """

    def __init__(self, layout: StateLayout, fill: Callable[[np.ndarray], object]) -> None:
        self.layout = layout
        self.buffer = np.zeros(layout.size, np.float32)
        self.clock = 0.0
        """The node's clock when the buffer was filled."""
        self.loss = 0.0
        self._fill = fill
        self._asked = 0  # requests made, and requests a fill has answered
        self._filled = 0
        self._changed = threading.Condition()
        self._sending = threading.Lock()  # held while a copy goes out: no fill meanwhile

    def request(self, wait: float) -> bool:
        """Ask for a fresh copy and wait (at most ``wait`` seconds) for the training thread.

        Returns:
            Whether a copy made after this call is in the buffer; send it under :meth:`held`.
        """
        deadline = time.monotonic() + wait
        with self._changed:
            self._asked += 1
            wanted = self._asked
            while self._filled < wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    @contextlib.contextmanager
    def held(self) -> Iterator[np.ndarray]:
        """The buffer, kept from refills while the caller sends it."""
        with self._sending:
            yield self.buffer

    def serve(self, clock: float, loss: float) -> bool:
        """On the training thread: fill the buffer if a joiner asked; True when it did.

        Skipped (until the next call) while a copy is going out.
        """
        with self._changed:
            wanted = self._asked
            if self._filled >= wanted:
                return False
        if not self._sending.acquire(blocking=False):
            return False
        try:
            self._fill(self.buffer)
            self.clock, self.loss = clock, loss
        finally:
            self._sending.release()
        with self._changed:
            self._filled = max(self._filled, wanted)
            self._changed.notify_all()
        return True
