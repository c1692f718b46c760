"""Run a dpwa cluster on Ray: one actor per node, and no hand-written host list.

Example:
    >>> def train(ctx):                                            # doctest: +SKIP
    ...     model = make_model()
    ...     with ctx.connect(model) as gossip:
    ...         for step in range(1000):
    ...             loss = train_step(model)
    ...             gossip.step(loss)
    ...         ctx.wait_for_all()  # serve until every node is done
    ...     return evaluate(model)
    >>> accuracies = dpwa_core.ray.run(train, num_nodes=8, config="settings.yaml",
    ...                                resources_per_node={"CPU": 2})   # doctest: +SKIP

How a run goes:

* **Placement.** One bundle of ``resources_per_node`` per node, in a placement group with the
  SPREAD strategy, so the nodes land on different machines where the cluster has them. Each
  node is an actor in its own bundle.
* **Addresses.** Each actor reserves a free TCP port on its own machine's IP address (as Ray
  knows it) and registers ``name -> host:port`` with a small directory actor. The node list is
  built from those registrations, so the config needs no ``nodes`` (one it has is replaced).
* **Training.** ``train_fn(ctx)`` runs in every actor with a :class:`NodeContext`: the node's
  name and rank, the full config, and :meth:`NodeContext.connect`, which is
  :func:`dpwa_core.connect` with that config and name. The return values come back to the
  caller in node order.
* **Restarts.** An actor whose process dies (killed, out of memory, its machine lost) is
  restarted by Ray, at most ``max_restarts`` times, and ``train_fn`` runs again in the new actor
  (``ctx.restarts`` says how many times that happened) while the other nodes train on. The new
  actor registers its address; the other nodes' handles pick it up within a second, so the node
  rejoins under its name. An exception raised by ``train_fn`` is not retried: a bug does not go
  away on a second run.
* **Failures.** A node that fails for good (an exception, or no restarts left) does not stop the
  others. When every node has ended, :func:`run` raises :class:`NodeFailedError`, which names
  each failed node, says why, and carries the results of the nodes that finished.
* **Progress.** Ray forwards each actor's output to the caller's terminal, every line prefixed
  with the node's name, e.g. ``(w2 pid=4711) step 300 loss 0.21``; dpwa's own log lines (peers
  failing and recovering) come the same way. :func:`run` adds a line when the nodes are placed,
  when one restarts, finishes or fails.

:func:`launch` (``dpwa launch --ray``) runs a command in each actor instead of a function.

Ray carries the config, the shared secret included, from the caller to the actors, and the
return values back: it is the cluster operator's trusted channel (docs/SECURITY.md). The peers'
parameters themselves travel over dpwa's own connections, as on any other cluster.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar

import yaml

from dpwa_core._log import get_logger
from dpwa_core.config import NODE_ENV, Config, NodeSpec, load_config
from dpwa_core.connect import Gossip, connect
from dpwa_core.errors import ConfigError, DpwaError
from dpwa_core.launch import CONFIG_ENV, CONFIG_PLACEHOLDER, NAME_PLACEHOLDER
from dpwa_core.layout import Layout
from dpwa_core.node import Node

__all__ = [
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_RESOURCES",
    "CommandNode",
    "NodeContext",
    "NodeFailedError",
    "launch",
    "run",
]

T = TypeVar("T")
State = TypeVar("State")

DEFAULT_RESOURCES: Mapping[str, float] = {"CPU": 1.0}
"""What each node asks of the cluster when ``resources_per_node`` is not given."""
DEFAULT_MAX_RESTARTS = 3
"""How many times Ray restarts a node whose process died, unless told otherwise."""


_WATCH_INTERVAL = 1.0  # seconds between a node's looks at the directory for moved peers
_POLL = 0.5  # seconds between the caller's looks at the nodes' progress
_WAIT_POLL = 0.2  # seconds between a waiting node's looks at who is done
_FAILURE_LINES = 25  # lines of a remote traceback kept in NodeFailedError

_log = get_logger("ray")


class NodeFailedError(DpwaError):
    """One or more nodes of a :func:`run` failed for good; the others finished.

    Args:
        failures: node name -> why it failed (the remote traceback's last lines, or the
            actor's death after its last restart).
        results: node name -> ``train_fn``'s return value, for the nodes that finished.
    """

    def __init__(self, failures: Mapping[str, str], results: Mapping[str, Any]) -> None:
        self.failures = dict(failures)
        """Node name -> why it failed."""
        self.results = dict(results)
        """Node name -> return value of each node that finished."""
        total = len(self.failures) + len(self.results)
        lines = [f"{len(self.failures)} of {total} nodes failed for good:"]
        lines += [f"--- {name}: {why}" for name, why in self.failures.items()]
        super().__init__("\n".join(lines))


class NodeContext:
    """What ``train_fn`` gets inside its actor: who this node is, and a ready ``connect``.

    Made by :func:`run`; a training function only reads it and calls :meth:`connect` (or
    :meth:`node` for a framework-free loop on flat numpy vectors).
    """

    def __init__(
        self, name: str, rank: int, config: Config, restarts: int, watcher: _PeerWatcher
    ) -> None:
        self.name = name
        """This node's name, e.g. ``"w2"``."""
        self.rank = rank
        """This node's index in :attr:`config`'s node list, from 0."""
        self.config = config
        """The cluster's config, with every node's address as Ray placed it."""
        self.restarts = restarts
        """How many times Ray restarted this node so far (0 on the first run)."""
        self._watcher = watcher

    @property
    def num_nodes(self) -> int:
        """How many nodes the cluster has."""
        return len(self.config.nodes)

    def connect(
        self,
        model: State,
        framework: str | None = None,
        *,
        seed: int | None = None,
        zero_copy: bool = True,
    ) -> Gossip[State]:
        """Join ``model`` to the cluster as this node; :func:`dpwa_core.connect` with its config.

        The handle follows the other nodes: when one is restarted at a new address, it pulls
        from the new address within a second.

        Args:
            model: the model or its state (see :func:`dpwa_core.connect`).
            framework: adapter name; None picks it from the model's type.
            seed: seeds the node's random choices.
            zero_copy: let the adapter rearrange the model's memory (see
                :func:`dpwa_core.connect`).

        Returns:
            The :class:`~dpwa_core.connect.Gossip` handle; close it (or use ``with``) when done.
        """
        gossip = connect(model, self.config, self.name, framework, seed=seed, zero_copy=zero_copy)
        self._watcher.follow(gossip.node)
        return gossip

    def node(self, *, layout: Layout | None = None, seed: int | None = None) -> Node:
        """Start this node for a loop that trades flat float32 numpy vectors itself.

        Args:
            layout: the parameter layout; None takes a plain vector from the first send.
            seed: seeds the node's random choices.

        Returns:
            The :class:`~dpwa_core.node.Node`, following moved peers like :meth:`connect`.
        """
        node = Node(self.config, self.name, layout=layout, seed=seed)
        self._watcher.follow(node)
        return node

    def wait_for_all(self, timeout: float = 600.0) -> bool:
        """Say this node is done training, and wait until every node is done too.

        Nodes finish at different times. One that closes as soon as it is done leaves the late
        ones to train alone on their own data, drifting away from the rest. Call this after
        the training loop, still inside ``with ctx.connect(...)``: the node keeps serving its
        final parameters while it waits, so the late nodes go on averaging with it. A node
        that failed for good counts as done.

        Args:
            timeout: seconds to wait at most.

        Returns:
            True when every node is done; False when ``timeout`` passed first.
        """
        ray = _import_ray()
        directory = self._watcher.directory
        ray.get(directory.finish.remote(self.name))
        everyone = {spec.name for spec in self.config.nodes}
        deadline = time.monotonic() + timeout
        while not everyone <= set(ray.get(directory.finished.remote())):
            if time.monotonic() >= deadline:
                _log.warning("%s: still waiting for other nodes after %g s", self.name, timeout)
                return False
            time.sleep(_WAIT_POLL)
        return True

    def __repr__(self) -> str:
        return f"NodeContext({self.name!r}, rank={self.rank}, restarts={self.restarts})"


def run(
    train_fn: Callable[[NodeContext], T],
    num_nodes: int | None = None,
    config: Config | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    resources_per_node: Mapping[str, float] | None = None,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    names: Sequence[str] | None = None,
    address: str | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    placement_timeout: float = 120.0,
    verbose: bool = True,
) -> list[T]:
    """Run ``train_fn`` on ``num_nodes`` dpwa nodes, each a Ray actor; return their results.

    Args:
        train_fn: called once in each actor with its :class:`NodeContext` (again after a
            restart); it must be picklable (a module-level function, or one Ray can pickle).
        num_nodes: how many nodes; None takes the number of nodes the config lists.
        config: the cluster settings: a YAML path (read here, on the caller's machine), a
            mapping or a :class:`~dpwa_core.config.Config`. Its ``nodes`` may be left out; a
            node list it has gives the nodes' names when ``num_nodes`` matches it, and its
            addresses are replaced. None uses every default.
        resources_per_node: what each node's actor asks of Ray, e.g. ``{"CPU": 2, "GPU": 1}``
            (``memory`` in bytes and custom resources too). Default: one CPU.
        max_restarts: how many times Ray restarts a node whose process died, >= 0.
        names: the nodes' names; default: the config's, else ``w1`` .. ``wN``.
        address: the Ray cluster to join when Ray is not initialised yet (``"auto"``,
            ``"ray://head:10001"``, ...); None starts or finds one as ``ray.init()`` does.
        runtime_env: Ray's runtime environment for the nodes, e.g. ``{"working_dir": "."}``
            to ship this folder's code to every machine. It is given to ``ray.init`` when
            this call connects to Ray; when Ray is initialised already, to the actors (Ray
            then takes only remote URIs as ``working_dir``).
        placement_timeout: seconds to wait for the cluster to have room for every node.
        verbose: print placement, restarts and results to stderr.

    Returns:
        ``train_fn``'s return values, in node order.

    Raises:
        ImportError: Ray is not installed (``pip install 'dpwa[ray]'``).
        ConfigError: the config is invalid, or the node count or names are.
        DpwaError: the cluster has no room for the nodes within ``placement_timeout``.
        NodeFailedError: a node failed for good; the others' results are attached.
    """
    ray = _import_ray()
    settings, node_names = _settings(config, num_nodes, names)
    resources = _resources(resources_per_node)
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ConfigError(f"max_restarts must be an integer >= 0, got {max_restarts!r}")
    say = _Reporter(verbose)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, runtime_env=None if runtime_env is None else dict(runtime_env))
    elif address is not None:
        _log.warning("Ray is initialised already; address=%r is ignored", address)
    actor_env = None if started_ray else runtime_env
    group = directory = None
    actors: list[Any] = []
    try:
        group = _place(ray, resources, len(node_names), placement_timeout)
        directory_name = f"dpwa-directory-{uuid.uuid4().hex}"
        directory = ray.remote(num_cpus=0)(_Directory).options(name=directory_name).remote()
        actors = _start_actors(
            ray, group, directory_name, node_names, resources, max_restarts, actor_env
        )
        addresses = ray.get([actor.address.remote() for actor in actors], timeout=placement_timeout)
        say.line(
            f"{len(node_names)} nodes placed: "
            + ", ".join(f"{n} at {h}:{p}" for n, (h, p) in zip(node_names, addresses, strict=True))
        )
        calls = {
            actor.train.remote(train_fn, settings, list(node_names)): name
            for actor, name in zip(actors, node_names, strict=True)
        }
        results, failures = _collect(ray, calls, directory, max_restarts, say)
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if directory is not None:
            with contextlib.suppress(Exception):
                ray.kill(directory)
        if group is not None:
            with contextlib.suppress(Exception):
                importlib.import_module("ray.util.placement_group").remove_placement_group(group)
        if started_ray:
            ray.shutdown()
    if failures:
        raise NodeFailedError(failures, results)
    return [results[name] for name in node_names]


