"""Race worker for torch DistributedDataParallel over gloo: an all-reduce of the gradients
every step, overlapped with the backward pass.

Run by ``benchmarks/race.py`` as ``python ddp_worker.py --spec SPEC.json --rank R``. DDP's
communication cannot be timed around one call, so blocked time is a step's wall time minus a
compute-only calibration of the same step: the median of 15 steps (after 5 warm-up steps) of a
copy of the model without DDP, measured by each rank at startup.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import race_common as rc  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402


def _calibrate(model, spec, data, warmup: int = 5, timed: int = 15) -> float:
    """Median seconds of one forward + backward + optimizer step, with no communication."""
    local = copy.deepcopy(model)
    optimizer = rc.make_optimizer(local, spec)
    times = []
    for i in range(warmup + timed):
        images, labels = next(data)
        t = time.perf_counter()
        loss = F.cross_entropy(local(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    spec = rc.load_spec(args.spec)
    rank, batch = args.rank, int(spec["batch_size"])
    x, y, _, _ = rc.load_data(spec, rank)
    model = rc.make_model(int(spec["seed"]))
    recorder = rc.Recorder(spec, rank, model)
    pace = rc.Slowdown(spec, rank)
    compute_s = _calibrate(model, spec, rc.batches(x, y, batch, 999 + rank))
    data = rc.batches(x, y, batch, int(spec["seed"]) * 1000 + rank)

    rc.init_gloo(spec, rank)
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters and buffers
    optimizer = rc.make_optimizer(model, spec)
    print(f"rank {rank}: calibrated compute {compute_s * 1e3:.1f} ms per step", flush=True)

    recorder.wait_start()
    report = time.monotonic() + 10.0
    cut = False
    while recorder.running():
        images, labels = next(data)
        t = time.perf_counter()
        try:
            loss = F.cross_entropy(ddp(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the gradient all-reduce runs here, bucket by bucket
        except RuntimeError:
            # Ranks see the deadline a step apart: the first to stop leaves the others' last
            # all-reduce without a partner. That step is not counted.
            if recorder.running():
                raise
            cut = True
            break
        optimizer.step()
        wall = time.perf_counter() - t
        pace.pace(compute_s)
        recorder.step(max(0.0, wall - compute_s))
        if time.monotonic() >= report:
            report += 10.0
            print(f"rank {rank}: {recorder.steps} steps, loss {loss.item():.3f}", flush=True)
    extra = {"compute_s": compute_s, "blocked_method": "wall - calibration", "last_cut": cut}
    result = recorder.finish(extra)
    print(f"rank {rank}: done, {result['steps']} steps", flush=True)
    if not cut:  # after a broken all-reduce the group cannot be torn down cleanly
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
