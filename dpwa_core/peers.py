"""The peer table and its flow control: which peer to pull from next.

Each peer has a score in ``[MIN_SCORE, 1]``. A successful pull moves the score halfway back to 1;
a failure halves it and a timeout quarters it. The next peer is drawn at random with probability
proportional to its score, so a slow or dead peer is picked rarely, but never never: the random
term keeps probing it, and one success brings it back into rotation. A pull whose peer answers
BUSY (it is sending to someone else) draws again among the peers not yet asked, leaving out
those more than twice as slow as the median (else the idle slow peer would catch every pull
that finds the fast ones busy).

The draw also follows the links: each peer keeps a moving average of how long its successful
pulls took, and a peer whose pulls take ``k`` times the median peer's is drawn ``1/k**2`` as
often (peers at or under the median are not favoured). A peer behind a slow link is then pulled
rarely, and the time a puller spends on it falls as ``1/k``, while the slow node itself keeps
pulling its faster peers. Only pulls over TCP are timed (the puller passes no time for one read
from shared memory), so co-located peers never crowd out the peers on other hosts; peers
without a timed pull count as the median.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["MIN_SCORE", "Peer", "PeerTable"]

MIN_SCORE = 0.01
_FAILURE_DECAY = 0.5
_TIMEOUT_DECAY = 0.25
_SECONDS_WEIGHT = 0.3  # weight of the newest pull in a peer's moving average of pull time


@dataclass
class Peer:
    """One peer: where it listens and how it has behaved."""

    name: str
    host: str
    port: int
    score: float = 1.0
    ok: int = 0
    failed: int = 0
    timed_out: int = 0
    seconds: float | None = None
    """Moving average of how long this peer's successful pulls took; None before the first."""

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the peer listens on."""
        return self.host, self.port


class PeerTable:
    """Thread-safe set of peers with flow-control scores.

    Args:
        peers: initial ``(name, host, port)`` triples.
        rng: random source for peer choice (seed it for reproducible runs).
    """

    def __init__(self, peers: list[tuple[str, str, int]], rng: random.Random | None = None) -> None:
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()
        self._rng = rng or random.Random()
        for name, host, port in peers:
            self.add(name, host, port)

    def add(self, name: str, host: str, port: int) -> None:
        """Add a peer, or move an existing one to a new address (its score is reset).

        Raises:
            ValueError: the port is outside 1..65535.
        """
        if not 0 < port < 65536:
            raise ValueError(f"peer {name!r}: port {port} is outside 1..65535")
        with self._lock:
            self._peers[name] = Peer(name, host, port)

    def remove(self, name: str) -> None:
        """Forget a peer.

        Raises:
            KeyError: no peer has that name.
        """
        with self._lock:
            if name not in self._peers:
                known = ", ".join(sorted(self._peers)) or "none"
                raise KeyError(f"no peer named {name!r}; peers: {known}")
            del self._peers[name]

    def get(self, name: str) -> Peer | None:
        """The peer named ``name``, or None."""
        with self._lock:
            return self._peers.get(name)

    def names(self) -> list[str]:
        """Names of all peers."""
        with self._lock:
            return list(self._peers)

    def choose(
        self, exclude: Collection[str] = (), max_slowdown: float | None = None
    ) -> Peer | None:
        """Draw a peer with probability proportional to its score; None when there are none.

        Args:
            exclude: names not to draw (peers already asked for this pull).
            max_slowdown: draw only among peers whose pulls take at most this many times the
                median's (a draw again after BUSY: the only idle peer may be the slow one).
        """
        with self._lock:
            timed = sorted(p.seconds for p in self._peers.values() if p.seconds is not None)
            median = timed[(len(timed) - 1) // 2] if timed else 0.0  # the lower median
            peers, weights = [], []
            for p in self._peers.values():
                pace = min(1.0, median / p.seconds) if p.seconds else 1.0
                if p.name in exclude or (max_slowdown and pace * max_slowdown < 1.0):
                    continue
                peers.append(p)
                weights.append(p.score * pace**2)
            if not peers:
                return None
            return self._rng.choices(peers, weights=weights)[0]

    def record_success(self, name: str, seconds: float | None = None) -> None:
        """A pull from ``name`` succeeded: raise its score halfway to 1.

        Args:
            name: the peer.
            seconds: how long the pull took, for the peer's moving average (None: not timed).
        """
        with self._lock:
            peer = self._peers.get(name)
            if peer is not None:
                peer.ok += 1
                peer.score += (1.0 - peer.score) / 2
                if seconds is not None and seconds > 0:
                    old = peer.seconds
                    new = seconds if old is None else old + _SECONDS_WEIGHT * (seconds - old)
                    peer.seconds = new

    def record_failure(self, name: str) -> None:
        """A pull from ``name`` failed (refused, reset, malformed): halve its score."""
        with self._lock:
            peer = self._peers.get(name)
            if peer is not None:
                peer.failed += 1
                peer.score = max(MIN_SCORE, peer.score * _FAILURE_DECAY)

    def record_timeout(self, name: str) -> None:
        """A pull from ``name`` timed out: quarter its score."""
        with self._lock:
            peer = self._peers.get(name)
            if peer is not None:
                peer.timed_out += 1
                peer.score = max(MIN_SCORE, peer.score * _TIMEOUT_DECAY)

    def counts(self) -> dict[str, dict[str, float | None]]:
        """Each peer's ``score``, its ``ok``, ``failed`` and ``timed_out`` pull counts, and
        ``seconds`` (moving average of its pull time; None before one finished)."""
        with self._lock:
            return {
                name: {
                    "score": peer.score,
                    "ok": peer.ok,
                    "failed": peer.failed,
                    "timed_out": peer.timed_out,
                    "seconds": peer.seconds,
                }
                for name, peer in self._peers.items()
            }

    def scores(self) -> dict[str, float]:
        """Current flow-control score of every peer."""
        with self._lock:
            return {name: peer.score for name, peer in self._peers.items()}