class CommandNode:
    """A ``train_fn`` that runs a command as the node: what ``dpwa launch --ray`` does.

    In its actor, it writes the cluster config (every node's address included) to a private
    folder on the actor's machine, then runs ``command`` with ``{name}`` and ``{config}``
    replaced by the node's name and that file's path, and with ``DPWA_NODE`` and
    ``DPWA_CONFIG`` set. The command's output lines are printed, so Ray forwards them with the
    node's name. A command killed by a signal counts as the node dying: the actor ends with
    it, and Ray restarts the node (within ``max_restarts``). A command that exits with a
    non-zero status fails the node for good.

    Args:
        command: the program and its arguments.
    """

    def __init__(self, command: Sequence[str]) -> None:
        if not command:
            raise ConfigError("no command to run: give the program and its arguments")
        self.command = tuple(command)
        """The command, with its ``{name}`` and ``{config}`` placeholders."""

    def __call__(self, ctx: NodeContext) -> int:
        folder = tempfile.mkdtemp(prefix=f"dpwa-{ctx.name}-")
        try:
            path, env = _write_node_config(ctx.config, ctx.name, folder)
            argv = [
                arg.replace(NAME_PLACEHOLDER, ctx.name).replace(CONFIG_PLACEHOLDER, path)
                for arg in self.command
            ]
            code = _run_relayed(argv, env, ctx.name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if code < 0:
            print(
                f"{ctx.name}: the command was killed by {_signal_name(-code)}; "
                "ending this node so Ray restarts it",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)  # an unexpected death is what makes Ray restart an actor
        if code > 0:
            raise DpwaError(f"{ctx.name}: {' '.join(argv)} exited with status {code}")
        return 0


def launch(
    config: Config | str | os.PathLike[str] | Mapping[str, Any],
    command: Sequence[str],
    *,
    num_nodes: int | None = None,
    address: str | None = None,
    resources_per_node: Mapping[str, float] | None = None,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    runtime_env: Mapping[str, Any] | None = None,
) -> int:
    """Run ``command`` as every node of a Ray-placed cluster; the ``dpwa launch --ray`` API.

    Args:
        config: the cluster settings; its ``nodes`` may be left out when ``num_nodes`` is given.
        command: the program each node runs (see :class:`CommandNode`).
        num_nodes: how many nodes; None takes the number the config lists.
        address: the Ray cluster to join (see :func:`run`).
        resources_per_node: what each node asks of Ray (see :func:`run`).
        max_restarts: how many times a node whose process died is restarted.
        runtime_env: Ray's runtime environment for the nodes; the command runs in its
            ``working_dir`` when it has one.

    Returns:
        0 when every node's command exited with 0, else 1; the failed nodes are named on
        stderr.

    Raises:
        ImportError: Ray is not installed.
        ConfigError: the config, node count or command is invalid.
    """
    node = CommandNode(command)
    try:
        run(
            node,
            num_nodes,
            config,
            resources_per_node=resources_per_node,
            max_restarts=max_restarts,
            address=address,
            runtime_env=runtime_env,
        )
    except NodeFailedError as exc:
        print(f"dpwa launch --ray: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


# --- the caller's side --------------------------------------------------------------------


def _import_ray() -> ModuleType:
    # Ray folds similar lines of different actors into one ("[repeated 3x across cluster]"),
    # which would hide nodes' progress lines; keep them all unless the user decided otherwise.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stdout.isatty():  # no color codes in logs and pipes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ImportError(
            f"dpwa_core.ray needs Ray, which is not installed ({exc}). "
            "Install it with: pip install 'dpwa[ray]'"
        ) from exc


def _settings(
    config: Config | str | os.PathLike[str] | Mapping[str, Any] | None,
    num_nodes: int | None,
    names: Sequence[str] | None,
) -> tuple[Config, tuple[str, ...]]:
    """The checked settings, with placeholder addresses, and the nodes' names."""
    listed: tuple[str, ...] = ()
    if isinstance(config, Config):
        listed = tuple(spec.name for spec in config.nodes)
    elif isinstance(config, (str, os.PathLike, Mapping)):
        with contextlib.suppress(ConfigError):
            listed = tuple(spec.name for spec in load_config(config).nodes)
    if num_nodes is not None and (
        isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1
    ):
        raise ConfigError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    if names is not None:
        chosen = tuple(names)
        if num_nodes is not None and len(chosen) != num_nodes:
            raise ConfigError(f"num_nodes={num_nodes} but {len(chosen)} names were given")
    elif listed and num_nodes in (None, len(listed)):
        chosen = listed
    elif num_nodes is not None:
        chosen = tuple(f"w{i}" for i in range(1, num_nodes + 1))
    else:
        raise ConfigError(
            "how many nodes? Pass num_nodes=N (dpwa launch --ray --nodes N), or list the "
            "nodes in the config"
        )
    if listed and chosen != listed:
        _log.info("the config's %d nodes are replaced by %d Ray nodes", len(listed), len(chosen))
    # Real addresses come from the actors; these placeholders let the settings be checked now.
    pending = [NodeSpec(name, "pending.invalid", i + 1) for i, name in enumerate(chosen)]
    return load_config(config if config is not None else {}, nodes=pending), chosen


def _resources(requested: Mapping[str, float] | None) -> dict[str, float]:
    resources = dict(DEFAULT_RESOURCES if requested is None else requested)
    for key, value in resources.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not isinstance(key, str) or not number or value < 0:
            raise ConfigError(
                f"resources_per_node[{key!r}] must be a number >= 0, got {value!r}; "
                'e.g. {"CPU": 1, "GPU": 0.5}'
            )
    resources = {key: float(value) for key, value in resources.items() if value > 0}
    if not resources:
        raise ConfigError('resources_per_node must ask for something, e.g. {"CPU": 1}')
    return resources


def _place(ray: Any, resources: dict[str, float], count: int, timeout: float) -> Any:
    """A placement group of one bundle per node, spread over the machines, ready."""
    groups = importlib.import_module("ray.util.placement_group")
    group = groups.placement_group([dict(resources)] * count, strategy="SPREAD")
    ready, _ = ray.wait([group.ready()], timeout=timeout)
    if not ready:
        groups.remove_placement_group(group)
        raise DpwaError(
            f"the Ray cluster found no room for {count} nodes of {resources} each within "
            f"{timeout:g} s; it has {ray.cluster_resources()} in all and "
            f"{ray.available_resources()} free. Ask for less (resources_per_node, num_nodes) "
            "or add machines."
        )
    return group


def _start_actors(
    ray: Any,
    group: Any,
    directory: str,
    names: Sequence[str],
    resources: Mapping[str, float],
    max_restarts: int,
    runtime_env: Mapping[str, Any] | None,
) -> list[Any]:
    strategies = importlib.import_module("ray.util.scheduling_strategies")
    others = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    actor_class = ray.remote(_NodeActor)
    actors = []
    for rank, name in enumerate(names):
        options: dict[str, Any] = {
            "num_cpus": resources.get("CPU", 0),
            "num_gpus": resources.get("GPU", 0),
            "resources": others,
            "max_restarts": max_restarts,
            "max_task_retries": max_restarts,
            "scheduling_strategy": strategies.PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank
            ),
        }
        if "memory" in resources:
            options["memory"] = resources["memory"]
        if runtime_env is not None:
            options["runtime_env"] = dict(runtime_env)
        actors.append(actor_class.options(**options).remote(name, rank, directory))
    return actors


