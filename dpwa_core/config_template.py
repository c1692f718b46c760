"""Write a starter cluster config: ``dpwa config init --nodes N`` uses this module.

:func:`render_config` returns a commented YAML document that :func:`~dpwa_core.config.load_config`
accepts: nodes ``w1`` .. ``wN`` on one host with consecutive ports (or spread over several hosts
in blocks, the order in which launchers number their processes), and every other key at its
default with a comment line that says what it does. :func:`write_config` saves it without ever
overwriting a file by accident.

Example:
    >>> print(render_config(2))  # doctest: +SKIP
    >>> write_config(render_config(4, host="10.0.0.5"), "cluster.yaml")  # doctest: +SKIP
    >>> print(render_config(8, host="gpu1,gpu2"))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import yaml

from dpwa_core.config import NODE_ENV, Config
from dpwa_core.errors import ConfigError

__all__ = [
    "DEFAULT_BASE_PORT",
    "DEFAULT_HOST",
    "add_init_arguments",
    "init_command",
    "render_config",
    "write_config",
]

DEFAULT_HOST = "127.0.0.1"
"""Host of the generated nodes unless told otherwise: this machine only."""
DEFAULT_BASE_PORT = 45000
"""Port of ``w1``; node ``wK`` listens on ``base_port + K - 1``."""

_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_CONSTANT_VALUE = 0.5  # the constant strategy's documented default (README, docs/CONFIG.md)


def render_config(
    nodes: int, host: str | Sequence[str] = DEFAULT_HOST, base_port: int = DEFAULT_BASE_PORT
) -> str:
    """Return a commented YAML config for ``nodes`` nodes ``w1`` .. ``wN`` on one or more hosts.

    With several hosts the nodes are spread in blocks of ``k = ceil(nodes / hosts)``: ``w1`` ..
    ``wk`` on the first host, the next ``k`` on the second, and so on, each host's ports
    counting from ``base_port`` again. That is the order in which Slurm (block distribution)
    and torchrun (``node_rank * nproc_per_node + local_rank``) number their processes, so the
    process of rank ``i`` finds ``nodes[i]`` on its own host.

    Args:
        nodes: how many nodes, >= 1.
        host: host name or IP address the nodes listen on, or several: a sequence, or one
            string with commas (``"gpu1,gpu2"``).
        base_port: port of a host's first node; its ``j``-th node gets ``base_port + j - 1``.
            All must be <= 65535.

    Returns:
        The YAML text, ending with a newline.

    Raises:
        ConfigError: ``nodes``, a host, or ``base_port`` is invalid, a host is repeated, or a
            host would get no node; the message says the fix.
    """
    _check_count(nodes)
    hosts = _hosts(host)
    per_host = -(-nodes // len(hosts))  # ceil
    if per_host * (len(hosts) - 1) >= nodes:
        used = -(-nodes // per_host)
        raise ConfigError(
            f"--nodes {nodes} over {len(hosts)} hosts puts {per_host} on each of the "
            f"first hosts and none on {', '.join(hosts[used:])}. Use a multiple of the number "
            f"of hosts, e.g. --nodes {per_host * len(hosts)}, or list {used} hosts."
        )
    _check_ports(per_host, base_port)
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Config)}
    last = base_port + per_host - 1
    ports = f"port {base_port}" if per_host == 1 else f"ports {base_port}-{last}"
    node_lines = [
        f"  - {{name: w{i + 1}, host: {_yaml_scalar(hosts[i // per_host])}, "
        f"port: {base_port + i % per_host}}}"
        for i in range(nodes)
    ]
    if len(hosts) == 1:
        where = f"on {hosts[0]}, {ports}"
    else:
        each = f"{per_host} per host" if nodes % len(hosts) == 0 else f"up to {per_host} per host"
        where = f"on {len(hosts)} hosts ({', '.join(hosts)}), {each}, {ports} on each"
    lines = [
        f"# dpwa cluster config: {nodes} node{'s' if nodes != 1 else ''} {where}.",
        "# Written by `dpwa config init`. Check it with `dpwa check FILE`; start the nodes with",
        "# `dpwa launch FILE -- COMMAND`. docs/CONFIG.md describes every key.",
        "",
        "# Every node of the cluster, this one included; names and host:port pairs are unique.",
        f"# A process finds its own entry by name (the {NODE_ENV} environment variable) or by",
        "# the rank its launcher sets (torchrun, srun, mpirun, a Kubernetes indexed Job):",
        "# rank i runs the i-th node below, counting from 0. docs/DEPLOY.md has recipes.",
        "nodes:",
        *node_lines,
        "",
        "# Chance, in [0, 1], that a training step starts a pull from a peer (the papers' 1/tau).",
        f"pull_probability: {float(defaults['pull_probability'])!r}",
        "",
        "# Bound on one pull in milliseconds; a peer that times out is chosen less often.",
        f"timeout_ms: {defaults['timeout_ms']:g}",
        "",
        "# Strategy for the factor f in local = (1 - f) * local + f * peer: constant, clock,",
        "# loss, or an installed plugin's name (`dpwa plugins` lists them).",
        f"interpolation: {defaults['interpolation']}",
        "",
        "# Options of the constant strategy: f is always `value`.",
        f"constant: {{value: {_CONSTANT_VALUE:g}}}",
        "",
        "# When the local loss is below this, f *= loss / threshold, so nearly converged nodes",
        "# take less from their peers. 0 disables the rule.",
        f"divergence_threshold: {defaults['divergence_threshold']:g}",
        "",
        "# Each node learns the steady pull its peers give it (on label-skewed data, toward the",
        "# other nodes' classes) and adds it to its blends, at this rate. 0 disables it.",
        f"drift_correction: {defaults['drift_correction']:g}",
        "",
        "# How many slices a non-blocking pull over TCP cuts the model into, bringing the next",
        "# one each time: 1 (whole pulls), up to 64, or auto (whole on fast links; on slow ones",
        "# as many as it takes for each to land within about two training steps).",
        f"pull_slices: {defaults['pull_slices']}",
        "",
        "# Which peer a pull asks first: random (a draw by flow-control score), or exponential",
        "# (node i's r-th pull asks the node 2**(r mod ceil(log2 n)) places after it in the",
        "# list above, so no two pullers share a server while their rounds keep in step).",
        f"peer_choice: {defaults['peer_choice']}",
        "",
        "# Refuse a peer's parameters when they hold NaN or Inf (true), or blend them anyway.",
        f"reject_nonfinite: {'true' if defaults['reject_nonfinite'] else 'false'}",
        "",
        "# auto: peers on this host copy snapshots through shared memory, others use TCP;",
        "# or tcp, or shm (shared memory only).",
        f"transport: {defaults['transport']}",
        "",
        "# What this node sends parameters as over TCP: auto (int8 to other hosts, float32 over",
        "# loopback), float32, float16 or bfloat16 (half the bytes, about 3 significant digits),",
        "# or int8 (a quarter of the bytes, error at most 1/254 of each 256-value block's",
        "# largest value). Peers with different wire dtypes still talk.",
        f"wire_dtype: {defaults['wire_dtype']}",
        "",
        "# Nodes trust every connection: fine on a private network. Elsewhere add an `auth`",
        "# section (shared secret) and/or a `tls` section (mutual TLS); see docs/CONFIG.md.",
    ]
    return "\n".join(lines) + "\n"


def write_config(text: str, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write ``text`` to ``path``; an existing file is replaced only with ``force``.

    The file appears whole or not at all: the text goes to a temporary file in the same
    folder, which is then renamed.

    Args:
        text: the config text, e.g. from :func:`render_config`.
        path: where to write it.
        force: replace an existing file.

    Raises:
        ConfigError: the file exists and ``force`` is false, or it cannot be written.
    """
    target = os.fspath(path)
    if os.path.isdir(target):
        raise ConfigError(f"{target} is a folder; give a file name such as {target}/cluster.yaml.")
    if os.path.exists(target) and not force:
        raise ConfigError(
            f"{target} already exists; not overwriting it. Pass --force to replace it, "
            "or choose another file name."
        )
    folder = os.path.dirname(os.path.abspath(target))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".dpwa-config-", suffix=".yaml", dir=folder)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}.") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        if not force and os.path.exists(target):  # appeared meanwhile: still never overwrite
            raise ConfigError(f"{target} already exists; not overwriting it. Pass --force.")
        os.replace(temporary, target)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}.") from exc
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``dpwa config init``'s arguments to ``parser``; :func:`init_command` runs them.

    Args:
        parser: the ``init`` subcommand's parser.
    """
    parser.add_argument(
        "--nodes", metavar="N", type=int, required=True, help="number of nodes, w1 .. wN"
    )
    parser.add_argument(
        "--host",
        metavar="H[,H...]",
        default=DEFAULT_HOST,
        help="host name or IP address of the nodes, or several separated by commas: the nodes "
        "are spread in blocks, w1..wK on the first host, the next K on the second, ... "
        f"(default: {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--base-port",
        metavar="P",
        type=int,
        default=DEFAULT_BASE_PORT,
        help="port of each host's first node; the next get P + 1, P + 2, ... "
        f"(default: {DEFAULT_BASE_PORT})",
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="write the config to FILE (default: print it)"
    )
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")


def init_command(args: argparse.Namespace) -> int:
    """Run ``dpwa config init`` from parsed arguments (see :func:`add_init_arguments`).

    Args:
        args: the namespace with ``nodes``, ``host``, ``base_port``, ``output`` and ``force``.

    Returns:
        0; the config goes to ``args.output`` or, without one, to stdout.

    Raises:
        ConfigError: an argument is invalid, or the file exists and ``--force`` is not given.
    """
    text = render_config(args.nodes, args.host, args.base_port)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    write_config(text, args.output, force=args.force)
    print(
        f"wrote {args.output}: {args.nodes} node{'s' if args.nodes != 1 else ''}. "
        f"Next: dpwa check {args.output}, then dpwa launch {args.output} -- COMMAND",
        file=sys.stderr,
    )
    return 0


def _check_count(nodes: int) -> None:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(
            f"--nodes must be a whole number >= 1 (2 or more to gossip), got {nodes!r}."
        )


def _check_ports(nodes: int, base_port: int) -> None:
    if isinstance(base_port, bool) or not isinstance(base_port, int) or not 1 <= base_port <= 65535:
        raise ConfigError(f"--base-port must be a port number 1..65535, got {base_port!r}.")
    last = base_port + nodes - 1
    if last > 65535:
        raise ConfigError(
            f"{nodes} nodes from port {base_port} need ports up to {last}, past 65535. "
            f"Use --base-port {65536 - nodes} or lower, or fewer nodes."
        )


def _hosts(host: str | Sequence[str]) -> list[str]:
    """The host list: a sequence, or a string of hosts separated by commas; each checked."""
    if isinstance(host, str):
        hosts = [part.strip() for part in host.split(",")] if "," in host else [host]
    elif isinstance(host, Sequence) and host:
        hosts = list(host)
    else:
        raise ConfigError(f"--host must name at least one host, got {host!r}.")
    seen: set[str] = set()
    for item in hosts:
        if isinstance(item, str) and not item and len(hosts) > 1:
            raise ConfigError(
                f"--host {','.join(hosts)!r} has an empty entry; separate hosts with single "
                "commas, e.g. --host gpu1,gpu2."
            )
        _check_host(item)
        if item.lower() in seen:
            raise ConfigError(
                f"--host lists {item!r} twice; list each host once (its nodes get ports "
                "--base-port, --base-port + 1, ...)."
            )
        seen.add(item.lower())
    return hosts


def _check_host(host: str) -> None:
    if not isinstance(host, str) or not host:
        raise ConfigError(f"--host must be a host name or IP address, got {host!r}.")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            f"--host {host!r} is neither an IP address nor a valid host name (letters, digits, "
            "'-' and '_' in dot-separated labels), e.g. --host 127.0.0.1 or --host node1.lan."
        )


def _yaml_scalar(text: str) -> str:
    """``text`` as it must appear inside a YAML flow mapping: plain if safe, else quoted."""
    try:
        if yaml.safe_load(f"{{key: {text}}}") == {"key": text}:
            return text
    except yaml.YAMLError:
        pass
    return json.dumps(text)  # a JSON string is a valid double-quoted YAML scalar
