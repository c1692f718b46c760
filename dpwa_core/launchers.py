"""Which node is this process? The environment variables that name it, in the order they count.

A process that is not given its node's name finds it in its environment:

1. ``DPWA_NODE``: the node's name (``dpwa launch`` sets it; so can a user).
2. A launcher's rank, used as an index into the config's node list (rank ``i`` runs
   ``nodes[i]``), read from the first of these that is set:

   ==========================  ========================  ==========================
   rank variable               size variable             set by
   ==========================  ========================  ==========================
   ``RANK``                    ``WORLD_SIZE``            torchrun
   ``SLURM_PROCID``            ``SLURM_NTASKS``          Slurm srun
   ``OMPI_COMM_WORLD_RANK``    ``OMPI_COMM_WORLD_SIZE``  Open MPI mpirun
   ``JOB_COMPLETION_INDEX``    (none)                    Kubernetes indexed Job
   ==========================  ========================  ==========================

A variable set to the empty string counts as unset. A rank that is not a whole number >= 0, or
that has no node, is a :class:`~dpwa_core.errors.ConfigError` that says how to fix it; a size
variable that differs from the number of nodes is logged as one warning.

Example:
    >>> choice = node_from_environment(["w1", "w2"], {"RANK": "1", "WORLD_SIZE": "2"})
    >>> choice.name, choice.source
    ('w2', 'RANK=1 (torchrun)')
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dpwa_core._log import get_logger
from dpwa_core.errors import ConfigError

__all__ = [
    "ARGUMENT_SOURCE",
    "LAUNCHERS",
    "NODE_ENV",
    "Launcher",
    "NodeChoice",
    "node_from_environment",
    "ways_to_choose",
]

NODE_ENV = "DPWA_NODE"
"""Environment variable naming this process's node; it wins over every launcher's rank."""
ARGUMENT_SOURCE = "the name argument"
"""The :attr:`NodeChoice.source` of a name passed by the caller rather than read from the
environment."""

_log = get_logger("launchers")
_WHOLE_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Launcher:
    """A process launcher that tells each process its rank in an environment variable.

    Args:
        rank_var: the variable holding the process's rank, 0 for the first process.
        size_var: the variable holding the number of processes, or None if it sets none.
        name: the launcher's name, as a user knows it, e.g. ``"torchrun"``.
        how_many: how to start ``{n}`` processes with this launcher, for error messages.
    """

    rank_var: str
    size_var: str | None
    name: str
    how_many: str


LAUNCHERS: tuple[Launcher, ...] = (
    Launcher(
        "RANK",
        "WORLD_SIZE",
        "torchrun",
        "torchrun --nproc-per-node {n} (or --nnodes x --nproc-per-node = {n})",
    ),
    Launcher("SLURM_PROCID", "SLURM_NTASKS", "Slurm srun", "srun --ntasks {n}"),
    Launcher("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI mpirun", "mpirun -n {n}"),
    Launcher(
        "JOB_COMPLETION_INDEX",
        None,
        "Kubernetes indexed Job",
        "completions: {n} and parallelism: {n} in the Job",
    ),
)
"""The launchers whose rank picks a node, in the order they are checked (after ``DPWA_NODE``)."""


@dataclass(frozen=True)
class NodeChoice:
    """This process's node, and where its name came from.

    Args:
        name: the node's name, one of the config's nodes.
        source: where the name came from, for log lines: :data:`ARGUMENT_SOURCE`,
            ``"DPWA_NODE"``, or a launcher's rank such as ``"RANK=2 (torchrun)"``.
    """

    name: str
    source: str

    @property
    def from_argument(self) -> bool:
        """True when the caller passed the name; False when the environment chose it."""
        return self.source == ARGUMENT_SOURCE


def ways_to_choose() -> str:
    """Describe, in one sentence fragment, every environment variable that can pick the node.

    Returns:
        Text such as ``"set DPWA_NODE to a node's name, or start the process under a launcher
        that sets its rank: RANK (torchrun), ..."``, for error messages and help.
    """
    ranks = ", ".join(f"{launcher.rank_var} ({launcher.name})" for launcher in LAUNCHERS)
    return (
        f"set {NODE_ENV} to a node's name, or start the process under a launcher that sets its "
        f"rank: {ranks}; rank i runs the i-th node of the config (counting from 0)"
    )


def node_from_environment(
    names: Sequence[str], environ: Mapping[str, str] = os.environ, *, where: str = "config"
) -> NodeChoice | None:
    """Pick this process's node from ``DPWA_NODE`` or a launcher's rank variable.

    ``DPWA_NODE``, when set, wins. Otherwise the first rank variable of :data:`LAUNCHERS` that
    is set is an index into ``names``. A launcher's size variable that differs from the number
    of nodes is logged as one warning. Empty values count as unset.

    Args:
        names: the config's node names, in config order.
        environ: the environment to read; the process's own by default.
        where: what to name in error messages, usually the config file.

    Returns:
        The node and the variable that chose it, or None when no variable is set.

    Raises:
        ConfigError: ``DPWA_NODE`` names no node of the config, a rank is not a whole number
            >= 0, or a rank is past the last node; the message says how to fix it.

    Example:
        >>> node_from_environment(["w1", "w2"], {"DPWA_NODE": "w1", "RANK": "1"})
        NodeChoice(name='w1', source='DPWA_NODE')
    """
    names = list(names)
    named = environ.get(NODE_ENV, "")
    if named:
        if named not in names:
            raise ConfigError(
                f"{where}: {NODE_ENV}={named!r}, but there is no node named {named!r}. Known "
                f"nodes: {', '.join(names)}. Set {NODE_ENV} to one of them, or unset it to let "
                "a launcher's rank pick the node."
            )
        return NodeChoice(named, NODE_ENV)
    for launcher in LAUNCHERS:
        value = environ.get(launcher.rank_var, "")
        if value:
            return _by_rank(launcher, value, names, environ, where)
    return None


def _by_rank(
    launcher: Launcher, value: str, names: list[str], environ: Mapping[str, str], where: str
) -> NodeChoice:
    var, count = launcher.rank_var, len(names)
    if not _WHOLE_NUMBER.fullmatch(value.strip()):
        raise ConfigError(
            f"{where}: {var}={value!r} is not a rank: {launcher.name} sets it to a whole number "
            f">= 0 (0 for the first process). Fix or unset {var}, or set {NODE_ENV} to a node's "
            "name."
        )
    rank = int(value.strip())
    how = launcher.how_many.format(n=count)
    if launcher.size_var is not None:
        size = environ.get(launcher.size_var, "")
        if size and size.strip() != str(count):
            _log.warning(
                "%s: %s=%s (%s) but the config has %d node%s (%s): every process needs a node "
                "and every node a process; start %s, or change the config's nodes",
                where,
                launcher.size_var,
                size,
                launcher.name,
                count,
                "" if count == 1 else "s",
                _summary(names),
                how,
            )
    if rank >= count:
        raise ConfigError(
            f"{where}: {var}={rank} but the config has {count} node{'' if count == 1 else 's'} "
            f"({_summary(names)}), so ranks go from 0 to {count - 1}: start as many processes "
            f"as the config has nodes, e.g. {how}, or add nodes."
        )
    return NodeChoice(names[rank], f"{var}={rank} ({launcher.name})")


def _summary(names: list[str]) -> str:
    """``w1..w4`` for long lists, the names themselves for short ones."""
    return ", ".join(names) if len(names) <= 2 else f"{names[0]}..{names[-1]}"
