"""dpwa: distributed pair-wise averaging, asynchronous peer-to-peer training by gossip.

The core is framework-neutral: nodes trade flat float32 buffers over TCP. Framework adapters
(``dpwa_torch``, found through the ``dpwa.adapters`` entry-point group) map models to and from
that buffer; interpolation strategies are pluggy plugins found through ``dpwa.interpolation``.

Importing ``dpwa_core`` imports no ML framework.

Example:
    >>> import dpwa_core
    >>> gossip = dpwa_core.connect(model, "cluster.yaml", "w1")   # doctest: +SKIP
"""

from __future__ import annotations

from dpwa_core.adapters import Adapter, detect_adapter, get_adapter
from dpwa_core.config import Config, NodeSpec, load_config
from dpwa_core.connect import Gossip, connect
from dpwa_core.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    DpwaError,
    InterpolationError,
    PluginError,
    ProtocolError,
)
from dpwa_core.hookspec import Strategy, hookimpl
from dpwa_core.layout import Layout
from dpwa_core.node import Node, PullResult
from dpwa_core.swarm import SwarmProgress

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterError",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DpwaError",
    "Gossip",
    "InterpolationError",
    "Layout",
    "Node",
    "NodeSpec",
    "PluginError",
    "ProtocolError",
    "PullResult",
    "Strategy",
    "SwarmProgress",
    "__version__",
    "connect",
    "detect_adapter",
    "get_adapter",
    "hookimpl",
    "load_config",
]