def _collect(
    ray: Any, calls: dict[Any, str], directory: Any, max_restarts: int, say: _Reporter
) -> tuple[dict[str, Any], dict[str, str]]:
    """Wait for every node; report restarts as they happen. Returns (results, failures)."""
    exceptions = importlib.import_module("ray.exceptions")
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    pending = dict(calls)
    seen = 0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL)
        with contextlib.suppress(exceptions.RayError):
            events = ray.get(directory.events.remote(seen), timeout=10)
            seen += len(events)
            for name, host, port, restarts in events:
                if restarts:
                    say.line(
                        f"{name} was restarted ({restarts} of {max_restarts}) and rejoined "
                        f"at {host}:{port}"
                    )
        for ref in done:
            name = pending.pop(ref)
            directory.finish.remote(name)  # whatever happened, nobody waits for it any more
            try:
                results[name] = ray.get(ref)
            except exceptions.RayActorError as exc:
                failures[name] = (
                    f"its process died and no restarts were left (max_restarts={max_restarts}): "
                    f"{_last_lines(str(exc), 3)}"
                )
                say.line(f"{name} failed for good: its process died after its last restart")
            except exceptions.RayTaskError as exc:
                failures[name] = f"train_fn raised:\n{_last_lines(str(exc), _FAILURE_LINES)}"
                say.line(f"{name} failed: train_fn raised {type(exc.cause).__name__}")
            else:
                say.line(f"{name} finished ({len(results)} of {len(calls)})")
    return results, failures


