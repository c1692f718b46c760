"""Read and check a cluster configuration: its nodes, its pull policy and its interpolation.

A config is a YAML mapping::

    nodes:
      - {name: w1, host: localhost, port: 45000}
      - {name: w2, host: localhost, port: 45001}
    pull_probability: 1.0      # chance of starting a pull at a step when none is in flight
    timeout_ms: 2500           # socket timeout (a silent peer); also drives flow control
    blocking: false            # Gossip.step never waits for a pull (true: the seed's way)
    start: shared              # nodes start from one model (own: each from its own weights)
    interpolation: constant    # an installed strategy: see `dpwa plugins`
    divergence_threshold: 0    # 0 disables
    drift_correction: 0.2      # learn the steady pull of the peers (skewed data); 0 disables
    pull_slices: 1             # whole-model pulls; auto: one slice at a time on slow links
    peer_choice: random        # a draw by score; exponential: the exponential graph's schedule
    constant: {value: 0.5}     # options of a strategy, one section per strategy name
    reject_nonfinite: true     # refuse received parameters holding NaN or Inf
    auth: {secret_env: DPWA_SECRET}                 # optional shared-secret handshake
    tls: {cert: w1.pem, key: w1.key, ca: ca.pem}    # optional mutual TLS

The original dpwa layout (a list of one-key mappings, ``fetch_probability`` for
``pull_probability``, ``clock: 0`` for a section without options) loads unchanged and means
the same. Everything is checked when the config is loaded, so a bad file fails at start-up
with a message that names the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

from dpwa_core import registry
from dpwa_core._log import get_logger
from dpwa_core.errors import ConfigError, PluginError
from dpwa_core.hookspec import Strategy
from dpwa_core.launchers import ARGUMENT_SOURCE, NODE_ENV, NodeChoice, node_from_environment
from dpwa_core.launchers import ways_to_choose as _ways_to_choose
from dpwa_core.peers import PEER_CHOICES
from dpwa_core.robust import RobustSettings
from dpwa_core.secret import (
    AuthSettings,
    file_is_private,
    hidden,
    is_env_name,
    load_secret,
    looks_random,
)
from dpwa_core.tls import TlsSettings, server_context
from dpwa_core.wire import MAX_SLICES

__all__ = [
    "MAX_CONFIG_BYTES",
    "NODE_ENV",
    "PEER_CHOICES",
    "STARTS",
    "TRANSPORTS",
    "WIRE_DTYPES",
    "Config",
    "NodeSpec",
    "load_config",
]

_SETTINGS = (
    "pull_probability",
    "timeout_ms",
    "interpolation",
    "divergence_threshold",
    "drift_correction",
    "pull_slices",
    "peer_choice",
    "reject_nonfinite",
    "transport",
    "wire_dtype",
    "blocking",
    "start",
)
TRANSPORTS = ("auto", "tcp", "shm")
"""Values of ``transport``: shared memory with co-located peers when possible, or one path."""
WIRE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
"""Values of ``wire_dtype``: the element type this node sends parameters as over TCP."""
STARTS = ("shared", "own")
"""Values of ``start``: one model copied from a peer when joining, or each node its own."""
_TOP_LEVEL = ("nodes", *_SETTINGS, "auth", "tls", "robust")
_AUTH_KEYS = ("secret_env", "secret_file", "allow_readable_secret_file")
_TLS_KEYS = ("cert", "key", "ca", "check_hostname")
_ROBUST_KEYS = ("clip", "clip_scale", "clip_window", "max_clock_lead")
_log = get_logger("config")
_ALIASES = {"fetch_probability": "pull_probability"}  # the seed's names for today's keys
_NODE_KEYS = ("name", "host", "port")
_NODE_EXAMPLE = "{name: w1, host: localhost, port: 45000}"
MAX_CONFIG_BYTES = 1024 * 1024
"""A config file larger than this (1 MiB) is refused: a real one is a few kilobytes."""
_MAX_DEPTH = 32  # nesting levels a config may use; a real one uses 4
_SHOWN_CHARS = 80  # the most of a value an error message shows
_MAX_NAME = 100  # a strategy name longer than this is a mistake; refused before any lookup
_KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_AUTH_KEY_NAME = re.compile(r"[a-z][a-z_]{0,31}")  # the style of auth's own keys


@dataclass(frozen=True)
class NodeSpec:
    """One node of the cluster: its name and the address its server listens on.

    Args:
        name: the node's unique name, e.g. ``"w1"``.
        host: host name or IP address the node listens on.
        port: TCP port, 1 to 65535.
    """

    name: str
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, as socket functions take it."""
        return self.host, self.port


