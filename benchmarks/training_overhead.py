"""How long gossip blocks the training thread, as a fraction of step time.

Two PyTorch nodes on this machine train a ~10M-parameter MLP with pull probability 1: every step
publishes the parameters and pulls the other node's. Per step, each node times

- ``send``: ``gossip.update_send`` (publish the parameters, start the pull),
- ``step``: forward, backward and the optimizer step (the pull runs meanwhile),
- ``wait``: ``gossip.update_wait`` (collect the pull, interpolate into the model),

and reports ``blocking = (send + wait) / (send + step + wait)``. ``alone`` is the same training
step without gossip, timed in between, as the reference step time. Inside ``send``, ``to_flat``
is the copy of the parameters into the published snapshot; inside ``wait``, ``interp`` is the
interpolation into the model; what remains of ``wait`` is waiting for the pull itself.

Both ways of holding the model are measured in the same run and the same two processes, in
turns (one gossip step of each mode, then one step alone), so both see the same machine load:
``zero-copy`` (the default of ``connect()``: the parameters are views into one flat buffer, so
publishing is one memcpy and interpolating one ``lerp_``) and ``copy`` (``connect(...,
zero_copy=False)``: tensor by tensor, transposing Linear weights into the canonical layout).
Each mode has its own pair of nodes (its own cluster).

``rss`` and ``private`` are how much the process's resident memory, and the part of it not
shared with other processes, grew from just before ``connect()`` through the warm-up steps, in
multiples of the model's float32 size. The target is about 3x beyond the model: two published
snapshots and one pulled vector. With ``--transport auto`` the snapshots live in shared memory
(so they leave ``private``) and reading the peer's snapshot maps the peer's pages into ``rss``;
``--transport tcp`` keeps everything private.

Run by hand: ``python benchmarks/training_overhead.py [--steps 40] [--batch 256]``
``[--modes zero-copy copy]``. Prints a table and one JSON line. Each node uses ``--threads``
torch threads (default 1: two nodes share this machine's cores). The target is blocking at most
5 % of the step time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

from _ports import free_ports


def _model(width: int, depth: int) -> Any:
    import torch

    layers: list[Any] = [torch.nn.Linear(784, width), torch.nn.ReLU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


class _Timed:
    """Wraps the gossip's adapter and sums the time spent in ``to_flat`` and ``interpolate``."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.to_flat_s = 0.0
        self.interpolate_s = 0.0

    def to_flat(self, state: Any, out: Any = None) -> Any:
        start = time.perf_counter()
        try:
            return self.adapter.to_flat(state, out=out)
        finally:
            self.to_flat_s += time.perf_counter() - start

    def interpolate(self, state: Any, peer: Any, factor: float) -> Any:
        start = time.perf_counter()
        try:
            return self.adapter.interpolate(state, peer, factor)
        finally:
            self.interpolate_s += time.perf_counter() - start


class _Run:
    """One model, its optimizer and its gossip handle, timed step by step."""

    def __init__(self, mode: str, name: str, config: dict[str, Any], args: argparse.Namespace):
        import torch

        import dpwa_core

        torch.manual_seed(int(name[1:]))
        self.mode = mode
        self.loss = 1.0
        self.batch = args.batch
        self.times: dict[str, list[float]] = {
            key: [] for key in ("send", "step", "wait", "to_flat", "interp")
        }
        self.model = _model(args.width, args.depth)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        x = torch.randn(args.batch, 784)
        for _ in range(args.warmup):  # gradients and allocator caches exist before connect()
            self.train_step(x, torch.randint(0, 10, (args.batch,)))
        rss, uss = _memory()
        self.gossip = dpwa_core.connect(self.model, config, name, zero_copy=mode == "zero-copy")
        self.timed = _Timed(self.gossip.adapter)
        self.gossip.adapter = self.timed
        self.gossip.node.wait_for_peers(timeout=60)
        for _ in range(args.warmup):
            self.gossip_step(x, torch.randint(0, 10, (args.batch,)), record=False)
        rss_after, uss_after = _memory()
        model_bytes = 4 * sum(p.numel() for p in self.model.parameters())
        self.rss_growth = (rss_after - rss) / model_bytes
        """Growth of resident memory from connect() through the warm-up steps, in models."""
        self.uss_growth = (uss_after - uss) / model_bytes
        """The same for memory not shared with other processes."""
        self.batch = args.batch
        self.times: dict[str, list[float]] = {
            key: [] for key in ("send", "step", "wait", "to_flat", "interp")
        }

    def train_step(self, x: Any, y: Any) -> float:
        import torch

        self.optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())

    def gossip_step(self, x: Any, y: Any, record: bool) -> None:
        timed = self.timed
        timed.to_flat_s = timed.interpolate_s = 0.0
        t0 = time.perf_counter()
        self.gossip.update_send(self.loss, samples=self.batch)
        t1 = time.perf_counter()
        self.loss = self.train_step(x, y)
        t2 = time.perf_counter()
        self.gossip.update_wait(self.loss)
        t3 = time.perf_counter()
        if record:
            for key, value in (
                ("send", t1 - t0),
                ("step", t2 - t1),
                ("wait", t3 - t2),
                ("to_flat", timed.to_flat_s),
                ("interp", timed.interpolate_s),
            ):
                self.times[key].append(value)