class _Reporter:
    """The caller's progress lines, on stderr."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def line(self, text: str) -> None:
        if self.verbose:
            print(f"[dpwa.ray] {text}", file=sys.stderr, flush=True)


def _last_lines(text: str, count: int) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


# --- inside the cluster --------------------------------------------------------------------


class _Directory:
    """Ray actor: every node's current address, and who joined when (restarts included)."""

    def __init__(self) -> None:
        self._addresses: dict[str, tuple[str, int]] = {}
        self._joins: dict[str, int] = {}
        self._events: list[tuple[str, str, int, int]] = []
        self._finished: set[str] = set()

    def register(self, name: str, host: str, port: int) -> int:
        """Record ``name``'s address; returns how many times it registered before."""
        restarts = self._joins.get(name, 0)
        self._joins[name] = restarts + 1
        self._addresses[name] = (host, port)
        self._events.append((name, host, port, restarts))
        return restarts

    def lookup(self, name: str) -> tuple[str, int] | None:
        """``name``'s last address, or None."""
        return self._addresses.get(name)

    def addresses(self) -> dict[str, tuple[str, int]]:
        """Every node's current address."""
        return dict(self._addresses)

    def events(self, start: int) -> list[tuple[str, str, int, int]]:
        """Registrations from index ``start`` on: (name, host, port, restarts)."""
        return self._events[start:]

    def finish(self, name: str) -> None:
        """Record that ``name`` is done training (or failed for good)."""
        self._finished.add(name)

    def finished(self) -> list[str]:
        """The nodes that are done."""
        return sorted(self._finished)


