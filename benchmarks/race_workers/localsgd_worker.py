"""Race worker for local SGD: plain local steps, and every 16th step an all-reduce average of
the parameters (torch's ``PeriodicModelAverager(period=16, warmup_steps=0)``) over gloo.

Run by ``benchmarks/race.py`` as ``python localsgd_worker.py --spec SPEC.json --rank R``.
Every rank builds the model from the same seed (a shared start). Blocked time is measured
around ``average_parameters``, called after every optimizer step.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import race_common as rc  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.algorithms.model_averaging.averagers import (  # noqa: E402
    PeriodicModelAverager,
)

PERIOD = 16


def main() -> None:
    spec, rank = rc.worker_args(__doc__)
    period = int((spec.get("options") or {}).get("period", PERIOD))
    run = rc.setup(spec, rank)
    rc.init_gloo(spec, rank)
    averager = PeriodicModelAverager(period=period, warmup_steps=0)
    print(f"rank {rank}: averaging every {period} steps", flush=True)

    def step(images, labels):
        t = time.perf_counter()
        loss = rc.sgd_step(run.model, run.optimizer, images, labels)
        run.pace.pace(time.perf_counter() - t)
        t = time.perf_counter()
        averager.average_parameters(run.model.parameters())
        return float(loss), time.perf_counter() - t

    cut = rc.train(run, step, f"rank {rank}", collective=True)
    rc.done(run, f"rank {rank}", {"period": period, "last_cut": cut})
    if not cut:  # after a broken all-reduce the group cannot be torn down cleanly
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
