"""Logging helpers: everything logs under the ``dpwa`` logger, one line per event.

What a peer can make a node log is bounded: every ``dpwa`` log line has its control characters
escaped and is cut to :data:`MAX_LINE` characters (so a peer's text can neither forge a line nor
send terminal escapes), peer text kept in messages is cut by :func:`peer_text` first, and
:class:`OncePerPeer` bounds both the warnings and the memory a stream of distinct bad answers
can cost.
"""

from __future__ import annotations

import logging
import re
import threading
import time

__all__ = ["MAX_LINE", "OncePerPeer", "get_logger", "peer_text", "reason_of"]

MAX_LINE = 2000
"""Characters of one ``dpwa`` log message at most; the rest is cut."""
_MAX_REMEMBERED = 4096  # (peer, reason) keys kept; bounds the memory distinct bad peers cost
_MAX_REASON = 80  # characters of a reason key
_WARNINGS_PER_MINUTE = 60  # WARNING lines one OncePerPeer logs per minute at most
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def peer_text(text: str | bytes | bytearray, limit: int = 200) -> str:
    """Text a peer sent, fit to log or keep: at most ``limit`` characters, control chars escaped.

    Bytes are decoded as UTF-8 with replacement characters. The cut is made before escaping,
    so the work is bounded by ``limit`` whatever the input's size.
    """
    if isinstance(text, (bytes, bytearray)):
        cut = bytes(text[: 4 * limit]).decode("utf-8", "replace")
        more = len(text) > 4 * limit or len(cut) > limit
    else:
        cut, more = text, len(text) > limit
    cut = _escape(cut[:limit])
    return f"{cut}... ({len(text)} in all)" if more else cut


class _SafeLines(logging.Filter):
    """Escapes control characters in a record's message and cuts it to :data:`MAX_LINE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let logging report it as usual
            return True
        safe = _escape(message)
        if len(safe) > MAX_LINE:
            safe = safe[:MAX_LINE] + f"... ({len(safe)} characters in all)"
        if safe != message or record.args:
            record.msg, record.args = safe, None
        return True


_SAFE = _SafeLines()


def get_logger(name: str) -> logging.Logger:
    """The ``dpwa.<name>`` logger, whose lines are escaped and bounded."""
    logger = logging.getLogger(f"dpwa.{name}")
    if _SAFE not in logger.filters:
        logger.addFilter(_SAFE)
    return logger


class OncePerPeer:
    """Log a rejection reason at WARNING the first time per peer, at DEBUG after that.

    A hostile or broken peer that repeats the same mistake cannot flood the log, nor can one
    that makes a new mistake every time: a reason key is cut to 80 characters, at most 4096
    keys are remembered, and at most 60 lines (warnings and :meth:`recovered` lines) are logged
    per minute (the rest go to DEBUG, and one line says that they are being held back).
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._window = 0.0  # start of the current minute
        self._warned = 0  # WARNING lines in it

    def warning(self, peer: str, reason: str, message: str, *args: object) -> None:
        """Log ``message % args``; ``(peer, reason)`` decides whether it is a first."""
        key = (peer[:_MAX_REASON], reason[:_MAX_REASON])
        with self._lock:
            first = key not in self._seen
            if first:
                if len(self._seen) >= _MAX_REMEMBERED:
                    self._seen.clear()
                self._seen.add(key)
                first = self._spend()
        self._logger.log(logging.WARNING if first else logging.DEBUG, message, *args)

    def recovered(self, peer: str, message: str, *args: object) -> None:
        """Log ``message % args`` at INFO (within the same per-minute budget) and forget
        ``peer``'s reasons: its next failure is a first again."""
        with self._lock:
            self._seen = {key for key in self._seen if key[0] != peer[:_MAX_REASON]}
            shown = self._spend()
        self._logger.log(logging.INFO if shown else logging.DEBUG, message, *args)

    def forget(self, peer: str) -> None:
        """Forget ``peer``'s reasons (it recovered): its next failure is a first again."""
        with self._lock:
            self._seen = {key for key in self._seen if key[0] != peer[:_MAX_REASON]}

    def _spend(self) -> bool:
        """Take one line of this minute's budget (the lock is held); False when it is spent."""
        now = time.monotonic()
        if now - self._window >= 60.0:
            self._window, self._warned = now, 0
        self._warned += 1
        if self._warned == _WARNINGS_PER_MINUTE + 1:
            self._logger.warning(
                "more than %d rejections this minute; the rest are logged at DEBUG",
                _WARNINGS_PER_MINUTE,
            )
        return self._warned <= _WARNINGS_PER_MINUTE


_VARIABLE = re.compile(
    r"b?'[^']*'|b?\"[^\"]*\"|-?\b\d[\d.]*(?:e[+-]?\d+)?\b|\bnan\b|\binf\b|0x[0-9a-f]+"
)


def reason_of(message: str) -> str:
    """``message`` with its numbers and quoted values blanked: one key per kind of rejection.

    ``"bad magic b'GET '"`` and ``"bad magic b'xyz!'"`` are one reason, so a peer sending
    random bytes is logged once, not once per distinct value. Only the first 80 characters
    count, so text a peer sent later in the message never makes a new reason.
    """
    return _VARIABLE.sub("#", message[: 4 * _MAX_REASON])[:_MAX_REASON]
