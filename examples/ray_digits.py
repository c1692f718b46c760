"""Gossip training on a Ray cluster: ``dpwa_core.ray.run`` places the nodes, no host list.

Each node is a Ray actor that trains a small PyTorch MLP on its own label-skewed shard of
scikit-learn's digits (each node sees only a few digits) and averages with its peers. Run:

    pip install 'dpwa[demo,ray]'
    python examples/ray_digits.py --nodes 4                  # starts a local Ray instance
    python examples/ray_digits.py --address auto --nodes 16  # joins a running Ray cluster

On a cluster every machine needs dpwa, torch and scikit-learn installed (docs/DEPLOY.md).
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import numpy as np

import dpwa_core.ray
from dpwa_core.ray import NodeContext

# start: own: each node starts from its own weights (torch.manual_seed(rank) below) and the
# printed distances show them agreeing; the default, start: shared, copies one node's model.
SETTINGS = {
    "pull_probability": 1.0,
    "interpolation": "constant",
    "constant": {"value": 0.5},
    "start": "own",
}


def train(ctx: NodeContext, steps: int) -> dict[str, Any]:
    """One node: runs inside its Ray actor. The return value travels back to the caller."""
    import torch
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-6), dtype=torch.float32)
    y = torch.tensor(y)
    test = torch.arange(len(y)) % 4 == 0  # every 4th image is held out
    x_train, y_train = x[~test], y[~test]
    order = torch.argsort(y_train, stable=True)  # sorted by digit, then cut: label skew
    mine = order.tensor_split(ctx.num_nodes)[ctx.rank]
    x_mine, y_mine = x_train[mine], y_train[mine]

    torch.manual_seed(ctx.rank)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = 2.3
    with ctx.connect(model, seed=ctx.rank) as gossip:
        gossip.node.wait_for_peers(timeout=60)  # start together
        for step in range(1, steps + 1):
            batch = torch.randint(0, len(y_mine), (32,))
            # The blocking pair: one pull per step, which this short fixed-step run on label-
            # skewed shards needs to agree. A long job calls gossip.step(loss) after the
            # optimizer step instead, which never waits for the network.
            gossip.update_send(loss, samples=32)
            optimizer.zero_grad()
            loss_t = torch.nn.functional.cross_entropy(model(x_mine[batch]), y_mine[batch])
            loss_t.backward()
            optimizer.step()
            loss = loss_t.item()
            gossip.update_wait(loss)
            if step % 100 == 0:
                print(f"step {step} loss {loss:.3f}", flush=True)  # Ray prefixes the node
        ctx.wait_for_all()  # keep serving until the last node is done, so it still averages
        pulls = gossip.node.stats()["pulls_ok"]
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        params = gossip.adapter.to_flat(model).copy()
    return {"accuracy": accuracy, "pulls": pulls, "restarts": ctx.restarts, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4, help="how many nodes (default: 4)")
    parser.add_argument("--steps", type=int, default=600, help="steps per node (default: 600)")
    parser.add_argument("--address", help="a running Ray cluster, e.g. auto (default: local)")
    parser.add_argument(
        "--cpus-per-node", type=float, default=1.0, help="CPUs per node (default: 1)"
    )
    args = parser.parse_args()
    results = dpwa_core.ray.run(
        partial(train, steps=args.steps),
        num_nodes=args.nodes,
        config=SETTINGS,
        resources_per_node={"CPU": args.cpus_per_node},
        address=args.address,
    )
    mean = np.mean([r["params"] for r in results], axis=0)
    print(f"{'node':6} {'restarts':>8} {'pulls':>6} {'accuracy':>9} {'to mean':>8}")
    for rank, r in enumerate(results):
        distance = float(np.linalg.norm(r["params"] - mean))
        print(
            f"w{rank + 1:<5} {r['restarts']:>8} {r['pulls']:>6} {r['accuracy']:>9.1%} "
            f"{distance:>8.4f}"
        )


if __name__ == "__main__":
    main()
