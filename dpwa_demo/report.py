"""The demo's results: consensus distances, the final table and the PNG.

Consensus distance: at an evaluation step, each node's distance is the Euclidean norm of its
parameter vector minus the mean of all nodes' vectors at that step. The table gives each node's
own distance at the end; the plot gives the mean over the nodes at every evaluation step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "NodeResult",
    "RunResult",
    "consensus_over_time",
    "distances_to_mean",
    "final_distances",
    "plot",
    "table",
]


@dataclass
class NodeResult:
    """What one node process reported and how it ended."""

    name: str
    """The node's name (``w1``, ...)."""
    framework: str
    """Its trainer's framework."""
    returncode: int | None = None
    """The process's exit code (``None`` while it runs)."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Its ``eval`` events, in step order."""
    done: dict[str, Any] | None = None
    """Its ``done`` event, or ``None`` if it did not finish."""
    log: Path | None = None
    """Its stderr log file."""

    @property
    def ok(self) -> bool:
        """True when the node finished training and exited with 0."""
        return self.returncode == 0 and self.done is not None


@dataclass
class RunResult:
    """One run of all nodes: with gossip, or isolated."""

    label: str
    """``gossip`` or ``isolated``."""
    folder: Path
    """The run's folder (job, config, logs, ``params/``)."""
    nodes: list[NodeResult]
    """One result per node."""
    seconds: float = 0.0
    """Wall time of the run, from the start signal to the last exit."""

    def snapshot(self, name: str, step: int) -> np.ndarray | None:
        """Node ``name``'s parameters saved at ``step``, or ``None`` if there are none."""
        path = self.folder / "params" / f"{name}_{step:06d}.npy"
        return np.load(path, allow_pickle=False) if path.exists() else None

    def mean_accuracy(self) -> float:
        """Mean final test accuracy over the nodes that finished (NaN if none did)."""
        values = [node.done["test_acc"] for node in self.nodes if node.done is not None]
        return float(np.mean(values)) if values else math.nan


def distances_to_mean(vectors: dict[str, np.ndarray]) -> dict[str, float]:
    """Each vector's Euclidean distance to the mean of all of them."""
    if not vectors:
        return {}
    mean = np.mean(np.stack(list(vectors.values())), axis=0)
    return {name: float(np.linalg.norm(v - mean)) for name, v in vectors.items()}


def consensus_over_time(run: RunResult) -> tuple[list[int], list[float]]:
    """Steps and, at each, the mean over nodes of the distance to the nodes' mean.

    A step counts only when at least two nodes saved their parameters at it.
    """
    steps = sorted({e["step"] for node in run.nodes for e in node.evals})
    xs: list[int] = []
    ys: list[float] = []
    for step in steps:
        vectors = {
            node.name: v for node in run.nodes if (v := run.snapshot(node.name, step)) is not None
        }
        if len(vectors) >= 2:
            xs.append(step)
            ys.append(float(np.mean(list(distances_to_mean(vectors).values()))))
    return xs, ys


def final_distances(run: RunResult) -> dict[str, float]:
    """Each finished node's distance to the mean of the finished nodes' final parameters."""
    vectors: dict[str, np.ndarray] = {}
    for node in run.nodes:
        if node.done is not None:
            v = run.snapshot(node.name, node.done["steps"])
            if v is not None:
                vectors[node.name] = v
    return distances_to_mean(vectors)


def table(runs: list[RunResult]) -> str:
    """The final table: one row per node of every run, then each run's mean accuracy."""
    header = (
        "run",
        "node",
        "framework",
        "steps",
        "pulls ok",
        "failed",
        "timed out",
        "train loss",
        "test acc",
        "dist to mean",
    )
    rows: list[tuple[str, ...]] = [header]
    for run in runs:
        distances = final_distances(run)
        for node in run.nodes:
            done = node.done
            if done is None:
                last = node.evals[-1]["step"] if node.evals else 0
                status = f"FAILED (exit code {node.returncode}) after step {last}"
                rows.append((run.label, node.name, node.framework, status))
                continue
            rows.append(
                (
                    run.label,
                    node.name,
                    node.framework,
                    str(done["steps"]),
                    _count(done.get("pulls_ok")),
                    _count(done.get("pulls_failed")),
                    _count(done.get("pulls_timed_out")),
                    f"{done['train_loss']:.3f}",
                    f"{done['test_acc']:.1%}",
                    f"{distances[node.name]:.3f}" if node.name in distances else "-",
                )
            )
    full = [row for row in rows if len(row) == len(header)]
    widths = [max(len(row[i]) for row in full) for i in range(len(header))]
    lines = []
    for row in rows:
        # Names left-aligned, numbers right-aligned; a failed node's status spans the numbers.
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:3])]
        cells += [cell.rjust(widths[i + 3]) for i, cell in enumerate(row[3:])]
        if len(row) < len(header):
            cells[-1] = row[-1]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    for run in runs:
        finished = sum(node.done is not None for node in run.nodes)
        lines.append(
            f"{run.label}: mean test accuracy {run.mean_accuracy():.1%} over {finished} of "
            f"{len(run.nodes)} nodes, {run.seconds:.1f} s"
        )
    lines.extend(_gains(runs))
    return "\n".join(lines)


def _gains(runs: list[RunResult]) -> list[str]:
    """With a gossip and an isolated run: each node's test accuracy gain from gossip."""
    by_label = {run.label: run for run in runs}
    if "gossip" not in by_label or "isolated" not in by_label:
        return []
    alone = {node.name: node.done for node in by_label["isolated"].nodes}
    gains = []
    for node in by_label["gossip"].nodes:
        other = alone.get(node.name)
        if node.done is not None and other is not None:
            points = 100 * (node.done["test_acc"] - other["test_acc"])
            gains.append(f"{node.name} ({node.framework}) {points:+.1f}")
    if not gains:
        return []
    return [f"test accuracy, gossip minus isolated, in points: {', '.join(gains)}"]


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def plot(runs: list[RunResult], path: Path) -> Path:
    """Draw test accuracy per node and consensus distance over the steps; save a PNG.

    Args:
        runs: the runs to draw (gossip with solid lines, isolated with dashed ones).
        path: where to write the PNG.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    fig, (acc_ax, dist_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run in runs:
        style = "-" if run.label == "gossip" else "--"
        for i, node in enumerate(run.nodes):
            xs = [e["step"] for e in node.evals]
            ys = [e["test_acc"] for e in node.evals]
            acc_ax.plot(
                xs,
                ys,
                style,
                color=colors[i % len(colors)],
                label=f"{node.name} ({run.label})",
            )
        steps, distances = consensus_over_time(run)
        dist_ax.plot(
            steps, distances, style, color="black" if style == "-" else "grey", label=run.label
        )
    acc_ax.set(
        xlabel="SGD steps per node",
        ylabel="test accuracy",
        title="Test accuracy per node",
        ylim=(0, 1),
    )
    dist_ax.set(
        xlabel="SGD steps per node",
        ylabel="mean distance to the nodes' mean",
        title="Consensus distance (mean over nodes)",
    )
    acc_ax.legend(fontsize="small", loc="lower right", ncol=2 if len(runs) > 1 else 1)
    dist_ax.legend()
    for ax in (acc_ax, dist_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
