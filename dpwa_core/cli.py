"""The ``dpwa`` command line: list the installed strategies and check config files.

Example:
    $ dpwa plugins
    $ dpwa check cluster.yaml --name w1
    $ dpwa config init --nodes 4 -o cluster.yaml
    $ dpwa launch cluster.yaml -- python train.py
    $ dpwa status cluster.yaml --watch
    $ dpwa --version

To add a subcommand, write ``_add_NAME(subparsers)`` that adds a parser and sets its
``handler`` (``args -> exit code``), and list it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dpwa_core import config_template, launch
from dpwa_core.config import NODE_ENV, Config, load_config
from dpwa_core.config import _shown as shown
from dpwa_core.errors import DpwaError
from dpwa_core.launchers import ARGUMENT_SOURCE, NodeChoice, node_from_environment
from dpwa_core.registry import strategies, strategy_info

__all__ = ["build_parser", "main"]

_Subparsers = Any  # argparse's private _SubParsersAction; its type is not public


def main(argv: list[str] | None = None) -> int:
    """Run the ``dpwa`` command.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 when the command found an error, 2 on a usage error.

    Example:
        >>> main(["check", "cluster.yaml", "--name", "w1"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: return, don't exit
        return exc.code if isinstance(exc.code, int) else 1
    handler: Callable[[argparse.Namespace], int] | None = args.handler
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except DpwaError as exc:
        # Our errors already say what, where and how to fix: no traceback.
        print(f"dpwa: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """Return the ``dpwa`` argument parser with every subcommand added.

    Returns:
        The parser; each subcommand sets ``handler`` on the parsed namespace.
    """
    parser = argparse.ArgumentParser(
        prog="dpwa", description="Distributed pair-wise averaging: tools for a dpwa cluster."
    )
    parser.add_argument("--version", action="version", version=f"dpwa {_version('dpwa')}")
    parser.set_defaults(handler=None)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _add_plugins(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list the installed interpolation strategies",
        description="List every interpolation strategy and the package it comes from.",
    )
    parser.set_defaults(handler=_plugins)


def _plugins(args: argparse.Namespace) -> int:
    rows = [("NAME", "SOURCE", "DESCRIPTION")]
    rows += [(info.name, info.source, info.description) for info in strategies().values()]
    print(_table(rows))
    return 0


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Columns two spaces apart (a borderless ``rich`` table); the last column is not padded.

    Never wrapped, whatever the terminal's width, so that scripts can read the lines; cells are
    text, never rich markup.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    for _ in rows[0]:
        grid.add_column(no_wrap=True, overflow="ignore")
    for row in rows:
        grid.add_row(*(Text(cell) for cell in row))
    console = Console(width=100_000, force_terminal=False, no_color=True, highlight=False)
    with console.capture() as captured:
        console.print(grid)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def _add_check(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="check a config file and summarize it",
        description="Load a config file, check every key, and print a summary.",
    )
    parser.add_argument("config", metavar="CONFIG", help="path to the YAML config file")
    parser.add_argument(
        "--name",
        metavar="NODE",
        help=f"also check this node's name (default: ${NODE_ENV} or a launcher's rank, when set)",
    )
    parser.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    section = config.methods.get(config.interpolation, {})
    # Bounded: an option's value is shown cut to about 80 characters.
    options = ", ".join(f"{key}={shown(value)}" for key, value in section.items()) or "no options"
    threshold = config.divergence_threshold
    rows = [
        ("nodes", ", ".join(f"{n.name} {n.host}:{n.port}" for n in config.nodes)),
        ("interpolation", f"{config.interpolation} ({options})"),
        ("  from", strategy_info(config.interpolation).source),
        ("pull_probability", f"{config.pull_probability:g}"),
        ("timeout_ms", f"{config.timeout_ms:g}"),
        ("divergence_threshold", f"{threshold:g}" + (" (disabled)" if threshold == 0 else "")),
        ("reject_nonfinite", "true" if config.reject_nonfinite else "false"),
        ("transport", config.transport),
        ("wire_dtype", config.wire_dtype),
        ("auth", f"shared secret from {config.auth.source}" if config.auth else "off"),
        ("tls", f"cert {config.tls.cert}, CA {config.tls.ca}" if config.tls else "off"),
        ("robust", _robust_summary(config)),
    ]
    choice = config.choose_node(args.name) if args.name is not None else _node_if_set(config)
    if choice is not None:
        peers = ", ".join(peer.name for peer in config.peers_of(choice.name)) or "none"
        origin = "" if choice.source == ARGUMENT_SOURCE else f" (from {choice.source})"
        rows.append(("this node", f"{choice.name}{origin}, peers: {peers}"))
    print(f"{config.source}: OK ({len(config.nodes)} nodes)")
    print(_table([(f"  {key}", value) for key, value in rows]))
    return 0


def _node_if_set(config: Config) -> NodeChoice | None:
    """This process's node when DPWA_NODE or a launcher's rank says it, else None."""
    return node_from_environment([n.name for n in config.nodes], os.environ, where=config.source)


def _add_demo(subparsers: _Subparsers) -> None:
    # dpwa_demo.options is plain argparse: building the parser imports no framework.
    options = importlib.import_module("dpwa_demo.options")
    parser = subparsers.add_parser(
        "demo",
        help="watch local nodes learn scikit-learn's digits together by gossip",
        description=options.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_arguments(parser)
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    # Imported by name, when run: dpwa_core never imports the demo's frameworks.
    demo = importlib.import_module("dpwa_demo.run")
    code: int = demo.main(args)
    return code


def _add_config(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "config",
        help="write config files (dpwa config init)",
        description="Write cluster config files.",
    )

    def usage(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    parser.set_defaults(handler=usage)
    actions = parser.add_subparsers(title="config commands", metavar="ACTION")
    init = actions.add_parser(
        "init",
        help="write a commented config for N nodes on one host or several",
        description="Write a commented config for nodes w1 .. wN on one host, with consecutive "
        "ports and every other key at its default. With --host h1,h2,... the nodes are spread "
        "in blocks (w1..wK on h1, the next K on h2, ...; K = ceil(N / hosts)), each host's ports "
        "counting from --base-port: the order in which srun and torchrun number their "
        "processes, so rank i finds nodes[i] on its own host. Prints it unless -o is given.",
    )
    config_template.add_init_arguments(init)
    init.set_defaults(handler=config_template.init_command)


def _add_launch(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="start the config's nodes on this machine, one process each",
        description=launch.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    launch.add_arguments(parser)
    parser.set_defaults(handler=launch.launch_command)


def _add_status(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show every node of a running cluster: up or down, clock, pulls, bytes, peers",
        description=(
            "Ask every node of CONFIG for its status (a small STATUS request on its dpwa "
            "port, through the config's tls and auth) and show one row per node."
        ),
    )
    parser.add_argument("config", metavar="CONFIG", help="path to the YAML config file")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl+C",
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, metavar="SECONDS", help="per node (default 2)"
    )
    parser.add_argument(
        "--as",
        dest="as_name",
        metavar="NODE",
        help="the member name to prove with auth (default: the first other node)",
    )
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    import json
    import time

    from dpwa_core import status

    config = load_config(args.config)
    if args.as_name is not None:
        config.node(args.as_name)  # a ConfigError names the known nodes
    if args.watch is not None and not args.watch > 0:
        raise DpwaError(f"--watch needs a positive number of seconds, got {args.watch}")

    def ask() -> list[status.NodeStatus]:
        return status.query_all(config, timeout=args.timeout, as_name=args.as_name)

    if args.json:
        while True:
            statuses = ask()
            print(json.dumps({"time": time.time(), "nodes": [s.as_dict() for s in statuses]}))
            sys.stdout.flush()
            if args.watch is None:
                return 0 if all(s.up for s in statuses) else 1
            time.sleep(args.watch)
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if args.watch is None:
        statuses = ask()
        console.print(status.table(statuses))
        return 0 if all(s.up for s in statuses) else 1
    try:
        with Live(status.table(ask()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.watch)
                live.update(status.table(ask()), refresh=True)
    except KeyboardInterrupt:
        return 0


def _robust_summary(config: Config) -> str:
    """One line on robust blending: clipping and the clock bound."""
    robust = config.robust
    clip = (
        f"clip at {robust.clip_scale:g} x the median distance (window {robust.clip_window})"
        if robust.clip
        else "no clipping"
    )
    return f"{clip}; peer clocks within {robust.max_clock_lead:g}x ours"


_COMMANDS: tuple[Callable[[_Subparsers], None], ...] = (
    _add_plugins,
    _add_check,
    _add_demo,
    _add_config,
    _add_launch,
    _add_status,
)


if __name__ == "__main__":
    sys.exit(main())