@dataclass(frozen=True)
class Config:
    """A checked cluster configuration; build it with :func:`load_config`.

    Constructing one directly checks it the same way, so a ``Config`` is always valid.

    Args:
        nodes: every node of the cluster, this one included.
        pull_probability: chance, in ``[0, 1]``, of pulling from a peer after a step.
        timeout_ms: socket timeout in milliseconds, > 0.
        interpolation: name of an installed strategy (see ``dpwa plugins``).
        divergence_threshold: loss at which models diverge on purpose; 0 disables.
        drift_correction: rate, in ``[0, 1]``, at which each node learns the steady pull of
            its peers and adds it to its blends (:mod:`dpwa_core.drift`: closes the gap that
            label-skewed shards leave between nodes); 0 disables.
        pull_slices: how many slices a non-blocking pull over TCP asks for one of, cycling
            through them: an integer from 1 (whole-model pulls, the default) to 64, or ``auto``
            (as many as it takes for a slice to land within about two training steps, measured
            as it runs).
        peer_choice: ``random`` (each pull draws its peer by flow-control score, the default)
            or ``exponential`` (each pull first asks the peer of the one-peer exponential graph
            over the config's node order, so that pullers do not share one server and every
            node is reached every ``ceil(log2 n)`` pulls; :mod:`dpwa_core.peers`).
        methods: options per strategy name, e.g. ``{"constant": {"value": 0.5}}``.
        reject_nonfinite: refuse received parameters that hold NaN or Inf.
        transport: ``auto`` (shared memory with peers on this host, TCP otherwise), ``tcp``
            or ``shm`` (shared memory only; peers elsewhere cannot be pulled).
        wire_dtype: what this node sends parameters as over TCP: ``auto`` (int8 to peers on
            other hosts, float32 over loopback), ``float32``, ``float16``, ``bfloat16`` or
            ``int8`` (blockwise absmax, docs/PROTOCOL.md).
        blocking: whether ``Gossip.step`` / ``Node.step`` (and the Keras callback) wait for each
            pull, as the seed did; by default they never wait and blend each pull at the first
            step after it lands.
        start: ``shared`` (a node copies a live peer's model before its own is pulled; the first
            node up starts the cluster's model) or ``own`` (every node keeps its own starting
            weights, as the seed did).
        auth: the shared secret every connection must prove, or None (trusted networks only).
        tls: certificate, key and CA for mutual TLS, or None for plain TCP.
        robust: how far a peer may move our model and clock in one pull (docs/CONFIG.md).
        source: where the config came from, for error messages; not compared.

    Raises:
        ConfigError: a value is invalid; the message names the source, the key and the fix.
    """

    nodes: tuple[NodeSpec, ...]
    pull_probability: float = 1.0
    timeout_ms: float = 2500.0
    interpolation: str = "constant"
    divergence_threshold: float = 0.0
    drift_correction: float = 0.2
    pull_slices: int | str = 1
    peer_choice: str = "random"
    # Not hashed: sections may hold lists. Equal configs still hash equal without them.
    methods: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    reject_nonfinite: bool = True
    transport: str = "auto"
    wire_dtype: str = "auto"
    blocking: bool = False
    start: str = "shared"
    auth: AuthSettings | None = None
    tls: TlsSettings | None = None
    robust: RobustSettings = field(default_factory=RobustSettings)
    source: str = field(default="<mapping>", compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the dataclass is frozen; normalize in place once
        set_(self, "nodes", self._checked_nodes())
        set_(self, "pull_probability", self._number("pull_probability", lambda v: 0 <= v <= 1))
        set_(self, "timeout_ms", self._number("timeout_ms", lambda v: v > 0))
        set_(self, "divergence_threshold", self._number("divergence_threshold", lambda v: v >= 0))
        set_(self, "drift_correction", self._number("drift_correction", lambda v: 0 <= v <= 1))
        set_(self, "pull_slices", self._checked_slices())
        set_(self, "methods", self._checked_methods())
        for key in ("reject_nonfinite", "blocking"):
            if not isinstance(getattr(self, key), bool):
                raise self._error(key, f"must be true or false, got {_shown(getattr(self, key))}")
        choices = (
            ("transport", TRANSPORTS),
            ("wire_dtype", WIRE_DTYPES),
            ("start", STARTS),
            ("peer_choice", PEER_CHOICES),
        )
        for key, allowed in choices:
            value = getattr(self, key)
            if value not in allowed:
                raise self._error(key, f"must be one of {', '.join(allowed)}; got {_shown(value)}")
        if self.auth is not None and not isinstance(self.auth, AuthSettings):
            raise self._error("auth", f"must be an AuthSettings, got {hidden(self.auth)}")
        if not isinstance(self.robust, RobustSettings):
            raise self._error("robust", f"must be a RobustSettings, got {_shown(self.robust)}")
        if self.tls is not None:
            if not isinstance(self.tls, TlsSettings):
                raise self._error("tls", f"must be a TlsSettings, got {_shown(self.tls)}")
            server_context(self.tls, self.source)  # load the files now, not at the first pull
        if not isinstance(self.interpolation, str) or len(self.interpolation) > _MAX_NAME:
            raise self._error(
                "interpolation",
                f"must be a strategy name such as 'constant', got {_shown(self.interpolation)}",
            )
        # Build every strategy once now, so bad options fail at load and not at the first pull.
        for name in self.methods:
            self._build(name)
        if self.interpolation not in self.methods:
            self.make_strategy()

    @property
    def timeout(self) -> float:
        """The socket timeout in seconds."""
        return self.timeout_ms / 1000.0

    def node(self, name: str) -> NodeSpec:
        """Return the node called ``name``.

        Args:
            name: a node name, e.g. ``"w1"``.

        Returns:
            Its :class:`NodeSpec`.

        Raises:
            ConfigError: no node has that name; the message lists the names there are.
        """
        for spec in self.nodes:
            if spec.name == name:
                return spec
        raise ConfigError(
            f"{self.source}: there is no node named {_shown(name)}. "
            f"Known nodes: {self._names()}. Use one of them, or add the node to 'nodes'."
        )

    def resolve_name(self, name: str | None) -> str:
        """Return this process's node name: ``name`` if given, else one the environment picks.

        Without ``name``, ``$DPWA_NODE`` names the node; without it, the rank a launcher sets
        (``RANK``, ``SLURM_PROCID``, ``OMPI_COMM_WORLD_RANK``, ``JOB_COMPLETION_INDEX``, checked
        in that order) picks ``nodes[rank]``. :meth:`choose_node` also says which one did.

        Args:
            name: the node name, or ``None`` to read the environment.

        Returns:
            The name, checked to be one of the config's nodes.

        Raises:
            ConfigError: nothing names the node, the name is not in the config, or a launcher's
                rank is not a whole number or has no node.

        Example:
            >>> config.resolve_name("w1")  # doctest: +SKIP
            'w1'
        """
        return self.choose_node(name).name

    def choose_node(self, name: str | None, environ: Mapping[str, str] | None = None) -> NodeChoice:
        """Return this process's node and where its name came from.

        The order: ``name``; ``$DPWA_NODE``; the first launcher rank variable that is set
        (see :mod:`dpwa_core.launchers`), as an index into ``nodes``.

        Args:
            name: the node name, or ``None`` to read the environment.
            environ: the environment to read; the process's own by default.

        Returns:
            A :class:`~dpwa_core.launchers.NodeChoice`: the node's name and its source, e.g.
            ``"RANK=2 (torchrun)"``.

        Raises:
            ConfigError: as for :meth:`resolve_name`.

        Example:
            >>> config.choose_node(None).source  # doctest: +SKIP
            'SLURM_PROCID=3 (Slurm srun)'
        """
        if name is not None:
            return NodeChoice(self.node(name).name, ARGUMENT_SOURCE)
        names = [spec.name for spec in self.nodes]
        choice = node_from_environment(
            names, os.environ if environ is None else environ, where=self.source
        )
        if choice is None:
            raise ConfigError(
                f"{self.source}: which node is this process? Pass name= (one of "
                f"{self._names()}), {_ways_to_choose()}."
            )
        return choice

    def peers_of(self, name: str) -> tuple[NodeSpec, ...]:
        """Return every node except ``name``, in config order.

        Args:
            name: this process's node name.

        Returns:
            The other nodes: the peers this node pulls from.

        Raises:
            ConfigError: ``name`` is not a node of this config.
        """
        self.node(name)
        return tuple(spec for spec in self.nodes if spec.name != name)

    def make_strategy(self) -> Strategy:
        """Build the configured interpolation strategy from its section's options.

        Returns:
            A checked strategy: ``strategy(clock, peer_clock, loss, peer_loss) -> float``.

        Raises:
            ConfigError: the strategy is not installed or rejects its options.
        """
        self._lookup("interpolation", self.interpolation)
        return self._build(self.interpolation)

    def with_nodes(self, nodes: Iterable[NodeSpec]) -> Config:
        """Return a copy of this config with another node list, checked like the original.

        Args:
            nodes: the new node list.

        Returns:
            A new :class:`Config`; this one is unchanged.

        Raises:
            ConfigError: the new node list is invalid.
        """
        return dataclasses.replace(self, nodes=tuple(nodes))

    def to_mapping(self) -> dict[str, Any]:
        """Return the config as a plain mapping that :func:`load_config` reads back.

        It holds plain Python values only, so it can be written with ``yaml.safe_dump``. The
        ``auth`` section is left out: the secret is never written anywhere. Relative TLS paths
        have already been resolved against the original file's folder.

        Returns:
            ``nodes``, every setting, one section per strategy with options, and ``tls``.
        """
        mapping: dict[str, Any] = {
            "nodes": [{"name": n.name, "host": n.host, "port": n.port} for n in self.nodes],
            **{key: getattr(self, key) for key in _SETTINGS},
            **{name: dict(options) for name, options in self.methods.items()},
        }
        if self.tls is not None:
            mapping["tls"] = dataclasses.asdict(self.tls)
        mapping["robust"] = dataclasses.asdict(self.robust)
        return mapping

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle support (Ray sends the config to its actors). The read-only option sections
        # become plain dicts; unpickling checks everything again, on the receiving host.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["methods"] = {name: dict(options) for name, options in self.methods.items()}
        return (_restore, (values,))

    # Checks. Each raises a ConfigError that names the source, the key and the fix.

    def _error(self, key: str, problem: str) -> ConfigError:
        end = "" if problem.endswith((".", "?")) else "."
        return ConfigError(f"{self.source}: key {key!r} {problem}{end}")

    def _names(self) -> str:
        return ", ".join(spec.name for spec in self.nodes)

    def _checked_slices(self) -> int | str:
        value = self.pull_slices
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SLICES:
            raise self._error(
                "pull_slices",
                f"must be auto or a whole number from 1 (whole-model pulls) to {MAX_SLICES}; "
                f"got {_shown(value)}",
            )
        return value

    def _number(self, key: str, in_range: Callable[[float], bool]) -> float:
        value = getattr(self, key)
        rule = {
            "pull_probability": "a probability between 0 and 1, e.g. 1.0",
            "timeout_ms": "a number of milliseconds greater than 0, e.g. 2500",
            "divergence_threshold": "a loss value >= 0 (0 disables), e.g. 0.2",
            "drift_correction": "a rate between 0 and 1 (0 disables), e.g. 0.2",
        }[key]
        # bool is an int to Python, but `timeout_ms: true` is a mistake, not 1 ms.
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        # An int too large for a float (10**400 is valid YAML) is out of every range.
        if is_number and isinstance(value, int) and abs(value) > 2**64:
            is_number = False
        if not (is_number and math.isfinite(value) and in_range(value)):
            raise self._error(key, f"must be {rule}; got {_shown(value)}")
        return float(value)

    def _checked_nodes(self) -> tuple[NodeSpec, ...]:
        nodes = tuple(self.nodes) if isinstance(self.nodes, (list, tuple)) else None
        if not nodes:
            raise self._error("nodes", f"must be a non-empty list of nodes such as {_NODE_EXAMPLE}")
        seen_names: dict[str, int] = {}
        seen_addresses: dict[tuple[str, int], int] = {}
        for index, spec in enumerate(nodes):
            where = f"nodes[{index}]"
            if not isinstance(spec, NodeSpec):
                raise self._error(where, f"must be a NodeSpec, got {_shown(spec)}")
            for attr in ("name", "host"):
                value = getattr(spec, attr)
                if not isinstance(value, str) or not value.strip():
                    raise self._error(
                        f"{where}.{attr}", f"must be a non-empty string, got {_shown(value)}"
                    )
            port = spec.port
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise self._error(
                    f"{where}.port", f"must be an integer 1..65535, got {_shown(port)}"
                )
            if spec.name in seen_names:
                raise self._error(
                    f"{where}.name",
                    f"repeats the name {_shown(spec.name)} of nodes[{seen_names[spec.name]}]; "
                    "give every node its own name",
                )
            address = (spec.host.lower(), port)
            if address in seen_addresses:
                raise self._error(
                    f"{where}.port",
                    f"repeats the address {_cut(spec.host)}:{port} of "
                    f"nodes[{seen_addresses[address]}]; give every node its own host:port",
                )
            seen_names[spec.name] = index
            seen_addresses[address] = index
        return nodes

    def _checked_methods(self) -> Mapping[str, Mapping[str, Any]]:
        if not isinstance(self.methods, Mapping):
            raise self._error(
                "methods", f"must map strategy names to options: {_shown(self.methods)}"
            )
        frozen: dict[str, Mapping[str, Any]] = {}
        for name, section in self.methods.items():
            if not isinstance(name, str):
                raise self._error(_shown(name), "is not a strategy name")
            self._lookup(name, name)
            if not isinstance(section, Mapping) or not all(isinstance(k, str) for k in section):
                raise self._error(
                    name, f"must be a mapping of option names to values: {_shown(section)}"
                )
            frozen[name] = MappingProxyType(dict(section))
        return MappingProxyType(frozen)

    def _lookup(self, key: str, name: str) -> None:
        try:
            registry.strategy_info(name)
        except PluginError as exc:
            raise self._error(key, f"is invalid: {exc}") from exc

    def _build(self, name: str) -> Strategy:
        try:
            return registry.make_strategy(name, self.methods.get(name, {}))
        except ConfigError as exc:
            problem = _cut(str(exc), 4 * _SHOWN_CHARS)  # the plugin's words may quote values
            raise self._error(
                name, f"has invalid options: {problem} Fix the {name!r} section"
            ) from exc


def load_config(
    path_or_mapping: str | os.PathLike[str] | Mapping[str, Any] | Config,
    *,
    nodes: Iterable[NodeSpec] | None = None,
) -> Config:
    """Load and check a config from a YAML file, a mapping, or return a Config as is.

    Args:
        path_or_mapping: a path to a YAML file, an already parsed mapping (or the original
            list layout), or a :class:`Config`.
        nodes: a node list that replaces the source's; the source may then leave ``nodes``
            out. Used where something else places the nodes (``dpwa_core.ray``).

    Returns:
        The checked :class:`Config`.

    Raises:
        ConfigError: the file is missing or not YAML, or any key or value is invalid; the
            message names the file, the key and the fix.
        PluginError: an installed interpolation plugin is broken.

    Example:
        >>> config = load_config("cluster.yaml")  # doctest: +SKIP
        >>> config.make_strategy()(clock=0, peer_clock=0, loss=1.0, peer_loss=1.0)  # doctest: +SKIP
        0.5
    """
    if isinstance(path_or_mapping, Config):
        return path_or_mapping if nodes is None else path_or_mapping.with_nodes(nodes)
    if isinstance(path_or_mapping, (str, os.PathLike)):
        source = os.fspath(path_or_mapping)
        return _from_document(_read_yaml(source), source, nodes)
    if isinstance(path_or_mapping, (Mapping, list)):
        return _from_document(path_or_mapping, "<mapping>", nodes)
    raise TypeError(
        f"load_config takes a path, a mapping or a Config, not {type(path_or_mapping).__name__}"
    )


def _read_yaml(source: str) -> Any:
    try:
        with open(source, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)  # bounded: /dev/zero is not a config
    except FileNotFoundError:
        raise ConfigError(
            f"Config file {source!r} not found (working directory: {os.getcwd()}). Check the path."
        ) from None
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {source!r}: {exc}.") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"Config file {source!r} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a dpwa config "
            "is a few kilobytes. Check the path."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Cannot read config file {source!r}: {exc}.") from exc
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: plain data only
    except _Refused as exc:
        raise ConfigError(f"{source}: line {exc.line}, column {exc.column}: {exc}") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        # Only the parser's own words: str(exc) quotes the offending line, which may hold a secret.
        problem = _cut(str(getattr(exc, "problem", None) or "it cannot be parsed"))
        raise ConfigError(
            f"{source} is not valid YAML{where}: {problem}. Fix the syntax."
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 5000 digits
        raise ConfigError(
            f"{source}: a value cannot be read: {_cut(str(exc))}. Fix that value."
        ) from None


class _Refused(yaml.YAMLError):
    """A YAML feature a config may not use, found while composing; says where."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.line = mark.line + 1 if mark is not None else "?"
        self.column = mark.column + 1 if mark is not None else "?"


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases, and with bounded nesting.

    An alias makes a few hundred bytes stand for 10**9 values ("billion laughs"), which any
    later walk over the value (an error message's repr, for one) would expand. No config needs
    one, so the first anchor or alias is refused, before anything is built.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(
                "configs may not use YAML aliases or anchors (*name, &name, <<: *name); "
                "write the value out in full.",
                event.start_mark,
            )
        if self._depth >= _MAX_DEPTH:
            raise _Refused(
                f"values are nested more than {_MAX_DEPTH} levels deep; a dpwa config needs a "
                "few. Flatten the value.",
                event.start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _from_document(document: Any, source: str, nodes: Iterable[NodeSpec] | None = None) -> Config:
    """Turn a parsed YAML document into a Config: check its shape, keys and sections."""
    if isinstance(document, list):
        raw = _merge_list_layout(document, source)
    elif isinstance(document, Mapping):
        raw = dict(document)
    else:
        got = "nothing" if document is None else f"{type(document).__name__} {_shown(document)}"
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys ({', '.join(_TOP_LEVEL)}, ...) "
            f"or the original list of one-key mappings; got {got}."
        )
    for old, new in _ALIASES.items():
        if old in raw:
            if new in raw:
                raise ConfigError(
                    f"{source}: keys {old!r} and {new!r} are both given; {old!r} is the old "
                    f"name of {new!r}. Keep one."
                )
            raw[new] = raw.pop(old)

    installed = registry.strategies()
    # An uninstalled plugin is the likelier mistake than a stray section, so say so first.
    interpolation = raw.get("interpolation")
    if isinstance(interpolation, str) and len(interpolation) > _MAX_NAME:
        raise ConfigError(
            f"{source}: key 'interpolation' must be a strategy name such as 'constant', got "
            f"{_shown(interpolation)}; installed: {', '.join(sorted(installed))}."
        )
    if isinstance(interpolation, str) and interpolation not in installed:
        try:
            registry.strategy_info(interpolation)
        except PluginError as exc:
            raise ConfigError(f"{source}: key 'interpolation' is invalid: {exc}") from exc
    _reject_unknown_keys(raw, installed, source)

    if nodes is not None:
        raw["nodes"] = [{"name": n.name, "host": n.host, "port": n.port} for n in nodes]
    if "nodes" not in raw:
        raise ConfigError(
            f"{source}: key 'nodes' is missing. List the cluster's nodes, e.g. "
            f"nodes: [{_NODE_EXAMPLE}]."
        )
    settings = {key: raw[key] for key in _SETTINGS if key in raw}
    methods = {name: _section(raw[name], name, source) for name in installed if name in raw}
    nodes = _nodes(raw["nodes"], source)
    base = os.path.dirname(source) if source != "<mapping>" else ""
    return Config(
        nodes=nodes,
        methods=methods,
        source=source,
        auth=_auth(raw.get("auth"), source, base),
        tls=_tls(raw.get("tls"), source, base),
        robust=_robust(raw.get("robust"), source),
        **settings,
    )


def _keys_of(
    value: Any,
    key: str,
    allowed: tuple[str, ...],
    example: str,
    source: str,
    *,
    secret: bool = False,
) -> None:
    """Check that ``value`` is a mapping with only ``allowed`` keys.

    With ``secret`` (the ``auth`` section), the message shows no value and only keys that
    look like config keys: a secret pasted into the section must not be echoed.
    """
    if not isinstance(value, Mapping):
        got = hidden(value) if secret else _shown(value)
        raise ConfigError(f"{source}: key {key!r} must be a mapping such as {example}; got {got}.")
    extra = [k for k in value if k not in allowed]
    if extra:
        shown = _shown_auth_key if secret else _shown_key
        raise ConfigError(
            f"{source}: key {key!r} has unknown {', '.join(map(shown, extra[:5]))}"
            f"{' and more' if extra[5:] else ''}; its keys are {', '.join(allowed)}, e.g. "
            f"{example}."
        )


def _path(value: Any, key: str, source: str, base: str, *, secret: bool = False) -> str:
    if not isinstance(value, str) or not value.strip():
        got = hidden(value) if secret else _shown(value)
        raise ConfigError(f"{source}: key {key!r} must be a file path, got {got}.")
    return os.path.join(base, os.path.expanduser(value))  # relative to the config file


def _auth(value: Any, source: str, base: str) -> AuthSettings | None:
    """The ``auth`` section: where the shared secret is; the secret is read now.

    No message shows a value of this section, only its keys and shapes: whatever was written
    here may be the secret, in the wrong place.
    """
    if value is None:
        return None
    example = "{secret_env: DPWA_SECRET} or {secret_file: secret.txt}"
    _keys_of(value, "auth", _AUTH_KEYS, example, source, secret=True)
    env = value.get("secret_env")
    if env is not None and not is_env_name(env):
        raise ConfigError(
            f"{source}: key 'auth.secret_env' must name an environment variable (letters, "
            f"digits and _, e.g. DPWA_SECRET), got {hidden(env)}. It is not shown: it may be "
            "the secret itself, which belongs in that variable (or in secret_file), never in "
            "the config."
        )
    path = None
    if "secret_file" in value:
        path = _path(value["secret_file"], "auth.secret_file", source, base, secret=True)
    allow = value.get("allow_readable_secret_file", False)
    if not isinstance(allow, bool):
        raise ConfigError(
            f"{source}: key 'auth.allow_readable_secret_file' must be true or false, "
            f"got {hidden(allow)}."
        )
    if "allow_readable_secret_file" in value and "secret_file" not in value:
        raise ConfigError(
            f"{source}: key 'auth.allow_readable_secret_file' only applies with secret_file; "
            "remove it."
        )
    secret = load_secret(env=env, path=path, where=source, allow_readable_file=allow)
    if path is not None and not file_is_private(path):
        _log.warning(
            "%s: secret file %s may be read by other users (allow_readable_secret_file is set)",
            source,
            path,
        )
    where = f"environment variable {env}" if env is not None else f"file {path}"
    return AuthSettings(where, secret)


def _tls(value: Any, source: str, base: str) -> TlsSettings | None:
    """The ``tls`` section: this node's certificate and key and the cluster CA."""
    if value is None:
        return None
    example = "{cert: node.pem, key: node.key, ca: ca.pem}"
    _keys_of(value, "tls", _TLS_KEYS, example, source)
    missing = [k for k in ("cert", "key", "ca") if k not in value]
    if missing:
        raise ConfigError(
            f"{source}: key 'tls' misses {', '.join(map(repr, missing))}; give all of cert, "
            f"key and ca, e.g. {example}."
        )
    check = value.get("check_hostname", False)
    if not isinstance(check, bool):
        raise ConfigError(
            f"{source}: key 'tls.check_hostname' must be true or false, got {_shown(check)}."
        )
    cert, key, ca = (_path(value[k], f"tls.{k}", source, base) for k in ("cert", "key", "ca"))
    return TlsSettings(cert, key, ca, check)


def _robust(value: Any, source: str) -> RobustSettings:
    """The ``robust`` section: clipping of what peers send, and the bound on their clocks."""
    if value is None:
        return RobustSettings()
    example = "{clip: true, clip_scale: 1.0, clip_window: 16, max_clock_lead: 2.0}"
    _keys_of(value, "robust", _ROBUST_KEYS, example, source)
    clip = value.get("clip", True)
    if not isinstance(clip, bool):
        raise ConfigError(f"{source}: key 'robust.clip' must be true or false, got {_shown(clip)}.")
    numbers: dict[str, float] = {}
    for key, rule in (
        ("clip_scale", "a number >= 1, e.g. 1.0 (the radius is this many times the median)"),
        ("max_clock_lead", "a number >= 1, e.g. 2.0 (a peer's clock counts at most 2x ours)"),
    ):
        number = value.get(key, getattr(RobustSettings, key))
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{source}: key 'robust.{key}' must be {rule}; got {_shown(number)}.")
        if not (math.isfinite(number) and number >= 1):
            raise ConfigError(f"{source}: key 'robust.{key}' must be {rule}; got {_shown(number)}.")
        numbers[key] = float(number)
    window = value.get("clip_window", RobustSettings.clip_window)
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 1024:
        raise ConfigError(
            f"{source}: key 'robust.clip_window' must be an integer 1..1024, e.g. 16; "
            f"got {_shown(window)}."
        )
    return RobustSettings(clip, numbers["clip_scale"], window, numbers["max_clock_lead"])


def _merge_list_layout(document: list[Any], source: str) -> dict[Any, Any]:
    """Merge the original layout, a list of one-key mappings, into one mapping."""
    merged: dict[Any, Any] = {}
    for number, item in enumerate(document, start=1):
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"{source}: item {number} of the top-level list is {_shown(item)}; in the list "
                "layout every item is a one-key mapping such as '- timeout_ms: 2500'."
            )
        for key, value in item.items():
            if key in merged:
                raise ConfigError(f"{source}: key {_shown_key(key)} is given twice. Keep one.")
            merged[key] = value
    return merged


def _reject_unknown_keys(raw: Mapping[Any, Any], installed: Iterable[str], source: str) -> None:
    names = sorted(installed)
    valid = [*_TOP_LEVEL, *names]
    unknown = [key for key in raw if key not in valid]
    if not unknown:
        return
    hints = ""
    for key in unknown[:5]:
        # Only keys shown in full get a hint; difflib's work is bounded by the key's length.
        if not (isinstance(key, str) and _shown_key(key) == repr(key)):
            continue
        close = difflib.get_close_matches(key, valid, n=1)
        if close:
            hints += f" Did you mean {close[0]!r}" + (f" for {key!r}?" if unknown[1:] else "?")
    listed = ", ".join(_shown_key(k) for k in unknown[:5]) + (" and more" if unknown[5:] else "")
    raise ConfigError(
        f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {listed}.{hints} Valid keys: "
        f"{', '.join(_TOP_LEVEL)}, and a section per installed interpolation: "
        f"{', '.join(names)}. A section for an interpolation that is not installed is an error "
        "too: install its plugin or remove the section."
    )


def _section(value: Any, name: str, source: str) -> Mapping[str, Any]:
    """A strategy's options; the original layout writes ``clock: 0`` for "no options"."""
    if value is None or (type(value) is int and value == 0):
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{source}: key {name!r} must be a mapping of options (e.g. "
            f"constant: {{value: 0.5}}), or 0 for none; got {_shown(value)}."
        )
    return value


def _nodes(value: Any, source: str) -> tuple[NodeSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"{source}: key 'nodes' must be a non-empty list of nodes such as "
            f"{_NODE_EXAMPLE}; got {_shown(value)}."
        )
    nodes = []
    for index, entry in enumerate(value):
        where = f"nodes[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"{source}: key {where!r} must be a mapping such as {_NODE_EXAMPLE}; "
                f"got {_shown(entry)}."
            )
        missing = [key for key in _NODE_KEYS if key not in entry]
        extra = [key for key in entry if key not in _NODE_KEYS]
        if missing or extra:
            problems = [f"misses {', '.join(map(repr, missing))}"] if missing else []
            problems += [f"has unknown {', '.join(map(_shown_key, extra))}"] if extra else []
            raise ConfigError(
                f"{source}: key {where!r} {' and '.join(problems)}; a node has exactly "
                f"name, host and port, e.g. {_NODE_EXAMPLE}."
            )
        nodes.append(NodeSpec(name=entry["name"], host=entry["host"], port=entry["port"]))
    return tuple(nodes)