class _NodeActor:
    """Ray actor: one dpwa node. Reserves its port when created, runs ``train_fn`` on demand."""

    def __init__(self, name: str, rank: int, directory: str) -> None:
        ray = _import_ray()
        self._name = name
        self._rank = rank
        # By name, not handle: Ray keeps a restartable actor's arguments, and a plain string
        # is the one kind it can always give back.
        self._directory = ray.get_actor(directory)
        _show_dpwa_logs()
        host = ray.util.get_node_ip_address()
        # After a restart on the same machine, take the old port back when it is free, so
        # peers that have not looked at the directory yet still reach this node.
        previous = ray.get(self._directory.lookup.remote(name))
        old_port = previous[1] if previous is not None and previous[0] == host else 0
        self._reservation = _reserve_port(host, old_port)
        self._address = (host, self._reservation.getsockname()[1])
        self._restarts = ray.get(self._directory.register.remote(name, *self._address))

    def __repr__(self) -> str:
        return self._name  # Ray prefixes the actor's output lines with this

    def address(self) -> tuple[str, int]:
        """The host and port this node serves on."""
        return self._address

    def train(self, train_fn: Callable[[NodeContext], T], settings: Config, names: list[str]) -> T:
        """Run ``train_fn`` as this node; close what it left open."""
        ray = _import_ray()
        addresses = ray.get(self._directory.addresses.remote())
        config = settings.with_nodes(NodeSpec(n, *addresses[n]) for n in names)
        watcher = _PeerWatcher(self._directory, self._name, addresses)
        try:
            with watcher:
                return train_fn(
                    NodeContext(self._name, self._rank, config, self._restarts, watcher)
                )
        finally:
            self._reservation.close()


