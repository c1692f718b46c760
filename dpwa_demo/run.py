"""``dpwa demo``: start the node processes, show their progress, and report.

The orchestrator imports no ML framework: each node is a ``python -m dpwa_demo.worker`` process
that builds its own framework's trainer. Steps:

1. check that the demo's packages are installed (or say ``pip install 'dpwa[demo]'``);
2. load and shard the digits once, into ``OUT/data.npz``;
3. for each run (``gossip``, then ``isolated`` with ``--compare``): pick free loopback ports,
   write ``cluster.yaml`` and ``job.json``, start one worker per node, start them together once
   all are ready, and draw their progress;
4. print the table, write ``OUT/dpwa-demo.png`` and print its path.

The exit code is 1 if any node failed, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from dpwa_core.config import load_config
from dpwa_core.errors import DpwaError
from dpwa_demo.options import node_frameworks
from dpwa_demo.progress import Progress
from dpwa_demo.report import NodeResult, RunResult, plot, table
from dpwa_demo.trainers import TRAINERS

__all__ = ["DemoError", "check_installed", "main", "run_demo"]

INSTALL_HINT = "pip install 'dpwa[demo]'"
"""How to install what the demo needs."""

READY_TIMEOUT = 180.0
"""Seconds the nodes have to import their framework and build their model."""


_MODULES = {"tensorflow": ("tensorflow", "keras"), "jax": ("jax", "flax", "optax")}
"""What a framework's trainer imports besides the framework itself (looked up, not imported)."""


class DemoError(DpwaError):
    """The demo cannot run: a package is missing or an option is wrong."""


def check_installed(frameworks: list[str]) -> None:
    """Raise :class:`DemoError` naming what to install if the demo's packages are missing.

    Looks the modules up without importing them, so no framework is loaded here.
    """
    unknown = sorted({f for f in frameworks if f not in TRAINERS})
    if unknown:
        raise DemoError(
            f"no demo trainer for {', '.join(unknown)}; --frameworks takes "
            f"{', '.join(sorted(TRAINERS))}"
        )
    modules = [module for f in dict.fromkeys(frameworks) for module in _MODULES.get(f, (f,))]
    needed = ["sklearn", "matplotlib", *modules]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        packages = ", ".join("scikit-learn" if name == "sklearn" else name for name in missing)
        raise DemoError(
            f"`dpwa demo` needs packages that are not installed: {packages}; run "
            f"`{INSTALL_HINT}` (for TensorFlow or JAX nodes: `pip install 'dpwa[all]'`)"
        )


