"""A learning-rate schedule and a stopping rule that follow the whole swarm, not one node.

Start one process per node of the config, as for train.py:

    DPWA_NODE=w1 python examples/pytorch_digits/swarm_schedule.py &
    DPWA_NODE=w2 python examples/pytorch_digits/swarm_schedule.py &
    DPWA_NODE=w3 python examples/pytorch_digits/swarm_schedule.py &
    wait

``gossip.node.swarm()`` estimates the samples the cluster has trained from the clocks its peers
answer with (docs/CONFIG.md, "Swarm progress"). The learning rate decays on a cosine over the
swarm's samples, and every node stops once the swarm has trained ``--swarm-samples``: each
counts the others' work, so a node that trains faster takes more of it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from sklearn.datasets import load_digits

import dpwa_core


def main() -> None:
    """Train this node until the swarm has trained the budget, printing progress."""
    parser = argparse.ArgumentParser(description="One node of a swarm-scheduled job.")
    here = Path(__file__).parent
    parser.add_argument("--config", type=Path, default=here / "cluster.yaml", help="cluster")
    parser.add_argument("--name", help="this node's name (default: $DPWA_NODE)")
    parser.add_argument("--swarm-samples", type=int, default=3 * 32 * 400, help="budget")
    parser.add_argument("--lr", type=float, default=0.5, help="peak learning rate")
    args = parser.parse_args()

    config = dpwa_core.load_config(args.config)
    name = config.resolve_name(args.name)
    index = [node.name for node in config.nodes].index(name)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    x_test, y_test = x[:400], y[:400]
    x_train, y_train = x[400 + index :: len(config.nodes)], y[400 + index :: len(config.nodes)]

    torch.set_num_threads(1)
    torch.manual_seed(index)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    gossip = dpwa_core.connect(model, config, name, optimizer=optimizer)
    gossip.node.wait_for_peers(timeout=60)

    step, loss = 0, 2.3
    swarm = gossip.node.swarm()
    while swarm.samples < args.swarm_samples:
        # Cosine decay over the swarm's progress: every node is at the same point of it.
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * min(swarm.samples / args.swarm_samples, 1)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.randint(0, len(y_train), (32,))
        optimizer.zero_grad()
        loss_t = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        loss_t.backward()
        optimizer.step()
        loss = loss_t.item()
        gossip.step(loss, samples=32)  # blend a landed pull, publish, pull on
        step += 1
        swarm = gossip.node.swarm()
        if step % 100 == 0:
            print(
                f"{name} step {step} loss {loss:.3f} lr {lr:.4f} "
                f"swarm {swarm.samples:.0f} samples from {swarm.nodes} nodes",
                flush=True,
            )
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(
        f"{name} stopped at step {step}: the swarm trained {swarm.samples:.0f} samples, "
        f"{32 * step} of them here; test accuracy {accuracy:.1%}",
        flush=True,
    )
    gossip.close()


if __name__ == "__main__":
    main()
