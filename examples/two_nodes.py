"""Two PyTorch nodes on this machine learn one linear model by gossip.

Each node sees only its own half of the data and starts from different weights. Run:

    python examples/two_nodes.py [--config examples/two_nodes.yaml] [--steps 300]

The script starts itself twice, as nodes w1 and w2 of the config (the node's name comes from
the DPWA_NODE environment variable), and prefixes each line with the node's name.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

CONFIG = Path(__file__).with_name("two_nodes.yaml")


def train(name: str, config: Path, steps: int) -> None:
    import torch

    import dpwa_core

    torch.set_num_threads(1)  # two nodes share this machine's cores: one thread each
    index = int(name[1:])
    generator = torch.Generator().manual_seed(0)
    true_w = torch.randn(16, 1, generator=generator)
    x = torch.randn(2000, 16, generator=generator)
    y = x @ true_w + 0.01 * torch.randn(2000, 1, generator=generator)
    shard = slice((index - 1) * 1000, index * 1000)  # each node trains on its own half
    x, y = x[shard], y[shard]

    torch.manual_seed(index)  # different initial weights on each node
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with dpwa_core.connect(model, config, name) as gossip:
        gossip.node.wait_for_peers(timeout=30)  # start together: this job is only seconds long
        error = (model.weight.detach().T - true_w).norm().item()
        print(f"step    0  |w - w*| {error:.4f}", flush=True)
        loss = float("nan")
        for step in range(1, steps + 1):
            batch = torch.randint(0, 1000, (32,))
            # The blocking pair: each step waits for its pull. This job's steps take microseconds,
            # so with gossip.step (which never waits) it would end before a pull lands; a real
            # training loop calls gossip.step(loss) after the optimizer step instead.
            gossip.update_send(loss if step > 1 else 1.0, samples=32)
            optimizer.zero_grad()
            loss_t = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            loss_t.backward()
            optimizer.step()
            loss = loss_t.item()
            gossip.update_wait(loss)
            if step % 50 == 0:
                stats = gossip.node.stats()
                error = (model.weight.detach().T - true_w).norm().item()
                print(
                    f"step {step:4d}  loss {loss:.5f}  |w - w*| {error:.4f}  "
                    f"pulls ok {stats['pulls_ok']} failed {stats['pulls_failed']}",
                    flush=True,
                )


def launch(argv: list[str]) -> int:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *argv],
            env={**os.environ, "DPWA_NODE": name},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("w1", "w2")
    ]

    def relay(name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{name}] {line}", end="", flush=True)

    names = ("w1", "w2")
    relays = [threading.Thread(target=relay, args=p) for p in zip(names, procs, strict=True)]
    for thread in relays:
        thread.start()
    for thread in relays:
        thread.join()
    codes = [proc.wait() for proc in procs]
    print("both nodes finished" if not any(codes) else f"node exit codes: {codes}")
    return max(codes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Two local nodes learn one model by gossip.")
    parser.add_argument("--config", type=Path, default=CONFIG, help="cluster config (2 nodes)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per node")
    args = parser.parse_args()
    if "DPWA_NODE" in os.environ:
        train(os.environ["DPWA_NODE"], args.config, args.steps)
    else:
        sys.exit(launch(sys.argv[1:]))
