"""The options of ``dpwa demo``, kept apart so ``dpwa --help`` never imports a framework."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = [
    "DEFAULT_NODES",
    "DESCRIPTION",
    "MIXED",
    "add_arguments",
    "frameworks_for",
    "node_frameworks",
]

DEFAULT_NODES = 4
"""Nodes when neither ``--nodes`` nor ``--mixed`` says otherwise."""

MIXED = ("torch", "tensorflow", "jax")
"""The frameworks of ``--mixed``, one node each (in turn, with more nodes)."""

DESCRIPTION = """\
Start several local node processes, each a small MLP (64 -> hidden -> 10) trained on its own
shard of scikit-learn's digits (shipped with scikit-learn; nothing is downloaded), gossiping over
127.0.0.1. Each node prints a live progress line. At the end a table gives, per node, the steps,
pulls ok/failed/timed out, the final training loss (on the node's shard), the test accuracy (on
a common held-out set) and the distance of its parameters to the mean of all nodes' parameters;
a PNG shows test accuracy per node and the consensus distance over the steps.

By default each node sees only a few digits (--split labels): alone it cannot recognise the
others, so what gossip brings is plain. --compare also trains the same nodes isolated (same
seeds, same shards, no gossip) and shows both runs in the table and the plot.

--mixed runs three nodes, one PyTorch, one Keras (TensorFlow) and one JAX, that average one
model across the frameworks; with --compare the isolated run is the same three nodes alone.

The exit status is 1 if any node failed, else 0. docs/DEMO.md describes the demo in full.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``dpwa demo`` subparser)."""
    parser.add_argument(
        "--nodes",
        type=_positive,
        default=None,
        metavar="N",
        help=f"node processes (default: {DEFAULT_NODES}, or one per framework listed by "
        f"--frameworks, or {len(MIXED)} with --mixed)",
    )
    parser.add_argument(
        "--steps",
        type=_positive,
        default=1500,
        metavar="N",
        help="SGD steps per node (default: 1500)",
    )
    parser.add_argument(
        "--interpolation",
        default="constant",
        metavar="NAME",
        help="interpolation strategy: constant, clock, loss or a plugin's name; "
        "`dpwa plugins` lists them (default: constant)",
    )
    parser.add_argument(
        "--factor",
        type=_fraction,
        default=0.5,
        metavar="F",
        help="the constant strategy's factor: local = (1-F)*local + F*peer (default: 0.5)",
    )
    parser.add_argument(
        "--pull-probability",
        type=_fraction,
        default=1.0,
        metavar="P",
        help="chance that a step pulls a random peer's model (default: 1.0, every step)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run the same nodes isolated (no gossip) and show both runs",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("dpwa-demo-output"),
        metavar="DIR",
        help="folder for the plot, the config, logs and parameter snapshots; "
        "its earlier demo files are replaced (default: ./dpwa-demo-output)",
    )
    parser.add_argument(
        "--split",
        choices=("labels", "iid"),
        default="labels",
        help="labels: each node sees only a few digits (non-iid, the default); "
        "iid: random shards, every node sees every digit",
    )
    parser.add_argument(
        "--frameworks",
        default=None,
        metavar="LIST",
        help="framework of each node, comma-separated, one per node, or one name for all "
        "(default: torch)",
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help=f"one node per framework ({', '.join(MIXED)}) averaging one model; with "
        "--nodes N (at least 3) the frameworks take turns",
    )
    parser.add_argument(
        "--hidden", type=_positive, default=64, metavar="N", help="hidden units (default: 64)"
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=0.1,
        metavar="LR",
        help="SGD learning rate (default: 0.1)",
    )
    parser.add_argument(
        "--batch", type=_positive, default=32, metavar="N", help="batch size (default: 32)"
    )


def node_frameworks(nodes: int | None, frameworks: str | None, mixed: bool) -> list[str]:
    """Resolve ``--nodes``, ``--frameworks`` and ``--mixed`` to one framework name per node.

    Args:
        nodes: ``--nodes``, or ``None`` when not given.
        frameworks: ``--frameworks``, or ``None`` when not given.
        mixed: ``--mixed``.

    Returns:
        One framework per node; its length is the number of nodes.

    Raises:
        ValueError: the options contradict each other.
    """
    if not mixed:
        spec = frameworks or "torch"
        if nodes is None:  # a list of frameworks counts the nodes; one name means the default
            listed = len([name for name in spec.split(",") if name.strip()])
            nodes = listed if listed > 1 else DEFAULT_NODES
        return frameworks_for(spec, nodes)
    if frameworks is not None:
        raise ValueError(
            f"--mixed sets the frameworks ({','.join(MIXED)}); drop --frameworks, or drop "
            "--mixed and list one framework per node with --frameworks"
        )
    count = len(MIXED) if nodes is None else nodes
    if count < len(MIXED):
        raise ValueError(
            f"--mixed needs at least {len(MIXED)} nodes, one per framework; got --nodes {count}"
        )
    return [MIXED[i % len(MIXED)] for i in range(count)]


def frameworks_for(spec: str, nodes: int) -> list[str]:
    """Expand ``--frameworks`` to one framework name per node.

    Args:
        spec: one name, or a comma-separated list with exactly ``nodes`` names.
        nodes: the number of nodes.

    Raises:
        ValueError: the list is empty or its length is neither 1 nor ``nodes``.
    """
    names = [name.strip().lower() for name in spec.split(",") if name.strip()]
    if len(names) == 1:
        return names * nodes
    if len(names) != nodes:
        raise ValueError(
            f"--frameworks lists {len(names)} frameworks for {nodes} nodes; "
            "give one name for all nodes or exactly one per node"
        )
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value
