"""Race worker for dpwa: local SGD steps with gossip averaging through ``dpwa_core.connect``.

Run by ``benchmarks/race.py`` as ``python dpwa_worker.py --spec SPEC.json --rank R`` inside
host R of the lab. The cluster is nodes ``n0..n{world-1}`` at ``hosts[i]:base_port + i`` with
dpwa's defaults, overridden by ``spec["options"]``; the option ``api`` is the worker's own:
``"step"`` (the default when ``Gossip.step`` exists) calls ``gossip.step(loss, samples=batch)``
once after ``optimizer.step()``; ``"send_wait"`` calls ``update_send`` before the forward pass
and ``update_wait`` after ``optimizer.step()``. Blocked time is measured around those calls.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import race_common as rc  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dpwa_core  # noqa: E402

_WORKER_OPTIONS = ("api",)


def _config(spec: dict) -> dict:
    nodes = [
        {"name": f"n{i}", "host": host, "port": int(spec["base_port"]) + i}
        for i, host in enumerate(spec["hosts"])
    ]
    config: dict = {"nodes": nodes}
    options = dict(spec.get("options") or {})
    for key in _WORKER_OPTIONS:
        options.pop(key, None)
    config.update(options)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    spec = rc.load_spec(args.spec)
    rank, batch = args.rank, int(spec["batch_size"])
    x, y, _, _ = rc.load_data(spec, rank)
    config = _config(spec)
    own_start = config.get("start") == "own"
    model = rc.make_model(int(spec["seed"]) + (rank if own_start else 0))
    optimizer = rc.make_optimizer(model, spec)
    recorder = rc.Recorder(spec, rank, model)
    pace = rc.Slowdown(spec, rank)
    data = rc.batches(x, y, batch, int(spec["seed"]) * 1000 + rank)

    gossip = dpwa_core.connect(model, config, f"n{rank}")
    api = (spec.get("options") or {}).get("api")
    if api is None:
        api = "step" if hasattr(gossip, "step") else "send_wait"
    reachable = gossip.node.wait_for_peers(timeout=30)
    print(f"n{rank}: api {api}, {reachable} peers reachable, config {config}", flush=True)

    recorder.wait_start()
    loss_value = math.log(10.0)  # the loss of a uniform guess, until the first step has one
    report = time.monotonic() + 10.0
    while recorder.running():
        images, labels = next(data)
        blocked = 0.0
        if api == "send_wait":
            t = time.perf_counter()
            gossip.update_send(loss_value, samples=batch)
            blocked += time.perf_counter() - t
        t = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        pace.pace(time.perf_counter() - t)
        t = time.perf_counter()
        if api == "send_wait":
            gossip.update_wait(loss_value)
        else:
            gossip.step(loss_value, samples=batch)
        blocked += time.perf_counter() - t
        recorder.step(blocked)
        if time.monotonic() >= report:
            report += 10.0
            print(f"n{rank}: {recorder.steps} steps, loss {loss_value:.3f}", flush=True)
    stats = gossip.node.stats()
    result = recorder.finish({"api": api, "config": config, "stats": stats})
    blocked = result["blocked_s"]
    print(f"n{rank}: done, {result['steps']} steps, blocked {blocked:.1f} s", flush=True)
    gossip.close()


if __name__ == "__main__":
    main()