def _memory() -> tuple[int, int]:
    """(resident, unique) bytes of this process; unique leaves out shared memory."""
    import psutil

    info = psutil.Process().memory_full_info()
    return info.rss, info.uss


def _node(name: str, configs: dict[str, Any], args: argparse.Namespace, out: Any) -> None:
    """One process: a node per mode, measured in turns on the same data and the same cores."""
    import torch

    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 784)
    y = torch.randint(0, 10, (args.batch,))

    runs = [_Run(mode, name, config, args) for mode, config in configs.items()]
    alone = []
    for i in range(args.steps):
        for run in runs:  # turns: each mode sees the same load
            run.gossip_step(x, y, record=True)
        start = time.perf_counter()
        runs[i % len(runs)].train_step(x, y)
        alone.append(time.perf_counter() - start)

    for run in runs:
        stats = run.gossip.node.stats()
        times = run.times
        out.put(
            {
                "node": name,
                "mode": run.mode,
                "params": sum(p.numel() for p in run.model.parameters()),
                "alone_ms": 1e3 * statistics.median(alone),
                **{f"{key}_ms": 1e3 * statistics.mean(values) for key, values in times.items()},
                "blocking": sum(times["send"] + times["wait"])
                / sum(times["send"] + times["step"] + times["wait"]),
                "rss_growth_x": run.rss_growth,
                "uss_growth_x": run.uss_growth,
                "pulls_ok": stats["pulls_ok"],
                "pulls_failed": stats["pulls_failed"] + stats["pulls_timed_out"],
            }
        )
    # Keep serving until the other node is done too, so its last pulls succeed.
    time.sleep(args.linger)
    for run in runs:
        run.gossip.close()


def main() -> None:
    """Run the benchmark and print a table and a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="measured steps (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured first steps")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--width", type=int, default=1700, help="hidden width (default 1700)")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    parser.add_argument("--linger", type=float, default=5.0, help="seconds to serve after")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["zero-copy", "copy"],
        choices=["zero-copy", "copy"],
        help="how connect() holds the model; each mode runs its own pair of nodes",
    )
    parser.add_argument(
        "--transport",
        default="auto",
        choices=["auto", "tcp", "shm"],
        help="the nodes' transport (auto: shared memory between co-located nodes)",
    )
    args = parser.parse_args()

    print(f"measuring {' and '.join(args.modes)} in turns ...", file=sys.stderr, flush=True)
    rows = _cluster(args)
    rows.sort(key=lambda row: (args.modes.index(row["mode"]), row["node"]))

    print(f"\n{rows[0]['params'] / 1e6:.1f}M parameters, batch {args.batch}, {args.steps} steps")
    header = ("mode", "node", "alone", "send", "to_flat", "step", "wait", "interp", "blocking")
    header += ("rss", "private")
    print(
        "".join(f"{h:>10}" for h in header)
        + "  pulls ok/failed  (ms; blocking = (send+wait)/total)"
    )
    for row in rows:
        cells = [row["mode"], row["node"]]
        keys = ("alone_ms", "send_ms", "to_flat_ms", "step_ms", "wait_ms", "interp_ms")
        cells += [f"{row[k]:.1f}" for k in keys]
        cells += [f"{100 * row['blocking']:.1f}%"]
        cells += [f"{row['rss_growth_x']:.2f}x", f"{row['uss_growth_x']:.2f}x"]
        print("".join(f"{c:>10}" for c in cells) + f"  {row['pulls_ok']}/{row['pulls_failed']}")
    keys = ("steps", "batch", "width", "depth", "threads", "transport")
    settings = {k: getattr(args, k) for k in keys}
    print(json.dumps({"benchmark": "training_overhead", **settings, "nodes": rows}))


def _cluster(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Two processes, each running one node per mode; a separate cluster per mode."""
    configs = {}
    for mode in args.modes:
        ports = free_ports(2)
        configs[mode] = {
            "start": "own",  # single pulls are measured, not training from one model
            "nodes": [
                {"name": f"w{i + 1}", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)
            ],
            "pull_probability": 1.0,
            "timeout_ms": 5000,
            "interpolation": "constant",
            "constant": {"value": 0.5},
            "transport": args.transport,
        }
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_node, args=(f"w{i + 1}", configs, args, queue)) for i in range(2)]
    for proc in procs:
        proc.start()
    rows = [queue.get(timeout=1800) for _ in range(2 * len(args.modes))]
    for proc in procs:
        proc.join()
    return rows


if __name__ == "__main__":
    main()
