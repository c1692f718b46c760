"""Start the nodes of a cluster config on this machine: ``dpwa launch CONFIG -- COMMAND``.

Each selected node runs ``COMMAND`` in its own process, with ``DPWA_NODE`` set to the node's
name, every ``{name}`` in the command replaced by it and every ``{config}`` by the config
file's path. The launcher prefixes each line the
nodes print with ``[NAME] `` (stdout to stdout, stderr to stderr), forwards SIGINT, SIGTERM and
SIGHUP to every node, and exits non-zero when a node fails.

Only nodes whose host is this machine can be started here; the launcher never starts anything
elsewhere. On a cluster of several hosts, every host runs the launcher with the same config and
``--only`` naming its own nodes. With ``--ray``, :func:`dpwa_core.ray.launch` places the nodes
on a Ray cluster instead (docs/DEPLOY.md).

Behaviour, in detail:

* **Processes.** Every node starts in its own session (process group), so a Ctrl+C in the
  terminal reaches only the launcher, which forwards the signal once to each node's whole group.
  A node that is still running ``grace`` seconds after that is killed (SIGKILL); a second
  Ctrl+C kills at once. Standard input is not passed on. ``PYTHONUNBUFFERED=1`` is set unless
  the environment sets it already, so Python nodes' lines appear as they are printed.
* **A failing node.** By default the other nodes keep running: gossip tolerates a missing peer,
  so they finish their work without it. With ``fail_fast`` the launcher stops them (SIGTERM,
  then SIGKILL after ``grace``) as soon as one node fails.
* **Exit status.** 0 when every node exited with 0. When the launcher got a signal: 128 + the
  signal's number (130 for SIGINT, 143 for SIGTERM). Otherwise the status of the first node to
  fail: its exit code, or 128 + N when signal N killed it. The last line on stderr names every
  node that failed and how.

The work is split so that other ways of starting nodes can reuse it: :func:`plan` turns a config,
a command and a node selection into :class:`NodeJob` s (argv and environment per node),
:func:`check_local` refuses nodes that are not on this machine, and :func:`run_local` runs jobs
as local processes. A launcher that places jobs elsewhere (a cluster scheduler, Ray actors)
would take the same jobs and skip :func:`check_local`; one that learns this host's share from
its launcher's rank variables would compute ``only`` before calling :func:`plan`.

Example:
    >>> launch("cluster.yaml", ["python", "train.py", "--log", "{name}.log"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, TextIO

from dpwa_core.config import NODE_ENV, Config, NodeSpec, load_config
from dpwa_core.errors import DpwaError

__all__ = [
    "CONFIG_ENV",
    "CONFIG_PLACEHOLDER",
    "DEFAULT_GRACE",
    "DESCRIPTION",
    "FORWARDED_SIGNALS",
    "LaunchError",
    "NAME_PLACEHOLDER",
    "NodeJob",
    "check_local",
    "is_local_host",
    "add_arguments",
    "launch",
    "launch_command",
    "plan",
    "run_local",
    "select_nodes",
]

DEFAULT_GRACE = 10.0
"""Seconds a node has to exit after a forwarded signal before it is killed."""

FORWARDED_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
"""Signals the launcher passes on to every node (SIGHUP where the system has it)."""

NAME_PLACEHOLDER = "{name}"
"""Replaced by the node's name in every argument of the command."""
CONFIG_PLACEHOLDER = "{config}"
"""Replaced by the config file's path in every argument of the command."""
CONFIG_ENV = "DPWA_CONFIG"
"""Set in each node's environment to the config file's path."""

_POLL = 0.05  # seconds between checks of the nodes and of received signals
_MAX_LINE = 64 * 1024  # a longer line is passed on in pieces, each with the prefix
_DRAIN = 2.0  # seconds to wait for a node's output after its process exited


class LaunchError(DpwaError):
    """The nodes cannot be launched: unknown or remote nodes, an empty or missing command."""


@dataclass(frozen=True)
class NodeJob:
    """One node's process, ready to start: its name, argv and full environment."""

    name: str
    """The node's name in the config; also the output prefix."""
    argv: tuple[str, ...]
    """The command, with ``{name}`` replaced."""
    env: Mapping[str, str]
    """The complete environment, with ``DPWA_NODE`` (and ``DPWA_CONFIG``) set."""


