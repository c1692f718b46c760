"""Race worker for local SGD: plain local steps, and every 16th step an all-reduce average of
the parameters (torch's ``PeriodicModelAverager(period=16, warmup_steps=0)``) over gloo.

Run by ``benchmarks/race.py`` as ``python localsgd_worker.py --spec SPEC.json --rank R``.
Every rank builds the model from the same seed (a shared start). Blocked time is measured
around ``average_parameters``, called after every optimizer step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import race_common as rc  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.algorithms.model_averaging.averagers import (  # noqa: E402
    PeriodicModelAverager,
)

PERIOD = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    spec = rc.load_spec(args.spec)
    rank, batch = args.rank, int(spec["batch_size"])
    period = int((spec.get("options") or {}).get("period", PERIOD))
    x, y, _, _ = rc.load_data(spec, rank)
    model = rc.make_model(int(spec["seed"]))
    optimizer = rc.make_optimizer(model, spec)
    recorder = rc.Recorder(spec, rank, model)
    pace = rc.Slowdown(spec, rank)
    data = rc.batches(x, y, batch, int(spec["seed"]) * 1000 + rank)

    rc.init_gloo(spec, rank)
    averager = PeriodicModelAverager(period=period, warmup_steps=0)
    print(f"rank {rank}: averaging every {period} steps", flush=True)

    recorder.wait_start()
    report = time.monotonic() + 10.0
    cut = False
    while recorder.running():
        images, labels = next(data)
        t = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pace.pace(time.perf_counter() - t)
        t = time.perf_counter()
        try:
            averager.average_parameters(model.parameters())
        except RuntimeError:
            # Ranks see the deadline at different steps: the first to stop leaves the others'
            # next average without a partner. That step is not counted.
            if recorder.running():
                raise
            cut = True
            break
        recorder.step(time.perf_counter() - t)
        if time.monotonic() >= report:
            report += 10.0
            print(f"rank {rank}: {recorder.steps} steps, loss {loss.item():.3f}", flush=True)
    result = recorder.finish({"period": period, "last_cut": cut})
    print(f"rank {rank}: done, {result['steps']} steps", flush=True)
    if not cut:  # after a broken all-reduce the group cannot be torn down cleanly
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
