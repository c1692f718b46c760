"""Race worker for dpwa: local SGD steps with gossip averaging through ``dpwa_core.connect``.

Run by ``benchmarks/race.py`` as ``python dpwa_worker.py --spec SPEC.json --rank R`` inside
host R of the lab. The cluster is nodes ``n0..n{world-1}`` at ``hosts[i]:base_port + i`` with
dpwa's defaults, overridden by ``spec["options"]``; the option ``api`` is the worker's own:
``"step"`` (the default when ``Gossip.step`` exists) calls ``gossip.step(loss, samples=batch)``
once after ``optimizer.step()``; ``"send_wait"`` calls ``update_send`` before the forward pass
and ``update_wait`` after ``optimizer.step()``; ``switch_interval`` (seconds) sets this process's
``sys.setswitchinterval``, to measure how much the training thread waits for the GIL while
dpwa's threads work; ``blend_momentum: true`` gossips SGD's momentum buffers with the model (they
are the weights of a copy of the model, held next to it in one module, so the flat buffer, and
every pull, carries both). Blocked time is measured around those calls.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import race_common as rc  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import dpwa_core  # noqa: E402

_WORKER_OPTIONS = ("api", "switch_interval", "blend_momentum")


def _config(spec: dict) -> dict:
    nodes = [
        {"name": f"n{i}", "host": host, "port": int(spec["base_port"]) + i}
        for i, host in enumerate(spec["hosts"])
    ]
    options = {k: v for k, v in (spec.get("options") or {}).items() if k not in _WORKER_OPTIONS}
    return {"nodes": nodes, **options}


def _with_momentum(model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
    """A module holding the model, then a copy of it whose weights are SGD's momentum buffers.

    The copy has the model's module types, so dpwa lays each buffer out as it lays out the
    weight it belongs to (the same strides: SGD's update stays a contiguous pass).
    """
    momentum = copy.deepcopy(model).requires_grad_(False)
    for p, buf in zip(model.parameters(), momentum.parameters(), strict=True):
        with torch.no_grad():
            buf.zero_()  # SGD's first step then makes it the gradient, as without
        optimizer.state[p]["momentum_buffer"] = buf
    both = nn.Module()
    both.model = model
    both.momentum = momentum
    return both


def main() -> None:
    spec, rank = rc.worker_args(__doc__)
    interval = (spec.get("options") or {}).get("switch_interval")
    if interval:
        sys.setswitchinterval(float(interval))
    config = _config(spec)
    run = rc.setup(spec, rank, seed_offset=rank if config.get("start") == "own" else 0)
    shared = run.model
    if (spec.get("options") or {}).get("blend_momentum"):
        shared = _with_momentum(run.model, run.optimizer)
    gossip = dpwa_core.connect(shared, config, f"n{rank}")
    api = (spec.get("options") or {}).get("api")
    if api is None:
        api = "step" if hasattr(gossip, "step") else "send_wait"
    reachable = gossip.node.wait_for_peers(timeout=30)
    print(f"n{rank}: api {api}, {reachable} peers reachable, config {config}", flush=True)
    last_loss = [2.302585]  # log(10), the loss of a uniform guess, until a step has one

    def step(images, labels):
        blocked = 0.0
        if api == "send_wait":
            t = time.perf_counter()
            gossip.update_send(last_loss[0], samples=run.batch)
            blocked += time.perf_counter() - t
        t = time.perf_counter()
        last_loss[0] = float(rc.sgd_step(run.model, run.optimizer, images, labels))
        run.pace.pace(time.perf_counter() - t)
        t = time.perf_counter()
        if api == "send_wait":
            gossip.update_wait(last_loss[0])
        else:
            gossip.step(last_loss[0], samples=run.batch)
        return last_loss[0], blocked + time.perf_counter() - t

    rc.train(run, step, f"n{rank}")
    rc.done(run, f"n{rank}", {"api": api, "config": config, "stats": gossip.node.stats()})
    gossip.close()


if __name__ == "__main__":
    main()
