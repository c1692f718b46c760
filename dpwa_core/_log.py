"""Logging helpers: everything logs under the ``dpwa`` logger, one line per event."""

from __future__ import annotations

import logging
import re
import threading

__all__ = ["OncePerPeer", "get_logger", "reason_of"]

_MAX_REMEMBERED = 4096  # bound the memory a stream of distinct bad peers can make us use


def get_logger(name: str) -> logging.Logger:
    """The ``dpwa.<name>`` logger."""
    return logging.getLogger(f"dpwa.{name}")


class OncePerPeer:
    """Log a rejection reason at WARNING the first time per peer, at DEBUG after that.

    A hostile or broken peer that repeats the same mistake cannot flood the log.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def warning(self, peer: str, reason: str, message: str, *args: object) -> None:
        """Log ``message % args``; ``(peer, reason)`` decides whether it is a first."""
        key = (peer, reason)
        with self._lock:
            first = key not in self._seen
            if first:
                if len(self._seen) >= _MAX_REMEMBERED:
                    self._seen.clear()
                self._seen.add(key)
        self._logger.log(logging.WARNING if first else logging.DEBUG, message, *args)

    def forget(self, peer: str) -> None:
        """Forget ``peer``'s reasons (it recovered): its next failure is a first again."""
        with self._lock:
            self._seen = {key for key in self._seen if key[0] != peer}


_VARIABLE = re.compile(
    r"b?'[^']*'|b?\"[^\"]*\"|-?\b\d[\d.]*(?:e[+-]?\d+)?\b|\bnan\b|\binf\b|0x[0-9a-f]+"
)


def reason_of(message: str) -> str:
    """``message`` with its numbers and quoted values blanked: one key per kind of rejection.

    ``"bad magic b'GET '"`` and ``"bad magic b'xyz!'"`` are one reason, so a peer sending
    random bytes is logged once, not once per distinct value.
    """
    return _VARIABLE.sub("#", message)