def select_nodes(config: Config, only: str | Iterable[str] | None = None) -> tuple[NodeSpec, ...]:
    """Return the nodes to start: all of them, or those named by ``only``, in config order.

    Args:
        config: the cluster config.
        only: node names, as an iterable or one comma-separated string such as ``"w1,w3"``;
            ``None`` selects every node.

    Returns:
        The selected nodes.

    Raises:
        LaunchError: a name is not in the config (the message lists the known ones), or
            ``only`` names no node at all.
    """
    if only is None:
        return config.nodes
    names = only.split(",") if isinstance(only, str) else list(only)
    wanted = [name.strip() for name in names if name.strip()]
    known = [spec.name for spec in config.nodes]
    if not wanted:
        raise LaunchError(f"--only names no node. Known nodes in {config.source}: {_join(known)}.")
    unknown = [name for name in dict.fromkeys(wanted) if name not in known]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise LaunchError(
            f"--only: no node{plural} named {_join(unknown)} in {config.source}. "
            f"Known nodes: {_join(known)}."
        )
    return tuple(spec for spec in config.nodes if spec.name in wanted)


def plan(
    config: Config | str | os.PathLike[str] | Mapping[str, Any],
    command: Sequence[str],
    only: str | Iterable[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[NodeJob]:
    """Build one :class:`NodeJob` per selected node.

    Args:
        config: a :class:`~dpwa_core.config.Config`, a path to a YAML file, or a mapping.
        command: the program and its arguments; ``{name}`` in any argument becomes the node's
            name, and ``{config}`` the config file's absolute path.
        only: the nodes to run (see :func:`select_nodes`); ``None`` runs all of them.
        environ: the environment to start from; defaults to this process's.

    Returns:
        The jobs, in config order.

    Raises:
        ConfigError: the config is invalid.
        LaunchError: the command is empty, ``only`` names an unknown node, or the command
            has ``{config}`` but the config is not a file.
    """
    loaded = load_config(config)
    path = os.path.abspath(loaded.source) if os.path.isfile(loaded.source) else None
    if path is None and any(CONFIG_PLACEHOLDER in arg for arg in command):
        raise LaunchError(
            f"the command has {CONFIG_PLACEHOLDER} but the config is not a file; pass the "
            "config's path"
        )
    if not command:
        raise LaunchError(
            "no command to run. Put it after --, e.g. "
            f"dpwa launch {loaded.source} -- python train.py --node {NAME_PLACEHOLDER}"
        )
    base = dict(os.environ if environ is None else environ)
    base.setdefault("PYTHONUNBUFFERED", "1")
    jobs = []
    for spec in select_nodes(loaded, only):
        argv = tuple(
            arg.replace(NAME_PLACEHOLDER, spec.name).replace(CONFIG_PLACEHOLDER, path or "")
            for arg in command
        )
        env = {**base, NODE_ENV: spec.name, **({CONFIG_ENV: path} if path else {})}
        jobs.append(NodeJob(spec.name, argv, env))
    return jobs


def is_local_host(host: str) -> bool:
    """Whether ``host`` is this machine, judged without sending any traffic to it.

    Local are: ``localhost``, loopback addresses (127.0.0.0/8, ::1), the unspecified addresses
    (0.0.0.0, ::), this machine's host name and fully qualified name, any address this machine
    can bind, and any name that resolves only to such addresses.

    Args:
        host: a host name or IP address, as in a config's ``host`` key.

    Returns:
        True when the host is this machine.
    """
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = _ip(name)
    if address is not None:
        return _is_local_address(address)
    if name in _own_names():
        return True
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {_ip(str(info[4][0])) for info in infos}
    return bool(addresses) and all(a is not None and _is_local_address(a) for a in addresses)


def check_local(config: Config, names: Iterable[str]) -> None:
    """Refuse to start nodes whose host is not this machine.

    Args:
        config: the cluster config.
        names: the nodes about to start here.

    Raises:
        LaunchError: some node's host is not this machine; the message tells how to use
            ``--only`` on each host.
    """
    wanted = set(names)
    local = {spec.name for spec in config.nodes if is_local_host(spec.host)}
    remote = [spec for spec in config.nodes if spec.name in wanted and spec.name not in local]
    if not remote:
        return
    where = ", ".join(f"{spec.name} on {spec.host}" for spec in remote)
    here = [spec.name for spec in config.nodes if spec.name in local]
    hint = f"here that is --only {','.join(here)}" if here else "no node of it is on this machine"
    raise LaunchError(
        f"{config.source}: {where}: not an address of this machine ({socket.gethostname()}). "
        "dpwa launch starts processes on this machine only. On each host of the cluster, run "
        f"`dpwa launch {config.source} --only NAMES -- COMMAND` with the nodes of that host "
        f"({hint})."
    )


def run_local(
    jobs: Sequence[NodeJob],
    *,
    grace: float = DEFAULT_GRACE,
    fail_fast: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``jobs`` as processes on this machine until all of them exit.

    Signal forwarding needs the main thread; called from another thread, the launcher does
    not catch signals.

    Args:
        jobs: the nodes to run, e.g. from :func:`plan`.
        grace: seconds a node has to exit after a forwarded signal before it is killed.
        fail_fast: stop the other nodes as soon as one fails.
        stdout: where the nodes' prefixed stdout goes; defaults to ``sys.stdout``.
        stderr: where their prefixed stderr and the launcher's own lines go; defaults to
            ``sys.stderr``.

    Returns:
        The exit status described in this module's docstring: 0 when every node succeeded.

    Raises:
        LaunchError: a node's program cannot be started (the nodes started so far are
            stopped first), or this system has no process groups.
    """
    if not hasattr(os, "killpg"):
        raise LaunchError("dpwa launch needs a POSIX system (Linux, macOS): it uses process groups")
    if grace < 0:
        raise LaunchError(f"--grace must be >= 0 seconds, got {grace}")
    if not jobs:
        raise LaunchError("no node to launch")
    supervisor = _Supervisor(jobs, grace, fail_fast, stdout or sys.stdout, stderr or sys.stderr)
    return supervisor.run()


def launch(
    config: Config | str | os.PathLike[str] | Mapping[str, Any],
    command: Sequence[str],
    only: str | Iterable[str] | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    fail_fast: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Start the config's nodes on this machine and wait for all of them; the ``dpwa launch`` API.

    Args:
        config: a :class:`~dpwa_core.config.Config`, a path to a YAML file, or a mapping.
        command: the program and arguments each node runs; ``{name}`` becomes the node's name.
        only: the nodes to start, e.g. ``"w1,w3"``; ``None`` starts every node.
        grace: seconds a node has to exit after a forwarded signal before it is killed.
        fail_fast: stop the other nodes as soon as one fails.
        stdout: where the nodes' prefixed stdout goes; defaults to ``sys.stdout``.
        stderr: where their prefixed stderr and the launcher's lines go; defaults to
            ``sys.stderr``.

    Returns:
        0 when every node exited with 0; else non-zero, as this module's docstring describes.

    Raises:
        ConfigError: the config is invalid.
        LaunchError: an unknown node in ``only``, a node not on this machine, an empty
            command, or a program that cannot be started.
    """
    loaded = load_config(config)
    jobs = plan(loaded, command, only)
    check_local(loaded, (job.name for job in jobs))
    return run_local(jobs, grace=grace, fail_fast=fail_fast, stdout=stdout, stderr=stderr)


DESCRIPTION = """\
Start the nodes of a cluster config on this machine, one process per node, and wait for them.

Each node runs COMMAND with DPWA_NODE set to its name; {name} in COMMAND is replaced by the
name too. Every output line is prefixed with [NAME]. Ctrl+C or SIGTERM is forwarded to all
nodes; a node still running after --grace seconds is killed. A node that fails does not stop
the others unless --fail-fast is given.

Exit status: 0 when every node exited with 0; 128+N after the launcher got signal N (130 for
Ctrl+C); otherwise the status of the first node to fail.

Only nodes on this machine can start here. On a multi-host cluster, run the same config on
every host with --only naming that host's nodes.

With --ray, the nodes are Ray actors placed over a Ray cluster's machines (one per machine
where it can); each node's address is found when it starts, so the config needs no node list,
and {config} in COMMAND becomes the path of a config written on the node's machine with every
node's address in it. A node whose process dies is restarted by Ray (--max-restarts); output
lines come back prefixed by Ray with the node's name.

examples:
  dpwa launch cluster.yaml -- python train.py
  dpwa launch cluster.yaml --only w1,w2 -- python train.py --log logs/{name}.txt
  dpwa launch settings.yaml --ray --nodes 8 --address auto -- python train.py --config {config}
"""
"""The ``dpwa launch --help`` text."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``dpwa launch``'s arguments to ``parser``; :func:`launch_command` runs them.

    Options go between CONFIG and ``--``, or before CONFIG; everything after ``--`` is the
    command, passed on untouched.

    Args:
        parser: the ``launch`` subcommand's parser.
    """
    parser.add_argument("config", metavar="CONFIG", help="path to the cluster's YAML config")
    _add_options(parser)
    parser.add_argument(
        "command",
        metavar="-- COMMAND ...",
        nargs=argparse.REMAINDER,
        action=_CommandAction,
        help="the program each node runs, after --; {name} becomes the node's name",
    )


def launch_command(args: argparse.Namespace) -> int:
    """Run ``dpwa launch`` from parsed arguments (see :func:`add_arguments`).

    Args:
        args: the namespace with ``config``, ``command``, ``only``, ``grace``, ``fail_fast``,
            and the Ray options ``ray``, ``address``, ``nodes``, ``max_restarts``,
            ``cpus_per_node``, ``gpus_per_node`` and ``working_dir``.

    Returns:
        The exit status of :func:`launch`.

    Raises:
        ConfigError: the config is invalid.
        LaunchError: as :func:`launch` raises it.
    """
    command: list[str] = args.command or []
    ray_only = {
        "--address": args.address,
        "--nodes": args.nodes,
        "--max-restarts": args.max_restarts,
        "--cpus-per-node": args.cpus_per_node,
        "--gpus-per-node": args.gpus_per_node,
        "--working-dir": args.working_dir,
    }
    if not args.ray:
        given = [flag for flag, value in ray_only.items() if value is not None]
        if given:
            raise LaunchError(f"{', '.join(given)} only apply with --ray")
        return launch(args.config, command, args.only, grace=args.grace, fail_fast=args.fail_fast)
    if args.only is not None:
        raise LaunchError("--only selects nodes of a local launch; with --ray, Ray places them")
    if not command:
        raise LaunchError(
            "no command to run. Put it after --, e.g. "
            f"dpwa launch {args.config} --ray --nodes 4 -- python train.py --config {{config}}"
        )
    from dpwa_core import ray as dpwa_ray  # Ray is optional: imported only when asked for

    resources = {"CPU": 1.0 if args.cpus_per_node is None else args.cpus_per_node}
    if args.gpus_per_node:
        resources["GPU"] = args.gpus_per_node
    restarts = dpwa_ray.DEFAULT_MAX_RESTARTS if args.max_restarts is None else args.max_restarts
    try:
        return dpwa_ray.launch(
            args.config,
            command,
            num_nodes=args.nodes,
            address=args.address,
            resources_per_node=resources,
            max_restarts=restarts,
            runtime_env={"working_dir": args.working_dir} if args.working_dir else None,
        )
    except ImportError as exc:  # Ray is not installed: say how to get it, without a traceback
        raise LaunchError(str(exc)) from exc


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="start only these nodes, comma-separated, e.g. w1,w3 (default: every node)",
    )
    parser.add_argument(
        "--grace",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_GRACE,
        help=f"time nodes get to exit after a forwarded signal (default: {DEFAULT_GRACE:g})",
    )
    parser.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop the other nodes as soon as one fails (default: let them finish)",
    )
    ray = parser.add_argument_group("on a Ray cluster (pip install 'dpwa[ray]')")
    ray.add_argument(
        "--ray", action="store_true", help="run the nodes as Ray actors over a Ray cluster"
    )
    ray.add_argument(
        "--address",
        metavar="ADDR",
        help="the Ray cluster to join, e.g. auto or ray://head:10001 (default: as ray.init)",
    )
    ray.add_argument(
        "--nodes", metavar="N", type=int, help="how many nodes (default: the config's count)"
    )
    ray.add_argument(
        "--max-restarts",
        metavar="N",
        type=int,
        help="restarts of a node whose process died (default: 3)",
    )
    ray.add_argument(
        "--cpus-per-node", metavar="C", type=float, help="CPUs each node asks for (default: 1)"
    )
    ray.add_argument(
        "--gpus-per-node", metavar="G", type=float, help="GPUs each node asks for (default: 0)"
    )
    ray.add_argument(
        "--working-dir",
        metavar="DIR",
        help="ship DIR to every node's machine and run the command in it (Ray's working_dir)",
    )


