"""The peer table and its flow control: which peer to pull from next.

With ``peer_choice: exponential`` a pull first asks the peer of the one-peer exponential graph
(Ying et al. 2021): the nodes in config order form a ring, and the ``r``-th pull of the node at
position ``i`` asks the node at ``(i + 2**(r mod L)) mod n``, ``L = ceil(log2 n)``. In each
round every node asks a different one, so while the nodes' rounds keep in step no two pullers
share one server's uplink, and every node is reached every ``L`` pulls. A scheduled peer that
failed or timed out lately (score under :data:`SCHEDULED_SCORE`), or that answers BUSY, gives
way to the draw below, so a dead peer costs one timeout, not one pull in ``L``.

Each peer has a score in ``[MIN_SCORE, 1]``. A successful pull moves the score halfway back to 1;
a failure halves it and a timeout quarters it. The next peer is drawn at random with probability
proportional to its score, so a slow or dead peer is picked rarely, but never never: the random
term keeps probing it, and one success brings it back into rotation. A pull whose peer answers
BUSY (it is sending to someone else) draws again among the peers not yet asked.

Each peer also keeps a moving average of how long its successful pulls over TCP took
(``seconds`` in :meth:`PeerTable.counts`), for dashboards; the draw does not use it yet: a
weighting by it (a peer ``k`` times slower than the median drawn ``1/k**2`` as often) kept the
fast nodes off a 10 Mbit/s peer in the lab, but one slow early pull then kept a peer off for
good, since only a draw can correct its average.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = ["MIN_SCORE", "PEER_CHOICES", "SCHEDULED_SCORE", "Peer", "PeerTable", "exponential_hop"]

MIN_SCORE = 0.01
PEER_CHOICES = ("exponential", "random")
"""Values of ``peer_choice``: the exponential graph's schedule first, or a draw every time."""
SCHEDULED_SCORE = 0.75
"""A scheduled peer whose score is below this (one failure, or a timeout) is not asked first."""
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


def exponential_hop(position: int, count: int, round_: int) -> int:
    """The position the ``round_``-th pull of the node at ``position`` asks, among ``count``.

    Args:
        position: this node's place in the ring (its index in the config's nodes).
        count: nodes in the ring, this one included (at least 2).
        round_: pulls this node asked for before this one.

    Raises:
        ValueError: fewer than 2 nodes, or a position outside the ring.
    """
    if count < 2 or not 0 <= position < count:
        raise ValueError(f"position {position} in a ring of {count}: need 0 <= position < count")
    hops = (count - 1).bit_length()
    return (position + (1 << (round_ % hops))) % count


class PeerTable:
    """Thread-safe set of peers with flow-control scores.

    Args:
        peers: initial ``(name, host, port)`` triples.
        rng: random source for peer choice (seed it for reproducible runs).
        ring: with ``peer_choice: exponential``, every node's name in config order, this
            node's included; None draws every peer.
        me: this node's name in ``ring``.
    """

    def __init__(
        self,
        peers: list[tuple[str, str, int]],
        rng: random.Random | None = None,
        *,
        ring: Sequence[str] | None = None,
        me: str | None = None,
    ) -> None:
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()
        self._rng = rng or random.Random()
        if ring is not None and (me not in ring or len(set(ring)) != len(ring)):
            raise ValueError(f"ring {list(ring)!r} must hold distinct names, {me!r} among them")
        self._ring = tuple(ring) if ring is not None and len(ring) > 1 else None
        self._position = self._ring.index(me) if self._ring is not None else 0
        self.rounds = 0
        """Pulls :meth:`next_peer` chose for so far (the exponential schedule's round)."""
        self.scheduled = 0
        """Of those, pulls that asked the schedule's peer first."""
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

    def choose(self, exclude: Collection[str] = ()) -> Peer | None:
        """Draw a peer with probability proportional to its score; None when there are none.

        Args:
            exclude: names not to draw (peers already asked for this pull).
        """
        with self._lock:
            peers = [p for p in self._peers.values() if p.name not in exclude]
            if not peers:
                return None
            return self._rng.choices(peers, weights=[p.score for p in peers])[0]

    def next_peer(self) -> Peer | None:
        """The peer a new pull asks first: the schedule's, or drawn (see the module docstring).

        Each call is one round of the schedule, whoever it returns.
        """
        with self._lock:
            round_, self.rounds = self.rounds, self.rounds + 1
            if self._ring is not None:
                name = self._ring[exponential_hop(self._position, len(self._ring), round_)]
                peer = self._peers.get(name)
                if peer is not None and peer.score >= SCHEDULED_SCORE:
                    self.scheduled += 1
                    return peer
        return self.choose()

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
