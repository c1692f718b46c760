"""One demo node: ``python -m dpwa_demo.worker JOB.json NAME``.

``dpwa demo`` starts one of these per node. The worker loads the data the orchestrator saved,
builds its framework's trainer (see :mod:`dpwa_demo.trainers`), joins the cluster when the job
has one, and trains its shard. It talks to the orchestrator in JSON lines on stdout:

- ``{"event": "ready"}`` once the model is built and compiled (see ``Trainer.warm_up``) and its
  node is listening; the worker then waits for one line on stdin, so all nodes start training
  at the same moment;
- ``{"event": "progress", ...}`` about twice a second (step, loss, pull counters);
- ``{"event": "eval", ...}`` at each evaluation point, after saving the parameters to
  ``params/NAME_STEP.npy`` in the run folder;
- ``{"event": "done", ...}`` with the final numbers; the node keeps serving its model to its
  peers until a second line (or end of file) arrives on stdin.

Everything else (logs, tracebacks) goes to stderr. This module imports no ML framework itself.

Testing aid: when the environment variable ``DPWA_DEMO_FAIL_NODE`` names this node, the worker
raises an error halfway through training, so tests can check that ``dpwa demo`` reports a failed
node and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpwa_demo.data import DemoData
from dpwa_demo.trainers import make_trainer

__all__ = ["FAIL_ENV", "main", "run_node"]

FAIL_ENV = "DPWA_DEMO_FAIL_NODE"
"""Testing aid: the node named here raises an error halfway through training."""

_PROGRESS_EVERY = 0.5  # seconds between progress lines


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _pulls(stats: dict[str, Any] | None) -> dict[str, int | None]:
    keys = ("pulls_ok", "pulls_failed", "pulls_timed_out", "swarm_samples", "swarm_nodes")
    return {key: None if stats is None else int(stats[key]) for key in keys}


def run_node(job: dict[str, Any], name: str) -> None:
    """Train node ``name`` of a job (the dict ``dpwa demo`` writes to ``job.json``).

    Args:
        job: ``data`` (an ``.npz`` from :meth:`DemoData.save`), ``folder`` (the run folder),
            ``config`` (a cluster config path, or ``None`` to train alone), ``nodes`` (a list of
            ``{name, framework, seed, shard}``), ``steps``, ``batch``, ``hidden``, ``lr`` and
            ``eval_every``.
        name: which node of ``job["nodes"]`` this process is.
    """
    spec = next((node for node in job["nodes"] if node["name"] == name), None)
    if spec is None:
        raise ValueError(
            f"node {name!r} is not in the job; nodes: {[n['name'] for n in job['nodes']]}"
        )
    data = DemoData.load(Path(job["data"]))
    x, y = data.shard(spec["shard"])
    folder = Path(job["folder"]) / "params"
    folder.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(
        spec["framework"],
        inputs=data.inputs,
        hidden=job["hidden"],
        classes=data.classes,
        seed=spec["seed"],
        lr=job["lr"],
    )
    steps, batch, eval_every = job["steps"], job["batch"], job["eval_every"]
    fail_at = steps // 2 if os.environ.get(FAIL_ENV) == name else None
    rng = np.random.default_rng(spec["seed"])
    try:
        # Compile now, while the peers get ready too, not during the first steps and pulls.
        trainer.warm_up(x[:batch], y[:batch])
        trainer.evaluate(data.x_test, data.y_test)
        if job["config"] is not None:
            trainer.connect(job["config"], name)
        _emit("ready")
        if not sys.stdin.readline():
            raise RuntimeError("the demo orchestrator went away before the start signal")
        start = time.monotonic()
        last_progress = start
        losses: list[float] = []
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                _evaluate(trainer, data, folder, name, step, losses, start)
                losses = []
            if step == steps:
                break
            if step == fail_at:
                raise RuntimeError(f"{FAIL_ENV}={name}: this node fails on purpose (a testing aid)")
            rows = rng.integers(0, len(y), size=min(batch, len(y)))
            losses.append(trainer.train_step(x[rows], y[rows]))
            now = time.monotonic()
            if now - last_progress >= _PROGRESS_EVERY:
                last_progress = now
                _emit(
                    "progress",
                    step=step + 1,
                    loss=float(np.mean(losses)) if losses else math.nan,
                    time=now - start,
                    **_pulls(trainer.stats()),
                )
        train_loss, train_acc = trainer.evaluate(x, y)
        test_loss, test_acc = trainer.evaluate(data.x_test, data.y_test)
        _emit(
            "done",
            steps=steps,
            train_loss=train_loss,
            train_acc=train_acc,
            test_loss=test_loss,
            test_acc=test_acc,
            time=time.monotonic() - start,
            **_pulls(trainer.stats()),
        )
        # Keep serving our model until every node is done, so no peer's last pulls fail just
        # because this node finished first.
        sys.stdin.readline()
    finally:
        trainer.close()


def _evaluate(
    trainer: Any,
    data: DemoData,
    folder: Path,
    name: str,
    step: int,
    losses: list[float],
    start: float,
) -> None:
    np.save(folder / f"{name}_{step:06d}.npy", trainer.flat())
    test_loss, test_acc = trainer.evaluate(data.x_test, data.y_test)
    _emit(
        "eval",
        step=step,
        loss=float(np.mean(losses)) if losses else math.nan,
        test_loss=test_loss,
        test_acc=test_acc,
        time=time.monotonic() - start,
        **_pulls(trainer.stats()),
    )


def main(argv: list[str] | None = None) -> int:
    """Run one node from the command line: ``python -m dpwa_demo.worker JOB.json NAME``."""
    parser = argparse.ArgumentParser(
        prog="python -m dpwa_demo.worker", description="One node of `dpwa demo`."
    )
    parser.add_argument("job", type=Path, help="the job.json that `dpwa demo` wrote")
    parser.add_argument("name", help="this node's name in the job")
    args = parser.parse_args(argv)
    run_node(json.loads(args.job.read_text()), args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