def _restore(values: dict[str, Any]) -> Config:
    """Rebuild a pickled :class:`Config` (see ``Config.__reduce__``)."""
    return Config(**values)


# What error messages show of values: a bounded amount, built with bounded work.


class _ShortRepr(reprlib.Repr):
    """``reprlib`` with small limits: at most a few items per level, three levels deep."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = 6
        self.maxset = self.maxfrozenset = self.maxdeque = 6
        self.maxstring = self.maxother = self.maxlong = _SHOWN_CHARS

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * _SHOWN_CHARS:  # its decimal repr costs time and may fail
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()


def _cut(text: str, limit: int = _SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: Any) -> str:
    """``repr(value)`` cut to about 80 characters, without building the whole repr first."""
    try:
        return _cut(_SHORT_REPR.repr(value))
    except Exception:  # a caller's object whose repr fails: say what it is, nothing more
        return f"<{type(value).__name__} object>"


def _shown_key(key: Any) -> str:
    """A key as an error shows it: in full if it looks like a key, else cut or hidden.

    A key that looks like a generated token, or holds spaces, may be a secret pasted in the
    wrong place: only its length is shown.
    """
    if not isinstance(key, str):
        return _shown(key)
    if not _KEY_NAME.fullmatch(key) or looks_random(key):
        return f"<hidden key, {len(key)} characters>"
    if len(key) > 40:
        return f"{key[:16]!r}... ({len(key)} characters)"
    return repr(key)


def _shown_auth_key(key: Any) -> str:
    """A key of the ``auth`` section: shown only if it looks like one of its own keys."""
    if isinstance(key, str) and _AUTH_KEY_NAME.fullmatch(key):
        return repr(key)
    return f"<hidden key, {len(key)} characters>" if isinstance(key, str) else hidden(key)
