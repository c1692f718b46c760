"""Race worker for torch DistributedDataParallel over gloo: an all-reduce of the gradients
every step, overlapped with the backward pass.

Run by ``benchmarks/race.py`` as ``python ddp_worker.py --spec SPEC.json --rank R``. DDP's
communication cannot be timed around one call, so blocked time is a step's wall time minus a
compute-only calibration of the same step: the median of 15 steps (after 5 warm-up steps) of a
copy of the model without DDP, measured by each rank at startup.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import race_common as rc  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402


def _calibrate(run: rc.Rank, warmup: int = 5, timed: int = 15) -> float:
    """Median seconds of one forward + backward + optimizer step, with no communication."""
    local = copy.deepcopy(run.model)
    optimizer = rc.make_optimizer(local, run.spec)
    data = rc.batches(run.x, run.y, run.batch, 999 + run.rank)
    times = []
    for i in range(warmup + timed):
        images, labels = next(data)
        t = time.perf_counter()
        rc.sgd_step(local, optimizer, images, labels)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    spec, rank = rc.worker_args(__doc__)
    run = rc.setup(spec, rank)
    compute_s = _calibrate(run)
    rc.init_gloo(spec, rank)
    ddp = DistributedDataParallel(run.model)  # broadcasts rank 0's parameters and buffers
    print(f"rank {rank}: calibrated compute {compute_s * 1e3:.1f} ms per step", flush=True)

    def step(images, labels):
        t = time.perf_counter()
        loss = rc.sgd_step(ddp, run.optimizer, images, labels)  # all-reduce under backward
        wall = time.perf_counter() - t
        run.pace.pace(compute_s)
        return float(loss), max(0.0, wall - compute_s)

    cut = rc.train(run, step, f"rank {rank}", collective=True)
    extra = {"compute_s": compute_s, "blocked_method": "wall - calibration", "last_cut": cut}
    rc.done(run, f"rank {rank}", extra)
    if not cut:  # after a broken all-reduce the group cannot be torn down cleanly
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