class _CommandAction(argparse.Action):
    """Split what follows CONFIG into launcher options and the command after ``--``.

    ``argparse.REMAINDER`` takes everything after the first positional, options included, and
    Python versions differ on whether it keeps the ``--``; this sorts both cases out.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        rest = list(values or [])
        if rest and rest[0] == "--":
            rest = rest[1:]
        elif rest and rest[0].startswith("-"):  # launcher options after CONFIG
            head = rest[: rest.index("--")] if "--" in rest else rest
            if {"-h", "--help"} & set(head):
                parser.print_help()
                parser.exit()
            if "--" not in rest:
                parser.error(
                    "separate the command from the options with --, e.g. "
                    "dpwa launch CONFIG --only w1,w2 -- python train.py"
                )
            cut = rest.index("--")
            options = argparse.ArgumentParser(prog=parser.prog, add_help=False)
            _add_options(options)
            parsed = options.parse_args(rest[:cut])
            for key, value in vars(parsed).items():
                if value != options.get_default(key):
                    setattr(namespace, key, value)
            rest = rest[cut + 1 :]
        setattr(namespace, self.dest, rest)


class _Supervisor:
    """Starts the jobs, relays their output, forwards signals and collects exit statuses."""

    def __init__(
        self, jobs: Sequence[NodeJob], grace: float, fail_fast: bool, out: TextIO, err: TextIO
    ) -> None:
        self._jobs = jobs
        self._grace = grace
        self._fail_fast = fail_fast
        self._out, self._err = out, err
        self._locks = {id(out): threading.Lock(), id(err): threading.Lock()}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._relays: dict[str, list[threading.Thread]] = {}
        self._statuses: dict[str, int] = {}  # Popen returncode: < 0 means killed by a signal
        self._failed: list[str] = []  # in the order the nodes failed
        self._received: list[int] = []  # signals caught by the handler, not yet acted on
        self._first_signal: int | None = None
        self._kill_at: float | None = None  # once stopping: when the grace period ends
        self._killed = False

    def run(self) -> int:
        previous = self._install_handlers()
        try:
            self._start_all()
            while self._running():
                self._handle_signals()
                self._reap()
                if self._fail_fast and self._failed and self._kill_at is None:
                    self._stop(signal.SIGTERM, f"{self._failed[0]} failed and --fail-fast is set")
                if self._kill_at is not None and time.monotonic() >= self._kill_at:
                    self._kill_stragglers()
                time.sleep(_POLL)
            self._handle_signals()  # one that came while the last node was exiting
            self._reap()
        finally:
            if self._running():  # an unexpected error: leave no orphans behind
                for name in self._running():
                    self._signal(name, signal.SIGKILL)
            self._restore_handlers(previous)
        self._drain()
        return self._finish()

    # Starting and output.

    def _start_all(self) -> None:
        for job in self._jobs:
            if self._received:  # interrupted while starting: start no more
                return
            try:
                proc = subprocess.Popen(
                    job.argv,
                    env=dict(job.env),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # a terminal's Ctrl+C reaches the launcher only
                )
            except OSError as exc:
                for name in self._running():
                    self._signal(name, signal.SIGKILL)
                    self._procs[name].wait()
                raise LaunchError(
                    f"cannot start node {job.name}'s command {job.argv[0]!r}: "
                    f"{exc.strerror or exc}. Check the command after --."
                ) from exc
            self._procs[job.name] = proc
            assert proc.stdout is not None and proc.stderr is not None
            self._relays[job.name] = [
                self._relay(job.name, proc.stdout, self._out),
                self._relay(job.name, proc.stderr, self._err),
            ]
        started = ", ".join(f"{name} (pid {proc.pid})" for name, proc in self._procs.items())
        if started:
            self._say(f"started {started}")

    def _relay(self, name: str, pipe: IO[bytes], stream: TextIO) -> threading.Thread:
        thread = threading.Thread(
            target=self._copy_lines, args=(name, pipe, stream), name=f"dpwa-launch-{name}"
        )
        thread.daemon = True  # a grandchild holding the pipe open must not block our exit
        thread.start()
        return thread

    def _copy_lines(self, name: str, pipe: IO[bytes], stream: TextIO) -> None:
        prefix = f"[{name}] "
        broken = False
        for raw in iter(lambda: pipe.readline(_MAX_LINE), b""):
            if broken:
                continue  # keep reading so the node never blocks on a full pipe
            text = raw.decode("utf-8", "replace")
            end = "" if text.endswith("\n") else "\n"
            broken = not self._write(stream, prefix + text + end)
        pipe.close()

    def _write(self, stream: TextIO, text: str) -> bool:
        """Write and flush under the stream's lock; False once the stream is gone."""
        with self._locks[id(stream)]:
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):  # closed pipe (`| head`) or closed file
                return False
        return True

    def _say(self, message: str) -> None:
        self._write(self._err, f"dpwa launch: {message}\n")

    # Signals.

    def _install_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for signum in FORWARDED_SIGNALS:
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    @staticmethod
    def _restore_handlers(previous: Mapping[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received.append(signum)  # acted on by the main loop, within _POLL seconds

    def _handle_signals(self) -> None:
        while self._received:
            signum = self._received.pop(0)
            name = signal.Signals(signum).name
            if self._first_signal is None:
                self._first_signal = signum
                self._stop(signum, f"got {name}")
            else:
                self._say(f"got {name} again; killing the nodes now")
                self._kill_stragglers()

    def _stop(self, signum: int, reason: str) -> None:
        """Send ``signum`` to every running node and start the grace period."""
        if self._kill_at is None:
            self._kill_at = time.monotonic() + self._grace
        running = self._running()
        if running:
            self._say(
                f"{reason}; sending {signal.Signals(signum).name} to {', '.join(running)} "
                f"(killing any still running after {self._grace:g} s)"
            )
        for name in running:
            self._signal(name, signum)

    def _kill_stragglers(self) -> None:
        if self._killed:
            return
        self._killed = True
        running = self._running()
        if running:
            self._say(f"killing {', '.join(running)} (SIGKILL)")
        for name in running:
            self._signal(name, signal.SIGKILL)

    def _signal(self, name: str, signum: int) -> None:
        proc = self._procs[name]
        try:
            os.killpg(proc.pid, signum)  # the whole group: the node's own children too
        except (ProcessLookupError, PermissionError):
            # Exited meanwhile, or the node moved itself to another process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if proc.poll() is None:
                    os.kill(proc.pid, signum)

    # Exit statuses.

    def _running(self) -> list[str]:
        return [name for name, proc in self._procs.items() if proc.poll() is None]

    def _reap(self) -> None:
        for name, proc in self._procs.items():
            status = proc.returncode
            if status is None or name in self._statuses:
                continue
            self._statuses[name] = status
            if status == 0:
                self._say(f"{name} finished")
            else:
                self._failed.append(name)
                self._say(f"{name} {_describe(status)}")

    def _drain(self) -> None:
        """Wait briefly for the last output lines of every node."""
        deadline = time.monotonic() + _DRAIN
        for threads in self._relays.values():
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    def _finish(self) -> int:
        total = len(self._jobs)
        if self._failed:
            what = ", ".join(f"{name} ({_describe(self._statuses[name])})" for name in self._failed)
            self._say(f"{len(self._failed)} of {total} nodes failed: {what}")
        elif len(self._statuses) < total:
            self._say(f"{len(self._statuses)} of {total} nodes started before the interruption")
        else:
            self._say("the node finished" if total == 1 else f"all {total} nodes finished")
        if self._first_signal is not None:
            name = signal.Signals(self._first_signal).name
            self._say(f"exit status {128 + self._first_signal}: interrupted by {name}")
            return 128 + self._first_signal
        if self._failed:
            return _exit_code(self._statuses[self._failed[0]])
        return 0


def _describe(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = str(-status)
        return f"was killed by signal {name}"
    return f"exited with code {status}"


def _exit_code(status: int) -> int:
    """A Popen return code as a shell exit status: -N (killed by signal N) becomes 128 + N."""
    return 128 - status if status < 0 else status


def _join(names: Iterable[str]) -> str:
    return ", ".join(names)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone such as %eth0
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_local_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if address.is_loopback or address.is_unspecified:
        return True
    # Only this machine's own addresses can be bound; binding sends nothing on the network.
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def _own_names() -> set[str]:
    names = {socket.gethostname().lower()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn().lower())
    return names