def main(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """Run ``dpwa demo`` with parsed options (see :mod:`dpwa_demo.options`).

    Returns:
        0 if every node finished, 1 if any failed, 130 if interrupted (Ctrl+C).

    Raises:
        DemoError: a package is missing or an option is wrong.
        ConfigError: the options make an invalid cluster config (an unknown strategy).
    """
    try:
        frameworks = node_frameworks(args.nodes, args.frameworks, args.mixed)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    args.nodes = len(frameworks)  # the rest of the demo reads the resolved count
    check_installed(frameworks)
    load_config(_config(args, [f"w{i + 1}" for i in range(args.nodes)]))  # a bad option fails here
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoError(f"--out {args.out}: cannot create the output folder: {exc}") from None
    try:
        return run_demo(args, frameworks, sys.stdout if stream is None else stream)
    except KeyboardInterrupt:  # the nodes were stopped on the way out
        print("\ndpwa demo: interrupted", file=sys.stderr)
        return 130


def run_demo(args: argparse.Namespace, frameworks: list[str], stream: TextIO) -> int:
    """Train the runs, print the table and the PNG's path; return the exit code."""
    from dpwa_demo.data import load_digits_data

    out: Path = args.out
    data = load_digits_data(args.nodes, args.split)
    data.save(out / "data.npz")
    sizes = ", ".join(str(len(rows)) for rows in data.shards)
    stream.write(
        f"dpwa demo: {args.nodes} nodes, {args.steps} steps each, digits split by "
        f"{args.split} (train images per node: {sizes}; test images: {len(data.y_test)})\n"
    )
    for stale in ("gossip", "isolated", "dpwa-demo.png"):  # only the demo's own files
        path = out / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    labels = ["gossip", "isolated"] if args.compare else ["gossip"]
    runs = [_run(label, args, frameworks, out, stream) for label in labels]
    stream.write("\n" + table(runs) + "\n")
    stream.write(
        "train loss: on the node's own shard; test acc: on the common test set; dist to mean: "
        "distance of the node's parameters to the mean of its run's nodes\n"
    )
    png = plot(runs, out / "dpwa-demo.png")
    stream.write(f"plot: {png.resolve()}\n")
    failed = [f"{r.label}/{n.name}" for r in runs for n in r.nodes if not n.ok]
    for run in runs:
        for node in run.nodes:
            if not node.ok:
                stream.write(f"\n{run.label}/{node.name} failed; last lines of {node.log}:\n")
                stream.write(_tail(node.log))
    if failed:
        stream.write(f"dpwa demo: {len(failed)} node(s) failed: {', '.join(failed)}\n")
    stream.flush()
    return 1 if failed else 0


def _run(
    label: str, args: argparse.Namespace, frameworks: list[str], out: Path, stream: TextIO
) -> RunResult:
    folder = out / label
    folder.mkdir(parents=True)
    names = [f"w{i + 1}" for i in range(args.nodes)]
    config_path: str | None = None
    if label == "gossip":
        config_path = str(folder / "cluster.yaml")
        Path(config_path).write_text(yaml.safe_dump(_config(args, names)))
    job = {
        "data": str(out / "data.npz"),
        "folder": str(folder),
        "config": config_path,
        "nodes": [
            {"name": name, "framework": fw, "seed": i + 1, "shard": i}
            for i, (name, fw) in enumerate(zip(names, frameworks, strict=True))
        ],
        "steps": args.steps,
        "batch": args.batch,
        "hidden": args.hidden,
        "lr": args.lr,
        "eval_every": max(1, args.steps // 20),
    }
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    results = [
        NodeResult(n, fw, log=folder / f"{n}.log") for n, fw in zip(names, frameworks, strict=True)
    ]
    progress = Progress(stream, label, list(zip(names, frameworks, strict=True)), args.steps)
    seconds = _supervise(job_path, results, progress)
    return RunResult(label, folder, results, seconds)


def _config(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The cluster config: the library's defaults, plus the demo's options."""
    ports = _free_ports(len(names))
    config: dict[str, Any] = {
        "nodes": [
            {"name": n, "host": "127.0.0.1", "port": p} for n, p in zip(names, ports, strict=True)
        ],
        "pull_probability": args.pull_probability,
        "interpolation": args.interpolation,
        # The demo shows nodes from different seeds reaching consensus: keep their own starts.
        "start": "own",
    }
    if args.interpolation == "constant":
        config["constant"] = {"value": args.factor}
    return config


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 a moment ago (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _supervise(job: Path, results: list[NodeResult], progress: Progress) -> float:
    """Start a worker per node, start them together, relay events until all exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    events: queue.Queue[tuple[str, dict[str, Any] | None]] = queue.Queue()
    procs: dict[str, subprocess.Popen[str]] = {}
    logs = []
    try:
        for node in results:
            assert node.log is not None
            log = open(node.log, "w")  # noqa: SIM115 -- closed in finally
            logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-m", "dpwa_demo.worker", str(job), node.name],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
            procs[node.name] = proc
            threading.Thread(
                target=_relay, args=(node.name, proc, events, log), daemon=True
            ).start()
        by_name = {node.name: node for node in results}
        ready: set[str] = set()
        ended: set[str] = set()
        finished: set[str] = set()
        started: float | None = None
        stopped = False
        deadline = time.monotonic() + READY_TIMEOUT
        while len(ended) < len(results):
            if started is None and (len(ready | ended) == len(results)):
                started = time.monotonic()
                for name in ready - ended:
                    _send(procs[name], "start")
            if started is None and time.monotonic() > deadline:
                raise DemoError(
                    f"nodes {sorted(set(procs) - ready - ended)} were not ready after "
                    f"{READY_TIMEOUT:.0f} s; see their logs in {job.parent}"
                )
            if started is not None and not stopped and len(finished | ended) == len(results):
                stopped = True  # every node is done: let them stop serving their models
                for name in finished - ended:
                    _send(procs[name], "stop")
            try:
                name, event = events.get(timeout=0.25)
            except queue.Empty:
                continue
            node = by_name[name]
            if event is None:  # stdout closed: the process is ending
                node.returncode = procs[name].wait()
                ended.add(name)
                if not node.ok:
                    progress.failed(name, node.returncode)
                continue
            kind = event.get("event")
            if kind == "ready":
                ready.add(name)
            elif kind == "eval":
                node.evals.append(event)
            elif kind == "done":
                node.done = event
                finished.add(name)
            progress.update(name, event)
        progress.finish()
        return time.monotonic() - (started or time.monotonic())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def _send(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    except OSError:
        pass  # it died meanwhile; its exit is reported like any other


def _relay(
    name: str,
    proc: subprocess.Popen[str],
    events: queue.Queue[tuple[str, dict[str, Any] | None]],
    log: TextIO,
) -> None:
    """Forward a worker's JSON events to the queue; ``None`` when its stdout closes.

    Other lines (something a library printed) go to the node's log, beside its stderr.
    """
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict):
            events.put((name, event))
        else:
            with contextlib.suppress(ValueError):  # the log is closed when the demo gives up
                log.write(line)
                log.flush()
    events.put((name, None))


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return "(no log)\n"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "".join(f"    {line}\n" for line in text) or "    (empty)\n"
