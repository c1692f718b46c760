"""How long gossip blocks the training thread, as a fraction of step time.

Two PyTorch nodes on this machine train a ~10M-parameter MLP with pull probability 1: every step
publishes the parameters and pulls the other node's. Per step, each node times

- ``send``: ``gossip.update_send`` (publish the parameters, start the pull),
- ``step``: forward, backward and the optimizer step (the pull runs meanwhile),
- ``wait``: ``gossip.update_wait`` (collect the pull, interpolate into the model),

and reports ``blocking = (send + wait) / (send + step + wait)``. The same loop without gossip is
timed first in the same processes, as the reference step time.

Run by hand: ``python benchmarks/training_overhead.py [--steps 40] [--batch 256]``.
Prints a table and one JSON line. Each node uses ``--threads`` torch threads (default 1: two
nodes share this machine's cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import time
from typing import Any


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _model(width: int, depth: int) -> Any:
    import torch

    layers: list[Any] = [torch.nn.Linear(784, width), torch.nn.ReLU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def _node(name: str, config: dict[str, Any], args: argparse.Namespace, out: Any) -> None:
    import torch

    import dpwa_core

    torch.set_num_threads(args.threads)
    torch.manual_seed(int(name[1:]))
    model = _model(args.width, args.depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(args.batch, 784)
    y = torch.randint(0, 10, (args.batch,))

    def train_step() -> float:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        train_step()
    alone = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step()
        alone.append(time.perf_counter() - start)

    send, step, wait = [], [], []
    with dpwa_core.connect(model, config, name) as gossip:
        gossip.node.wait_for_peers(timeout=60)
        loss = 1.0
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            gossip.update_send(loss, samples=args.batch)
            t1 = time.perf_counter()
            loss = train_step()
            t2 = time.perf_counter()
            gossip.update_wait(loss)
            t3 = time.perf_counter()
            if i >= args.warmup:
                send.append(t1 - t0)
                step.append(t2 - t1)
                wait.append(t3 - t2)
        stats = gossip.node.stats()
        # Keep serving until the other node is done too, so its last pulls succeed.
        time.sleep(args.linger)
    params = sum(p.numel() for p in model.parameters())
    out.put(
        {
            "node": name,
            "params": params,
            "alone_ms": 1e3 * statistics.median(alone),
            "send_ms": 1e3 * statistics.mean(send),
            "step_ms": 1e3 * statistics.mean(step),
            "wait_ms": 1e3 * statistics.mean(wait),
            "blocking": sum(send + wait) / sum(send + step + wait),
            "pulls_ok": stats["pulls_ok"],
            "pulls_failed": stats["pulls_failed"] + stats["pulls_timed_out"],
        }
    )


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
    args = parser.parse_args()

    ports = _free_ports(2)
    config = {
        "nodes": [
            {"name": f"w{i + 1}", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)
        ],
        "pull_probability": 1.0,
        "timeout_ms": 5000,
        "interpolation": "constant",
        "constant": {"value": 0.5},
    }
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_node, args=(f"w{i + 1}", config, args, queue)) for i in range(2)]
    for proc in procs:
        proc.start()
    rows = sorted((queue.get(timeout=1800) for _ in procs), key=lambda row: row["node"])
    for proc in procs:
        proc.join()

    print(f"\n{rows[0]['params'] / 1e6:.1f}M parameters, batch {args.batch}, {args.steps} steps")
    header = ("node", "alone", "send", "step", "wait", "blocking", "pulls ok", "failed")
    print("".join(f"{h:>10}" for h in header) + "    (ms; blocking = (send+wait)/total)")
    for row in rows:
        cells = [row["node"], *(f"{row[k]:.1f}" for k in ("alone_ms", "send_ms", "step_ms"))]
        cells += [f"{row['wait_ms']:.1f}", f"{100 * row['blocking']:.1f}%"]
        cells += [str(row["pulls_ok"]), str(row["pulls_failed"])]
        print("".join(f"{c:>10}" for c in cells))
    settings = {k: getattr(args, k) for k in ("steps", "batch", "width", "depth", "threads")}
    print(json.dumps({"benchmark": "training_overhead", **settings, "nodes": rows}))


if __name__ == "__main__":
    main()
