"""A dpwa node: serves its parameters to peers and pulls theirs, beside the training loop.

The training thread calls :meth:`Node.update_send` before a step (publish, maybe start a pull)
and :meth:`Node.update_wait` after it (collect the pull and the interpolation factor). Network
work happens on two background threads, a server and a puller, so a slow or dead peer costs the
training thread at most ``timeout_ms``.

Shutdown: :meth:`Node.close` (or leaving a ``with Node(...)`` block) stops both threads and
frees the port. A node still open when the interpreter exits (e.g. after Ctrl+C's
``KeyboardInterrupt`` ended the training loop) is closed by an ``atexit`` hook. When the process
gets SIGTERM and nobody else handles it, every open node is closed and the signal is then
delivered with its default action, so the process still ends with "terminated by SIGTERM".
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import random
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpwa_core import shm
from dpwa_core._log import OncePerPeer, get_logger
from dpwa_core.adapters import lerp_inplace
from dpwa_core.config import Config, load_config
from dpwa_core.delta import add_inplace, add_scaled_inplace
from dpwa_core.drift import DriftCorrection
from dpwa_core.layout import Layout
from dpwa_core.peers import PeerTable
from dpwa_core.puller import Outcome, Puller, Ticket
from dpwa_core.robust import Clipper
from dpwa_core.server import Server
from dpwa_core.shm import SharedSegment
from dpwa_core.slices import SliceSchedule
from dpwa_core.snapshot import SnapshotBuffer
from dpwa_core.state_share import StateLayout, StateShare
from dpwa_core.swarm import SwarmProgress, SwarmTracker
from dpwa_core.tls import client_context, server_context
from dpwa_core.wire import slice_bounds, transfer_deadline

__all__ = ["Node", "PullResult"]

_log = get_logger("node")
Source = np.ndarray | Callable[[np.ndarray], object]
"""A model given to the node: a 1-D float32 array, or ``fill(out)`` writing it into ``out``."""
SpanSource = Callable[[np.ndarray, int], object]
"""``fill(out, offset)``: writes the model's elements ``offset`` to ``offset + len(out)``."""
_JOIN_RETRY = 0.02  # seconds between join rounds that found no model
_JOIN_BUSY_RETRY = 0.1  # ... and after one whose only models were busy being sent elsewhere
_JOIN_PATIENCE = 30.0  # seconds after which a joining node starts its own model anyway
_SEED_GRACE = 5.0  # seconds a node after the first waits for the nodes before it to come up
_SWARM_WINDOW = 60.0  # seconds a peer counts in the swarm's progress after its last answer
_STATE_TRIES = 3  # state pulls a joiner makes before it keeps its own optimizer state


@dataclass(frozen=True)
class PullResult:
    """A peer's snapshot, received, plus the factor to interpolate it with.

    ``params`` is a read-only view of the node's receive buffer: it stays valid until the next
    :meth:`Node.update_send`, which may start the next pull into the same buffer.
    """

    params: np.ndarray
    """The peer's parameters, 1-D float32 (clipped toward ours by ``robust.clip``). For a
    non-blocking pull (``step``), staleness-corrected: our model now plus the peer's lead over
    our model when we asked (:mod:`dpwa_core.delta`), so blending keeps our steps since."""
    factor: float
    """Factor in [0, 1], after the divergence rule: ``local = (1-f)*local + f*peer``."""
    peer: str
    """Name of the peer the snapshot came from."""
    clock: float
    """The peer's clock as it claimed it (the factor and our clock use it bounded by
    ``robust.max_clock_lead``, between 1/lead and lead times ours)."""
    loss: float
    """The peer's loss when it published the snapshot."""
    elapsed: float
    """Seconds from sending the request to the last byte of the answer."""
    steps_behind: int = 0
    """Training steps this node took between requesting the snapshot and blending it: how
    stale the peer's parameters are against ours (0 for a blocking pull)."""
    joined: bool = False
    """The pull was this node's catch-up copy (``start: shared``): factor 1, the peer's clock
    taken as ours."""
    lead: bool = False
    """``params`` holds the peer's lead over our model at the request (asked for with
    ``collect(lead=True)``): blend it as ``local += factor * params`` (on :attr:`span`)."""
    span: tuple[int, int] | None = None
    """The elements the pull covered, ``(first, stop)``: one slice of the model
    (:mod:`dpwa_core.slices`); None for the whole model. Outside it ``params`` is our own
    model when ``collect`` was given ``current``, and means nothing otherwise."""

    def blend_into(self, params: np.ndarray) -> np.ndarray:
        """Blend the peer's parameters into ``params`` in place and return ``params``.

        ``params = params + factor * (self.params - params)``, computed a cache-sized block at
        a time (:func:`~dpwa_core.adapters.lerp_inplace`): no model-sized temporary, factor 0
        keeps ``params`` and 1 gives the peer's exactly, and finite values never blend into
        Inf or NaN (the naive formula overflows float32 when ``params`` and the peer lie far
        apart, e.g. -3e38 and +3e38). For a :attr:`lead`, ``params[span] += factor *
        self.params[span]`` (:func:`~dpwa_core.delta.add_scaled_inplace`, saturating).

        Args:
            params: the node's writable float32 parameters, of the snapshot's size.

        Raises:
            ValueError: ``params`` has another shape or is read-only.
        """
        if not self.lead:
            return lerp_inplace(params, self.params, self.factor)
        if params.shape != self.params.shape:
            raise ValueError(
                f"cannot blend arrays of shapes {params.shape} and {self.params.shape}"
            )
        first, stop = self.span or (0, params.size)
        add_scaled_inplace(params[first:stop], self.params[first:stop], self.factor)
        return params


