"""Swarm progress: how many samples the whole cluster has trained, and how fast.

Each node counts the samples it trained itself (the ``samples`` given to ``step`` or
``publish``; not its clock, which blends with its peers' and so is no count). Every second after a
pull, the puller asks that peer for its own count with a small STATUS request on the same
connection (docs/PROTOCOL.md). The sum of this node's count and its peers' latest ones, each
moved on at that peer's rate since it was heard, estimates the samples the swarm has trained;
the rate is the sum of the nodes' rates (each its count's growth between its last two answers).

A learning-rate schedule or a stopping rule can follow the swarm instead of one node, as
hivemind's ProgressTracker gives a global epoch::

    progress = gossip.node.swarm()
    for group in optimizer.param_groups:
        group["lr"] = schedule(progress.epoch(samples_per_epoch))

A peer that has not answered within the last ``window`` seconds (60 s by default, or 10 x
``timeout_ms`` when that is longer), or whose pull failed, no longer counts as a node nor adds
to the rate, but what it trained stays trained: its last count stays in the sum. The estimate
never goes back, so a schedule driven by it is monotone. A peer's claimed count is bounded by
``robust.max_clock_lead`` times this node's clock (or its own count, if larger) before it gets
here, so one liar moves the estimate by at most ``lead`` times an honest node's share.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass

__all__ = ["SwarmProgress", "SwarmTracker"]

_MIN_INTERVAL = 0.2  # seconds between two observations for a rate measurement to count


@dataclass(frozen=True)
class SwarmProgress:
    """An estimate of the cluster's training progress, as one node sees it.

    Attributes:
        samples: samples trained by the swarm (this node's own count and its peers').
        samples_per_s: the swarm's training rate (the sum of the live nodes' rates).
        nodes: nodes counted: this one and the peers that answered within the window.
    """

    samples: float
    samples_per_s: float
    nodes: int

    def epoch(self, samples_per_epoch: float) -> int:
        """The swarm's epoch: whole passes of ``samples_per_epoch`` samples trained so far.

        Args:
            samples_per_epoch: samples in one epoch of the whole swarm (> 0).

        Raises:
            ValueError: ``samples_per_epoch`` is not a positive finite number.
        """
        if not (math.isfinite(samples_per_epoch) and samples_per_epoch > 0):
            raise ValueError(f"samples_per_epoch must be > 0, got {samples_per_epoch!r}")
        return int(self.samples // samples_per_epoch)

    def as_dict(self) -> dict[str, float]:
        """The fields as a dict, for stats and JSON lines."""
        return asdict(self)


@dataclass
class _Seen:
    clock: float  # the latest clock and when it was heard
    at: float
    since_clock: float  # where the current rate measurement began
    since: float
    rate: float | None = None
    gone: bool = False  # its pull failed: its last clock counts, it does not train on


class SwarmTracker:
    """Collects the clocks a node hears and this node's own rate; thread-safe.

    Args:
        window: seconds a peer keeps counting after its last answer.
    """

    def __init__(self, window: float = 60.0) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window!r}")
        self.window = window
        self._peers: dict[str, _Seen] = {}
        self._own: _Seen | None = None
        self._most = 0.0  # the largest estimate given out: the estimate never goes back
        self._lock = threading.Lock()

    def observe(self, peer: str, clock: float, now: float) -> None:
        """Record that ``peer`` has trained ``clock`` samples (already bounded) at ``now``."""
        if not math.isfinite(clock):
            return
        with self._lock:
            self._peers[peer] = _update(self._peers.get(peer), clock, now)

    def trained(self, clock: float, now: float) -> None:
        """Record this node's own sample count after a training step, for its rate."""
        with self._lock:
            self._own = _update(self._own, clock, now)

    def forget(self, peer: str) -> None:
        """``peer`` is gone (its pull failed, or it left): keep its last clock, not its rate."""
        with self._lock:
            seen = self._peers.get(peer)
            if seen is not None:
                seen.gone = True

    def progress(self, clock: float, now: float) -> SwarmProgress:
        """The estimate at time ``now``, with ``clock`` the samples this node trained."""
        with self._lock:
            own_rate = self._own.rate if self._own and self._own.rate is not None else 0.0
            samples, rate, nodes = clock, own_rate, 1
            for seen in self._peers.values():
                age = now - seen.at
                if seen.gone or age > self.window:
                    samples += seen.clock  # trained, and training no more (that we know of)
                    continue
                peer_rate = own_rate if seen.rate is None else seen.rate
                samples += seen.clock + peer_rate * max(age, 0.0)
                rate += peer_rate
                nodes += 1
            self._most = samples = max(samples, self._most)
        return SwarmProgress(samples, rate, nodes)


def _update(seen: _Seen | None, clock: float, now: float) -> _Seen:
    """``seen`` moved to ``clock`` at ``now``, its rate averaged with the latest growth."""
    if seen is None:
        return _Seen(clock, now, clock, now)
    interval = now - seen.since
    if interval < _MIN_INTERVAL:  # too soon to measure a rate: keep where the measurement began
        return _Seen(clock, now, seen.since_clock, seen.since, seen.rate)
    growth = max(clock - seen.since_clock, 0.0) / interval  # a blend can lower a clock
    rate = growth  # counts are exact (no blend moves them): the latest growth is the rate
    return _Seen(clock, now, clock, now, rate)