class _PeerWatcher:
    """A thread that moves this node's peers to the addresses restarted nodes registered."""

    def __init__(self, directory: Any, name: str, known: Mapping[str, tuple[str, int]]) -> None:
        self.directory = directory
        """The run's directory actor."""
        self._name = name
        self._known = dict(known)
        self._nodes: weakref.WeakSet[Node] = weakref.WeakSet()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"dpwa-ray-{name}", daemon=True)

    def follow(self, node: Node) -> None:
        self._nodes.add(node)

    def __enter__(self) -> _PeerWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for node in list(self._nodes):
            node.close()

    def _watch(self) -> None:
        ray = _import_ray()
        while not self._stop.wait(_WATCH_INTERVAL):
            try:
                addresses = ray.get(self.directory.addresses.remote(), timeout=10)
            except Exception:  # the directory is gone or slow: the run is ending
                continue
            for name, address in addresses.items():
                if name == self._name or self._known.get(name) == address:
                    continue
                self._known[name] = address
                for node in list(self._nodes):
                    node.add_peer(name, *address)
                _log.info("%s: peer %s is now at %s:%d", self._name, name, *address)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen on) a port so no one else takes it before the node listens there.

    The node's server binds the same port with SO_REUSEADDR, which Linux allows while no
    socket listens on it yet; the reservation is closed when training ends.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in dict.fromkeys((port, 0)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            if candidate == 0:
                raise
            continue
        return sock
    raise AssertionError("unreachable: port 0 binds or raises")


def _show_dpwa_logs() -> None:
    """Send dpwa's INFO lines to stderr in the actor, so Ray forwards them to the caller."""
    logger = logging.getLogger("dpwa")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _write_node_config(config: Config, name: str, folder: str) -> tuple[str, dict[str, str]]:
    """Write ``config`` for a node's command; return its path and the command's environment."""
    mapping = config.to_mapping()
    if config.auth is not None:  # the secret goes in a file only this user can read
        secret = os.path.join(folder, "secret")
        descriptor = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(config.auth.secret)
        mapping["auth"] = {"secret_file": secret}
    path = os.path.join(folder, "cluster.yaml")
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(mapping, file, sort_keys=False)
    env = {**os.environ, NODE_ENV: name, CONFIG_ENV: path}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return path, env


def _run_relayed(argv: list[str], env: dict[str, str], name: str) -> int:
    """Run ``argv``, print its output line by line, return its status (-N: signal N)."""
    try:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl
        )
    except OSError as exc:
        raise DpwaError(f"{name}: cannot start {argv[0]!r}: {exc.strerror}") from exc
    assert proc.stdout is not None
    with proc:
        for line in _lines(proc.stdout):
            print(line, end="" if line.endswith("\n") else "\n", flush=True)
    return proc.returncode


def _lines(stream: Any) -> Iterator[str]:
    for raw in stream:
        yield raw.decode("utf-8", errors="replace")


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the actor's process dies, so no node outlives it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