class Node:
    """One participant of a dpwa cluster.

    Args:
        config: a :class:`~dpwa_core.config.Config`, a path to a YAML file, or a mapping.
        name: this node's name in the config; defaults to the ``DPWA_NODE`` environment
            variable, else the launcher's rank (``RANK``, ``SLURM_PROCID``, ...) as an index
            into the config's nodes (docs/DEPLOY.md).
        layout: shapes of the parameter vector. Defaults to a plain vector whose size is taken
            from the first :meth:`update_send`. Peers refuse each other when layouts differ.
        seed: seeds the random choices (whether to pull, which peer) for reproducible runs.

    Call :meth:`update_send` and :meth:`update_wait` from one training thread; the node's own
    threads do the networking. With the config's ``auth`` and ``tls`` sections every connection,
    in and out, is authenticated and/or encrypted (docs/SECURITY.md); received parameters that
    hold NaN or Inf are refused unless ``reject_nonfinite`` is false, and the config's
    ``robust`` section bounds what one pull can do to the model (docs/CONFIG.md): the peer's
    vector is clipped toward ours and its claimed clock bounded.

    Raises:
        ConfigError: the config is invalid or does not name this node.
        OSError: the node's address cannot be bound.

    Example:
        >>> with Node("cluster.yaml", "w1") as node:              # doctest: +SKIP
        ...     node.update_send(params, loss)
        ...     result = node.update_wait(loss)
        ...     if result is not None:
        ...         result.blend_into(params)   # params += f * (peer - params), overflow-safe
    """

    def __init__(
        self,
        config: Config | str | os.PathLike[str] | Mapping[str, Any],
        name: str | None = None,
        *,
        layout: Layout | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = load_config(config)
        choice = self.config.choose_node(name)
        self.name = choice.name
        spec = self.config.node(self.name)
        self._strategy = self.config.make_strategy()
        self._rng = random.Random(seed)
        exponential = self.config.peer_choice == "exponential"
        self._peers = PeerTable(
            [(p.name, p.host, p.port) for p in self.config.peers_of(self.name)],
            random.Random(self._rng.getrandbits(64)),
            ring=[n.name for n in self.config.nodes] if exponential else None,
            me=self.name,
        )
        self.clock = 0.0
        """Samples trained so far, blended with peers' clocks on every interpolation."""
        self.loss = 0.0
        """The last loss given to update_send or update_wait."""
        self._layout: Layout | None = None
        self._snapshots: SnapshotBuffer | None = None
        self._puller: Puller | None = None
        self._pending: Ticket | None = None
        self._counts = {
            "pulls_ok": 0,
            "pulls_failed": 0,
            "pulls_timed_out": 0,
            "pulls_not_ready": 0,
            "clocks_bounded": 0,
        }
        self._robust = self.config.robust
        self._clipper: Clipper | None = None
        self._warn = OncePerPeer(_log)
        self._last_factor: float | None = None
        self._last_age: float | None = None
        self._last_behind: int | None = None
        self._steps = 0  # publish calls: one per training step
        self._samples = 0  # samples this node trained (its clock also takes its peers')
        self._swarm = SwarmTracker(window=max(_SWARM_WINDOW, 10 * self.config.timeout))
        self._blocked = 0.0  # seconds the training thread waited for pulls
        # Who this node's model came from: None while it joins (start: shared), else the peer
        # it copied, or its own name when its weights started the cluster's model.
        self._joined_from: str | None = None if self.config.start == "shared" else self.name
        self._join_started = time.monotonic()
        self._join_next = 0.0  # when the next join round may start
        self._join_patience = max(_JOIN_PATIENCE, 4 * self.config.timeout)
        self._join_s = 0.0  # seconds join() waited
        self._state_share: StateShare | None = None  # our optimizer state, for joiners
        self._state_from: str | None = None  # the sponsor whose optimizer state to take next
        self._state_tries = 0
        self._state_landed = False  # a state pull's answer waits in the puller's state_buffer
        self._state_taken_from: str | None = None
        self._last_peer: str | None = None  # the peer of the last blended pull
        self._drift: DriftCorrection | None = None
        self._last_blend_step = 0
        self._slicing: SliceSchedule | None = None  # built with the layout
        self._lock = threading.Lock()
        self._closed = False
        self._warned_loss = False
        tls = self.config.tls
        self._client_tls = client_context(tls, self.config.source) if tls else None
        self._secret = self.config.auth.secret if self.config.auth else None
        self._server = Server(
            spec.host,
            spec.port,
            self.config.timeout,
            name=self.name,
            members=[n.name for n in self.config.nodes],
            member_hosts=[n.host for n in self.config.nodes],
            secret=self._secret,
            tls=server_context(tls, self.config.source) if tls else None,
            wire_dtype=self.config.wire_dtype,
        )
        self._server.set_status(self._status)
        self._started_at = time.monotonic()
        if layout is not None:
            try:
                self._start(layout)
            except BaseException:
                self._server.close()
                raise
        self._pid = os.getpid()
        _live_nodes.add(self)
        _install_shutdown_hooks()
        extras = [k for k in ("auth", "tls") if getattr(self.config, k) is not None]
        _log.info(
            "%s listening on %s:%d%s%s",
            self.name,
            *self.address,
            f" ({' + '.join(extras)})" if extras else " (no auth: trusted networks only)",
            "" if choice.from_argument else f"; node name from {choice.source}",
        )

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the node's server is bound to."""
        return self._server.address

    @property
    def layout(self) -> Layout | None:
        """The parameter layout, or None before the first update_send of a layout-less node."""
        return self._layout

    def update_send(self, params: np.ndarray, loss: float, *, samples: int = 1) -> None:
        """Publish ``params``, advance the clock, and maybe start a pull (blocking API).

        The parameters are copied: the caller may change ``params`` as soon as this returns.
        With probability ``pull_probability`` a pull from a peer starts; collect it with
        :meth:`update_wait`, which waits for it. :meth:`step` is the call that never waits.

        Args:
            params: 1-D float32 array of the node's parameters.
            loss: the current training loss, sent to peers with the snapshot.
            samples: training samples since the last call; the clock advances by this much.

        Raises:
            TypeError: ``params`` is not a 1-D float32 numpy array.
            ValueError: ``params`` does not match the node's layout.
        """
        self.publish(params, loss, samples=samples)
        self.start_pull(blocking=True)

    def update_wait(self, loss: float) -> PullResult | None:
        """Wait for the pull that :meth:`update_send` started, and compute its factor.

        Returns within ``timeout_ms`` of the pull's start whatever the peers do. On success the
        node's clock becomes ``f * peer_clock + (1 - f) * clock``. The caller applies ``local =
        (1 - f) * local + f * result.params`` to its model, with :meth:`PullResult.blend_into`
        (overflow-safe, in place).

        With ``robust.max_clock_lead`` (default 2) the peer's clock counts between 1/lead and
        lead times ours, in the factor and in the clock update. With ``robust.clip`` (default on)
        the received vector is first clipped (on the puller's thread) toward this node's latest
        published snapshot: ``peer = local + min(1, radius / ||peer - local||) * (peer -
        local)``, ``radius`` being ``clip_scale`` times the median over peers of their recent
        distances (:mod:`dpwa_core.robust`).

        Args:
            loss: the current training loss (after the step), used by loss-based strategies and
                the divergence rule.

        Returns:
            The peer's snapshot and the factor, or None when no pull was started, it failed, or
            no peer answered within ``timeout_ms`` of the pull's start. While the node joins
            (``start: shared``) the result is a peer's model with factor 1 (``joined``).

        Raises:
            InterpolationError: the strategy returned NaN or a factor outside [0, 1].
        """
        return self.collect(loss, wait=True)

    def step(self, params: np.ndarray, loss: float, *, samples: int = 1) -> PullResult | None:
        """Gossip once per training step, after the optimizer step, without waiting.

        Blends a pull that has landed since the last call into ``params`` (in place, against
        the model as it is now), publishes ``params`` if a peer asked for them since the last
        publish, and starts the next pull when none is in flight. So a pull runs under as many
        steps as the link needs, at most one is in flight, and the pull rate follows the link.
        With ``blocking: true`` in the config this publishes, pulls and waits like
        :meth:`update_send` then :meth:`update_wait`, and blends.

        Args:
            params: the node's writable 1-D float32 parameters.
            loss: the training loss of this step.
            samples: training samples in this step; the clock advances by this much.

        Returns:
            The pull that was blended (its ``factor``, ``peer`` and ``steps_behind``), or None.

        Raises:
            TypeError: ``params`` is not a 1-D float32 numpy array.
            ValueError: ``params`` does not match the node's layout, or is read-only.
        """
        _check_flat(self.name, params, "step")
        if self.config.blocking:
            self.publish(params, loss, samples=samples)
            self.start_pull(blocking=True)
            result = self.collect(loss, wait=True)
            if result is not None:
                result.blend_into(params)
            return result
        result = self.collect(loss, lead=True)
        if result is not None:
            result.blend_into(params)
        self.publish(params, loss, samples=samples, lazy=True)
        self.start_pull(current=params)
        return result

    def publish(
        self,
        params: np.ndarray | Callable[[np.ndarray], object],
        loss: float,
        *,
        samples: int = 1,
        lazy: bool = False,
    ) -> bool:
        """Advance the clock by ``samples`` and make ``params`` the snapshot peers pull.

        Args:
            params: 1-D float32 parameters (copied), or ``fill(out)``, a function that writes
                the parameters into the node's ``layout.size``-element buffer ``out`` (how
                adapters publish without a temporary).
            loss: the current training loss, sent to peers with the snapshot.
            samples: training samples since the last call.
            lazy: copy only when a peer asked for the snapshot since the last publish (or
                nothing was published yet), so a model nobody pulls costs no copy.

        Returns:
            Whether a snapshot was written. Nothing is while the node joins (``start:
            shared``): peers must not blend its starting weights; nor when a slow send still
            holds the spare buffer (counted as ``snapshots_skipped``).

        Raises:
            TypeError: ``params`` is neither a 1-D float32 array nor callable.
            ValueError: ``params`` does not match the node's layout.
            RuntimeError: the node is closed, or ``params`` is a function and the node has no
                layout yet.
        """
        if self._closed:
            raise RuntimeError(f"{self.name}: publish on a closed node")
        if callable(params):
            if self._layout is None:
                raise RuntimeError(
                    f"{self.name}: publish with a function needs the node's layout; give Node a "
                    "layout, or publish an array first"
                )
            size, fill = self._layout.size, params
        else:
            _check_flat(self.name, params, "update_send")
            array = params
            size, fill = array.size, lambda out: np.copyto(out, array)
        self._check_size(size)
        assert self._snapshots is not None
        self.loss = float(loss)
        if not math.isfinite(self.loss) and not self._warned_loss:
            self._warned_loss = True
            _log.warning(
                "%s: loss is %s; peers refuse this node's snapshots until it is finite",
                self.name,
                self.loss,
            )
        self.clock += samples
        self._steps += 1
        self._samples += samples
        self._snapshots.tick()
        if self._slicing is not None:
            self._slicing.stepped(time.monotonic())
        if self._state_share is not None:
            self._serve_state(self._state_share)
        self._swarm.trained(self._samples, time.monotonic())
        self._snapshots.lazy = lazy
        pending = self._pending
        # A join round that found no model is decided here too, so a node that only publishes
        # (and never collects) still starts the cluster's model when it is first.
        if (
            self._joined_from is None
            and pending is not None
            and pending.done.is_set()
            and pending.outcome is not Outcome.OK
        ):
            self._pending = None
            self._joined(pending, 0)
        if self._joined_from is None or (lazy and not self._snapshots.wanted):
            return False
        return self._snapshots.publish(fill, self.clock, self.loss)

    @property
    def joined(self) -> bool:
        """Whether this node has its cluster's model (``start: shared``; always with ``own``)."""
        return self._joined_from is not None

    def join(self, loss: float = 0.0) -> PullResult | None:
        """Wait until this node has the cluster's model: a live peer's to copy, or its own.

        With ``start: shared`` a node that starts or restarts asks its peers, in config order,
        for their model. :meth:`step` does not wait for that: its join rounds run under the
        training steps like any pull, and the copy keeps the steps trained meanwhile
        (``peer + (now - at the request)``, :mod:`dpwa_core.delta`). Call this before the
        loop to start from the copy exactly instead. Returns at once when the node has joined
        already; waits at most 30 s (or 4 x ``timeout_ms``) plus one transfer, whatever the
        peers do; a dead peer holds nothing back.

        Args:
            loss: the current training loss, sent with the requests.

        Returns:
            The peer's model to copy (factor 1, ``joined`` true; blend it with
            :meth:`PullResult.blend_into`), or None when this node's own weights start the
            cluster's model (or it has joined already).
        """
        if self._layout is None or self._puller is None:
            raise RuntimeError(f"{self.name}: join needs the node's layout; publish first")
        began, blocked = time.monotonic(), self._blocked
        try:
            while self._joined_from is None and not self._closed:
                if self._pending is None and not self.start_pull():
                    time.sleep(max(0.0, self._join_next - time.monotonic()))
                    continue
                result = self.collect(loss, wait=True)
                if result is not None and result.joined:
                    return result
            return None
        finally:
            waited = time.monotonic() - began
            self._join_s += waited
            self._blocked = blocked + waited  # the waits for its pulls are part of it

    def start_pull(
        self,
        *,
        blocking: bool = False,
        current: Source | None = None,
        current_span: SpanSource | None = None,
    ) -> bool:
        """Start a pull from a peer unless one is in flight; collect it with :meth:`collect`.

        Starts one with probability ``pull_probability``. While the node joins (``start:
        shared``) it starts a join round instead, whatever ``pull_probability``: the peers are
        asked in turn for a model to copy.

        Args:
            blocking: the caller will wait for the pull, so it must end within ``timeout_ms``
                (the seed's contract). Otherwise it may take as long as the link needs: it is
                given up only when the peer sends nothing for ``timeout_ms``, or slower than
                :data:`~dpwa_core.wire.MIN_TRANSFER_RATE`.
            current: the model as it is now (an array, or ``fill(out)``). With it (and not
                ``blocking``) the pull is staleness-corrected (:mod:`dpwa_core.delta`): a copy
                is kept, and :meth:`collect` hands out ``current_then + (peer - copy)``.
            current_span: reads a range of the model (``fill(out, offset)``): with it (or an
                array as ``current``) a slice pull keeps a copy of its slice only, once every
                peer is known to be reached over TCP (a co-located peer is pulled whole).

        Returns:
            Whether a pull started.
        """
        if self._closed or self._puller is None or self._layout is None:
            return False
        pending = self._pending
        if pending is not None:
            return False  # at most one in flight; collect() hands it out
        names = self._peers.names()
        if not names:
            return False
        now = time.monotonic()
        if self._state_from is not None:
            return self._start_state_pull(self._state_from, now)
        if blocking:
            deadline = now + self.config.timeout
        else:
            deadline = transfer_deadline(now, self._layout.size * 4, self.config.timeout)
        # The request's loss is informational; keep it finite so peers accept the request.
        request_loss = self.loss if math.isfinite(self.loss) else 0.0
        join: tuple[str, ...] = ()
        if_idle = False
        if self._joined_from is None:
            if now < self._join_next:
                return False
            order = [n.name for n in self.config.nodes if n.name in names]
            join = (*order, *(n for n in names if n not in order))
            # Skip a sponsor busy sending (joiners then spread over the nodes that have the
            # model instead of sharing one link), until half the patience is spent.
            if_idle = now - self._join_started < self._join_patience / 2
        elif self._rng.random() >= self.config.pull_probability:
            return False
        delta = current is not None and not blocking
        slicing = self._slicing if delta and not join else None
        partial = False
        if current is not None and not blocking:
            if self._puller.reference is None:
                self._puller.reference = np.empty(self._layout.size, np.float32)
            reference = self._puller.reference  # no pull is in flight: ours to write
            if isinstance(current, np.ndarray) and current_span is None:
                array = current
                current_span = lambda out, offset: np.copyto(out, array[offset : offset + out.size])  # noqa: E731
            partial = (
                slicing is not None
                and slicing.slices > 1
                and current_span is not None
                and self._puller.over_tcp(self._addresses(names))
            )
            if partial:
                assert slicing is not None and current_span is not None
                first, stop = slice_bounds(self._layout.size, slicing.slices, slicing.index)
                current_span(reference[first:stop], first)
            else:
                _filler(current)(reference)
        self._pending = Ticket(
            deadline,
            self.clock,
            request_loss,
            join=join,
            step=self._steps,
            delta=delta,
            if_idle=if_idle,
            slices=slicing.slices if slicing else 0,
            slice_index=slicing.index if slicing else 0,
            partial=partial,
        )
        self._puller.submit(self._pending)
        return True

    def collect(
        self,
        loss: float,
        *,
        wait: bool = False,
        current: Source | None = None,
        lead: bool = False,
    ) -> PullResult | None:
        """Hand out the pull that :meth:`start_pull` started, once it has landed.

        Args:
            loss: the current training loss, used by loss-based strategies and the divergence
                rule.
            wait: wait for the pull (until its deadline); otherwise return None at once while
                it is still running.
            current: the model as it is now, for a staleness-corrected pull (see
                :meth:`start_pull`): the result's ``params`` are then ``current + (peer -
                model at the request)``, plus the drift correction divided by the factor
                (``drift_correction``, :mod:`dpwa_core.drift`). Without it they are the
                (clipped) peer's, plus that correction.
            lead: for a staleness-corrected pull, hand out the peer's lead itself (``peer -
                model at the request``, plus the drift correction divided by the factor) with
                ``PullResult.lead`` set, for ``local += factor * lead`` on ``PullResult.span``:
                one pass over the pulled elements, where ``current`` costs a copy of the whole
                model and an addition. ``current`` is then not used.

        Returns:
            The peer's snapshot and the factor to blend it with (see :meth:`update_wait`), or
            None: no pull, still running, failed, or timed out.

        Raises:
            InterpolationError: the strategy returned NaN or a factor outside [0, 1].
        """
        self.loss = float(loss)
        ticket = self._pending
        if ticket is None:
            return None
        remaining = ticket.deadline - time.monotonic()
        if not ticket.done.is_set():
            if not wait and remaining > 0:
                return None
            began = time.monotonic()
            ticket.done.wait(max(0.0, remaining))
            self._blocked += time.monotonic() - began
            if not ticket.done.is_set():
                ticket.resolve(Outcome.TIMED_OUT, ticket.peer)
        self._pending = None
        if ticket.state:
            self._state_pulled(ticket)
            return None
        if ticket.join:
            joined = self._joined(ticket, self._steps - ticket.step + (0 if wait else 1), lead)
            if joined is not None and not lead:
                self._add_current(ticket, current)
            return joined
        if ticket.outcome is not Outcome.OK:
            self._count(ticket.outcome)
            if ticket.outcome is Outcome.FAILED and ticket.peer:
                self._swarm.forget(ticket.peer)  # down, or hostile: no longer counted
            return None
        self._count(Outcome.OK)
        self._last_peer = ticket.peer
        peer_clock = self._bounded_clock(ticket.peer, ticket.peer_clock)
        factor = self._factor(peer_clock, ticket.peer_loss)
        # A non-blocking collect runs at the start of a step, before that step's publish: the
        # model has trained one step more than the count says.
        behind = self._steps - ticket.step + (0 if wait else 1)
        with self._lock:
            self._last_age = ticket.peer_clock - self.clock
            self._last_factor = factor
            self._last_behind = behind
        share = 1.0
        if ticket.span is not None and self._layout is not None:  # a slice: its share moves
            share = (ticket.span[1] - ticket.span[0]) / self._layout.size
        if self._slicing is not None and ticket.delta:
            self._slicing.landed(ticket.span is not None, ticket.over_tcp, ticket.elapsed)
        self.clock += factor * share * (peer_clock - self.clock)
        self._last_blend_step = self._steps
        if not lead:
            self._add_current(ticket, current)
        return self._result(ticket, factor, behind, lead)

    def _factor(self, peer_clock: float, peer_loss: float) -> float:
        """The interpolation factor for a pull: the strategy's, then the divergence rule."""
        factor = self._strategy(self.clock, peer_clock, self.loss, peer_loss)
        threshold = self.config.divergence_threshold
        if threshold > 0 and self.loss < threshold:
            # Near convergence, take less from peers so models can settle (the seed's rule).
            factor *= max(self.loss, 0.0) / threshold
        return factor

    def _addresses(self, names: list[str]) -> Iterator[tuple[str, int]]:
        for name in names:
            peer = self._peers.get(name)
            if peer is not None:
                yield peer.address

    def _lead(self, lead: np.ndarray, peer: str, ticket: Ticket, clock: float, loss: float) -> None:
        """Clip a landed pull's lead (robust.clip), then add the drift correction to it.

        On the puller's thread. The puller summed the lead's squares as it landed, so neither
        step needs a pass of its own to measure it.
        """
        assert self._puller is not None
        squares = self._puller.lead_squares
        if self._clipper is not None:
            reference = self._puller.reference
            assert reference is not None  # a staleness-corrected pull has one
            first, stop = ticket.span or (0, lead.size)
            # A slice of the model: distances in whole-model terms (see Clipper.clip).
            scale = math.sqrt(self._layout.size / lead.size) if self._layout else 1.0
            before = self._clipper.clipped
            squares = self._clipper.clip_lead(lead, squares, peer, reference[first:stop], scale)
            if self._clipper.clipped != before:
                self._clipped(peer)
        if self._drift is not None:
            self._correct_drift(lead, ticket, clock, loss, squares)

    def _correct_drift(
        self, lead: np.ndarray, ticket: Ticket, clock: float, loss: float, squares: float
    ) -> None:
        """Add the drift correction to a landed pull's lead (on the puller's thread).

        The factor is the one :meth:`collect` will compute at the next step (the same for the
        builtin strategies but ``loss``, whose loss may move by a step), and the steps are those
        since the last blend up to that step, so the training thread pays nothing for it. A
        slice (``ticket.span``) is corrected on its own elements, which the pulls, cycling
        through ``ticket.slices`` slices, blend once every that many pulls.
        """
        assert self._drift is not None
        try:
            factor = self._factor(self._clock_bound(clock), loss)
        except Exception:  # noqa: BLE001 - collect() raises it on the training thread
            return
        if not 0 < factor <= 1:
            return
        steps = self._steps - self._last_blend_step + 1
        known = squares if math.isfinite(squares) else None  # a NaN lead: measured again
        if ticket.span is None:
            self._drift.apply(lead, factor, steps, squares=known)
        else:
            self._drift.apply(
                lead, factor, steps * ticket.slices, offset=ticket.span[0], squares=known
            )

    def _add_current(self, ticket: Ticket, current: Source | None) -> None:
        """Turn a staleness-corrected answer (``peer - reference``) into what to blend toward.

        For a slice, the lead is added on the slice only and the rest of the buffer is our
        model itself, so the blend leaves it as it is.
        """
        if not ticket.delta:
            return
        assert self._puller is not None and self._puller.reference is not None
        reference = self._puller.reference  # free now: the pull is over
        if current is not None:
            _filler(current)(reference)
        buffer = self._puller.buffer
        if ticket.span is None:
            add_inplace(buffer, reference)
            return
        first, stop = ticket.span
        buffer[:first] = reference[:first]
        buffer[stop:] = reference[stop:]
        add_inplace(buffer[first:stop], reference[first:stop])

    def _result(self, ticket: Ticket, factor: float, behind: int, lead: bool = False) -> PullResult:
        assert self._puller is not None  # a ticket exists, so the puller was started
        params = self._puller.buffer.view()  # already clipped, on the puller's thread
        params.flags.writeable = False
        return PullResult(
            params,
            factor,
            ticket.peer,
            ticket.peer_clock,
            ticket.peer_loss,
            ticket.elapsed,
            behind,
            joined=ticket.join != () and ticket.outcome is Outcome.OK,
            lead=lead and ticket.delta,
            span=ticket.span,
        )

    def _joined(self, ticket: Ticket, behind: int, lead: bool = False) -> PullResult | None:
        """Finish a join round: copy the peer's model, start the cluster's, or ask again."""
        now = time.monotonic()
        if ticket.outcome is Outcome.OK:
            self._joined_from = ticket.peer
            self.clock = ticket.peer_clock
            if self._state_share is not None:
                self._state_from, self._state_tries = ticket.peer, 0
                self._server.set_state(self._state_share)
            _log.info(
                "%s joined the cluster: copied %s's model (clock %g)",
                self.name,
                ticket.peer,
                ticket.peer_clock,
            )
            return self._result(ticket, 1.0, behind, lead)
        mine = [n.name for n in self.config.nodes].index(self.name)
        before = {n.name for n in self.config.nodes[:mine]}
        waited = now - self._join_started
        if ticket.busy:  # a peer has a model and will have time for us soon
            self._join_next = now + _JOIN_BUSY_RETRY
        elif (
            ticket.outcome is Outcome.NOT_READY
            and not ticket.alive & before
            and before <= ticket.asked  # every node before it was asked (none cut off)
            and (not before or waited >= _SEED_GRACE)  # and had time to come up
        ):
            self._seed("no peer before it in the config is up with a model yet")
        elif waited > self._join_patience:
            self._seed(f"no peer gave it a model within {waited:.0f} s")
        else:
            self._join_next = now + _JOIN_RETRY
        return None

    def _seed(self, why: str) -> None:
        self._joined_from = self.name
        self._server.set_state(self._state_share)
        _log.info("%s starts the cluster's model from its own weights: %s", self.name, why)

    def _peer_samples(self, peer: str, samples: int) -> None:
        """A peer's own sample count (puller thread), bounded like its clock, for swarm()."""
        lead = self._robust.max_clock_lead
        bound = lead * max(self.clock, self._samples, 1.0)
        self._swarm.observe(peer, min(float(samples), bound), time.monotonic())

    def _serve_state(self, share: StateShare) -> None:
        """Fill the optimizer state for a joiner that asked; a failing fill is logged once."""
        try:
            share.serve(self.clock, self.loss)
        except Exception as exc:  # the user's optimizer: never let it break the training step
            self._state_share = None
            self._server.set_state(None)
            _log.warning(
                "%s: stopped sharing its optimizer state: reading it failed: %s", self.name, exc
            )

    def _start_state_pull(self, peer: str, now: float) -> bool:
        assert self._puller is not None and self._puller.state is not None
        nbytes = 4 * self._puller.state.size
        # The sponsor copies its state at its next step (up to timeout_ms), then sends it.
        deadline = transfer_deadline(now, nbytes, self.config.timeout) + self.config.timeout
        request_loss = self.loss if math.isfinite(self.loss) else 0.0
        self._pending = Ticket(
            deadline, self.clock, request_loss, join=(peer,), step=self._steps, state=True
        )
        self._puller.submit(self._pending)
        return True

    def _state_pulled(self, ticket: Ticket) -> None:
        """A state pull ended: hand its state out, try again, or keep our own."""
        peer = self._state_from
        self._state_tries += 1
        if ticket.outcome is Outcome.OK:
            self._state_from, self._state_landed = None, True
            self._state_taken_from = peer
            _log.info("%s took %s's optimizer state", self.name, peer)
        elif ticket.outcome is Outcome.FAILED or self._state_tries >= _STATE_TRIES:
            self._state_from = None  # refused, or it had none: the reason was logged
            _log.info("%s keeps its own optimizer state (%s gave none)", self.name, peer)

    def _check_size(self, size: int) -> None:
        """Start the node's threads with a flat layout of ``size`` if it has none; check it."""
        if self._layout is None:
            self._start(Layout.flat(size))
        assert self._layout is not None
        if size != self._layout.size:
            raise ValueError(
                f"{self.name}: got {size} parameters, the node's layout has "
                f"{self._layout.size} ({self._layout.describe()})"
            )

    def _bounded_clock(self, peer: str, claimed: float) -> float:
        """The peer's clock, between ``1/max_clock_lead`` and ``max_clock_lead`` times ours.

        Our clock counts as at least 1. Bounding both ways keeps the clock strategy's factor
        within ``[1/(1+lead), lead/(1+lead)]``: a liar cannot take more than that, and a node
        whose clock a liar inflated still takes at least ``1/(1+lead)`` from honest peers.
        """
        bounded = self._clock_bound(claimed)
        mine = max(self.clock, 1.0)
        lead = self._robust.max_clock_lead
        if bounded == claimed or claimed < mine:
            return bounded
        with self._lock:
            self._counts["clocks_bounded"] += 1
        self._warn.warning(
            peer,
            "clock",
            "%s: %s claims clock %g, more than robust.max_clock_lead (%g) times ours (%g); "
            "using %g",
            self.name,
            peer,
            claimed,
            lead,
            self.clock,
            bounded,
        )
        return bounded

    def _clock_bound(self, claimed: float) -> float:
        """``claimed`` bounded as :meth:`_bounded_clock` says, without counting or logging."""
        lead = self._robust.max_clock_lead
        mine = max(self.clock, 1.0)
        return min(max(claimed, mine / lead), mine * lead)

    def _clip(self, buffer: np.ndarray, peer: str) -> None:
        """Clip the receive buffer toward our latest published snapshot (robust.clip).

        For a pull that is not staleness-corrected (a staleness-corrected one is clipped as a
        lead, see :meth:`_lead`). Runs on the puller's thread once an answer is in, so the
        training thread never pays for the two passes over the model.
        """
        assert self._clipper is not None and self._snapshots is not None
        with self._snapshots.pinned() as snapshot:
            if snapshot is None:
                return
            if not self._clipper.clip(buffer, snapshot.params, peer):
                return
        self._clipped(peer)

    def _clipped(self, peer: str) -> None:
        """Log (once per peer, within the budget) that a pull from ``peer`` was clipped."""
        assert self._clipper is not None
        clipper = self._clipper
        self._warn.warning(
            peer,
            "clipped",
            "%s: clipped the parameters from %s: %.3g away from ours, more than the clip "
            "radius %.3g (robust.clip_scale x the median of recent distances)",
            self.name,
            peer,
            clipper.distance,
            clipper.radius,
        )

    def add_peer(self, name: str, host: str, port: int) -> None:
        """Start pulling from a peer that is not in the config (or move one to a new address)."""
        if name == self.name:
            raise ValueError(f"{self.name}: a node cannot be its own peer")
        self._peers.add(name, host, port)
        self._server.add_member(name, host)  # its server will pull from ours too

    def remove_peer(self, name: str) -> None:
        """Stop pulling from ``name``; its kept-alive connection is closed on the next pull.

        Raises:
            KeyError: no peer has that name.
        """
        self._peers.remove(name)
        self._swarm.forget(name)

    def wait_for_peers(self, count: int | None = None, timeout: float = 60.0) -> int:
        """Block until ``count`` peers accept a connection, or ``timeout`` seconds pass.

        Gossip needs no barrier, but a short job whose processes start a few seconds apart can
        finish before its peers are up; call this once before training to start together.

        Args:
            count: how many peers must be reachable; defaults to all of them.
            timeout: seconds to keep trying.

        Returns:
            The number of peers that accepted a connection.
        """
        peers = {
            name: peer.address
            for name in self._peers.names()
            if (peer := self._peers.get(name)) is not None
        }
        need = len(peers) if count is None else min(count, len(peers))
        reachable: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(reachable) < need and not self._closed:
            for name, address in peers.items():
                remaining = deadline - time.monotonic()
                if name in reachable or remaining <= 0:
                    continue
                try:
                    socket.create_connection(address, timeout=min(1.0, remaining)).close()
                    reachable.add(name)
                except OSError:
                    pass  # not up yet
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        _log.info("%s: %d of %d peers reachable", self.name, len(reachable), len(peers))
        return len(reachable)

    def peers(self) -> list[str]:
        """Names of the peers this node may pull from."""
        return self._peers.names()

    def share_optimizer_state(
        self, layout: StateLayout, fill: Callable[[np.ndarray], object]
    ) -> None:
        """Carry the optimizer state at catch-up: serve it to joiners, take a sponsor's.

        Once this node has its cluster's model, a joiner that copied the model from it may
        ask for its optimizer state too (one transfer per join, float32, never on ordinary
        pulls); ``fill(out)`` writes it on the training thread at the next :meth:`publish`.
        When this node joins later, it asks the peer it copied the model from for its state
        (up to 3 tries), which :meth:`take_optimizer_state` then hands out. A peer whose
        optimizer layout differs refuses, and both sides log both layouts. :func:`connect`
        calls this for the optimizer it is given.

        Args:
            layout: this node's optimizer layout (an
                :class:`~dpwa_core.optimizer_state.OptimizerLayout`).
            fill: writes the optimizer state into a ``layout.size`` float32 buffer.
        """
        share = StateShare(layout, fill)
        self._state_share = share
        if self._puller is not None:
            self._puller.set_state(layout)
        if self._joined_from is not None:
            self._server.set_state(share)

    def take_optimizer_state(self) -> np.ndarray | None:
        """The optimizer state a catch-up pulled from the sponsor, once; else None.

        Returns:
            A read-only float32 vector in this node's optimizer layout (checked: the
            sponsor's fingerprint matched and every value is finite), valid until the next
            pull starts: write it into the optimizer at once.
        """
        if not self._state_landed or self._puller is None:
            return None
        self._state_landed = False
        state = self._puller.state_buffer.view()
        state.flags.writeable = False
        return state

    def swarm(self) -> SwarmProgress:
        """The cluster's training progress as this node sees it (:mod:`dpwa_core.swarm`).

        Returns:
            ``samples`` (an estimate of the samples the swarm has trained: this node's own
            plus each peer's own count, which the puller asks a peer it pulled from every second,
            moved on at its rate since), ``samples_per_s`` and ``nodes``; ``epoch(n)`` gives the
            swarm's epoch for ``n`` samples per epoch, for schedules and stopping rules.
        """
        return self._swarm.progress(self._samples, time.monotonic())

    def stats(self) -> dict[str, Any]:
        """Counters of this node's gossip, for progress lines and dashboards.

        Returns:
            A dict with ``pulls_ok``, ``pulls_failed``, ``pulls_timed_out``, ``pulls_served``,
            ``bytes_in``, ``bytes_out``, ``rejected`` (connections refused for a bad request, a
            failed handshake or a timeout), ``rejected_nonfinite`` (peers' answers refused for
            holding NaN or Inf), ``evicted`` (idle connections closed to make room),
            ``connections`` (open now), ``snapshots_skipped``, ``pulls_not_ready`` (pulls
            that found the peer up but not publishing yet; not counted as failed), ``pulls_shm`` and
            ``served_shm`` (pulls and answers through shared memory, counted in the totals too),
            ``pull_s`` (seconds with a pull in flight: bytes_in * 8 / pull_s is the link rate
            pulls got; ``pull_wait_s`` of it from sending a request to the answer's first
            bytes, the peer's wait for a fresh snapshot, and ``pull_post_s`` from the answer's
            last byte to its blend being ready: clipping, the lead, drift correction),
            ``pulls_busy`` (peers that answered BUSY, so another was asked) and
            ``served_busy`` (pulls this node answered BUSY while sending to another peer),
            ``last_factor``, ``last_age`` (peer clock minus ours at the last pull), ``clock``,
            ``steps`` (publish calls: one per training step), ``snapshots_published`` (model
            copies made for peers), ``blocked_s`` (seconds the training thread waited for
            pulls, join rounds included), ``join_s`` (of which waiting to join),
            ``last_steps_behind`` (steps between requesting and blending the last pull),
            ``joined_from`` (the peer whose model this node copied when it joined, its
            own name when its weights started the cluster's model, None while it joins),
            ``scores`` (each peer's flow-control score) and ``peers`` (per peer: ``score``, its
            ``ok``, ``failed``, ``timed_out`` and ``clipped`` pull counts, and ``seconds``, the
            moving average of its TCP pull time); and from the
            ``robust`` section: ``pulls_clipped`` (pulls whose vector was clipped toward ours),
            ``clip_radius`` and ``clip_distance`` (the radius and the distance
            ``||peer - local||`` at the last pull; None before it or with ``clip: false``) and
            ``clocks_bounded`` (pulls whose peer claimed a clock beyond ``max_clock_lead``);
            ``optimizer_state_from`` (the sponsor whose optimizer state a catch-up took, or
            None), ``served_state`` (optimizer states sent to joiners),
            ``samples`` (samples this node trained itself), ``drift_blends`` and
            ``drift_norm`` (blends that :mod:`~dpwa_core.drift` corrected, and the length of the
            last correction; 0 with ``drift_correction: 0``), ``slices`` (how many slices
            the next pull over TCP cuts the model into, ``pull_slices``) and ``pulls_sliced``
            (pulls that brought one slice), ``pulls_scheduled`` (pulls that first asked the
            peer of the ``peer_choice: exponential`` schedule), ``pulls_shared`` (pulls that
            asked a busy peer anyway because every peer answered BUSY), and from
            :meth:`swarm`,
            ``swarm_samples``, ``swarm_samples_per_s`` and ``swarm_nodes``.
        """
        clipper = self._clipper
        with self._lock:
            stats: dict[str, Any] = dict(self._counts)
            stats["last_factor"] = self._last_factor
            stats["last_age"] = self._last_age
        stats["pulls_clipped"] = clipper.clipped if clipper else 0
        stats["clip_radius"] = clipper.radius if clipper else None
        stats["clip_distance"] = clipper.distance if clipper else None
        drift = self._drift
        stats["drift_blends"] = drift.blends if drift else 0
        slicing = self._slicing
        stats["slices"] = slicing.slices if slicing else 1
        stats["pulls_sliced"] = slicing.sliced if slicing else 0
        stats["drift_norm"] = drift.last_norm if drift else 0.0
        stats["pulls_scheduled"] = self._peers.scheduled
        stats["pulls_shared"] = self._puller.pulls_shared if self._puller else 0
        stats["pulls_served"] = self._server.served
        stats["bytes_out"] = self._server.bytes_out
        stats["rejected"] = self._server.rejected
        stats["rejected_nonfinite"] = self._puller.rejected_nonfinite if self._puller else 0
        stats["evicted"] = self._server.evicted
        stats["connections"] = self._server.connections
        stats["bytes_in"] = self._puller.bytes_in if self._puller else 0
        stats["pulls_shm"] = self._puller.pulls_shm if self._puller else 0
        stats["served_shm"] = self._server.served_shm
        stats["pull_s"] = self._puller.pull_s if self._puller else 0.0
        stats["pull_wait_s"] = self._puller.wait_s if self._puller else 0.0
        stats["pull_post_s"] = self._puller.post_s if self._puller else 0.0
        stats["pulls_busy"] = self._puller.pulls_busy if self._puller else 0
        stats["served_busy"] = self._server.served_busy
        stats["snapshots_skipped"] = self._snapshots.skipped if self._snapshots else 0
        stats["clock"] = self.clock
        stats["steps"] = self._steps
        stats["snapshots_published"] = self._snapshots.published if self._snapshots else 0
        stats["blocked_s"] = self._blocked
        stats["join_s"] = self._join_s
        stats["last_steps_behind"] = self._last_behind
        stats["joined_from"] = self._joined_from
        stats["scores"] = self._peers.scores()
        peers = self._peers.counts()
        clipped = dict(clipper.by_peer) if clipper else {}
        for name, counts in peers.items():
            counts["clipped"] = clipped.get(name, 0)
        stats["peers"] = peers
        stats["samples"] = self._samples
        stats["optimizer_state_from"] = self._state_taken_from
        stats["served_state"] = self._server.served_state
        progress = self.swarm()
        stats["swarm_samples"] = progress.samples
        stats["swarm_samples_per_s"] = progress.samples_per_s
        stats["swarm_nodes"] = progress.nodes
        return stats

    def _status(self) -> dict[str, Any]:
        """What a STATUS request gets (``dpwa status``): counters and names, no parameters."""
        stats = self.stats()
        keys = (
            "clock",
            "steps",
            "samples",
            "pulls_ok",
            "pulls_failed",
            "pulls_timed_out",
            "pulls_shm",
            "pulls_served",
            "served_shm",
            "bytes_in",
            "bytes_out",
            "joined_from",
            "swarm_samples",
            "swarm_nodes",
        )
        status: dict[str, Any] = {key: stats[key] for key in keys}
        status["name"] = self.name
        status["loss"] = self.loss if math.isfinite(self.loss) else None
        status["last_peer"] = self._last_peer
        status["transport"] = self.config.transport
        status["wire_dtype"] = self.config.wire_dtype
        status["uptime_s"] = time.monotonic() - self._started_at
        status["scores"] = stats["scores"]
        return status

    def close(self) -> None:
        """Stop both threads, close every socket and free the port (within a second)."""
        if self._closed:
            return
        self._closed = True
        _live_nodes.discard(self)
        self._server.close()
        if self._puller is not None:
            self._puller.close(timeout=0.5)
        if self._snapshots is not None:
            self._snapshots.close()
        _log.info("%s closed", self.name)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        host, port = self.address
        return f"Node({self.name!r}, {host}:{port}, clock={self.clock:g})"

    def _start(self, layout: Layout) -> None:
        if self._joined_from is None and not self._peers.names():
            self._seed("it has no peers")
        self._layout = layout
        self._snapshots = SnapshotBuffer(layout.size, self._shared_segment(layout))
        if self.config.drift_correction > 0:
            self._drift = DriftCorrection(layout.size, self.config.drift_correction)
        self._slicing = SliceSchedule(self.config.pull_slices, layout.size)
        if self._robust.clip:
            self._clipper = Clipper(self._robust, layout.size)
        share = self._state_share
        self._puller = Puller(
            self.name,
            self._peers,
            layout,
            secret=self._secret,
            tls=self._client_tls,
            reject_nonfinite=self.config.reject_nonfinite,
            transport=self.config.transport,
            on_received=self._clip if self._robust.clip else None,
            on_lead=self._lead if self._robust.clip or self._drift is not None else None,
            idle=self.config.timeout,
        )
        self._puller.on_samples = self._peer_samples
        if share is not None:
            self._puller.set_state(share.layout)
        self._server.set_source(layout, self._snapshots)

    def _shared_segment(self, layout: Layout) -> SharedSegment | None:
        """The segment for the snapshots when co-located peers may read them, else None."""
        if self.config.transport == "tcp" or not shm.available():
            return None
        try:
            return SharedSegment.create(layout.size, layout.shape_hash)
        except OSError as exc:
            _log.warning(
                "%s: cannot create shared memory for %s (%s); co-located peers pull over TCP",
                self.name,
                layout.describe(),
                exc,
            )
            return None

    def _count(self, outcome: Outcome | None) -> None:
        names = {
            Outcome.OK: "pulls_ok",
            Outcome.TIMED_OUT: "pulls_timed_out",
            Outcome.NOT_READY: "pulls_not_ready",
        }
        key = names.get(outcome, "pulls_failed")  # type: ignore[arg-type]
        with self._lock:
            self._counts[key] += 1


_live_nodes: weakref.WeakSet[Node] = weakref.WeakSet()
_hooks_installed = False


def close_all_nodes() -> None:
    """Close every node of this process that is still open (the atexit and SIGTERM hook).

    Nodes inherited by a forked child (e.g. a data-loader worker) are left alone: their
    sockets are shared with the parent, and shutting them down would cut the parent's peers.
    """
    for node in list(_live_nodes):
        if node._pid != os.getpid():
            continue
        try:
            node.close()
        except Exception:  # closing the others matters more than one failure
            _log.exception("%s: error while closing", node.name)


def _on_sigterm(signum: int, frame: object) -> None:
    close_all_nodes()
    # Then die of the signal as if we had never caught it, so supervisors see SIGTERM.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_shutdown_hooks() -> None:
    """Register the atexit hook once; take over SIGTERM only where nobody else has."""
    global _hooks_installed
    if not _hooks_installed:
        _hooks_installed = True
        atexit.register(close_all_nodes)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def _filler(source: Source) -> Callable[[np.ndarray], object]:
    """``fill(out)`` for an array (copied) or a fill function (itself)."""
    if callable(source):
        return source
    array = source
    return lambda out: np.copyto(out, array)


def _check_flat(name: str, params: object, call: str) -> None:
    if not isinstance(params, np.ndarray) or params.dtype != np.float32 or params.ndim != 1:
        raise TypeError(
            f"{name}: {call} expects a 1-D float32 numpy array, got {_describe(params)}; "
            "flatten it and call .astype(np.float32)"
        )


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.ndim}-D {value.dtype} array of shape {value.shape}"
    return type(value).__name__
