"""One node of a PyTorch job that learns scikit-learn's digits by gossip: copy this loop.

Start one process per node of the config, each with its own name:

    DPWA_NODE=w1 python examples/pytorch_digits/train.py &
    DPWA_NODE=w2 python examples/pytorch_digits/train.py &
    DPWA_NODE=w3 python examples/pytorch_digits/train.py &
    wait

Each node trains on its own third of the images, from its own initial weights, and gossips with
the others; every node ends up with a model that knows all the data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits

import dpwa_core


def main() -> None:
    """Train this node, printing test accuracy and gossip counters every 100 steps."""
    parser = argparse.ArgumentParser(description="One node learning the digits by gossip.")
    here = Path(__file__).parent
    parser.add_argument("--config", type=Path, default=here / "cluster.yaml", help="cluster")
    parser.add_argument("--name", help="this node's name (default: $DPWA_NODE)")
    parser.add_argument("--steps", type=int, default=500, help="SGD steps")
    args = parser.parse_args()

    config = dpwa_core.load_config(args.config)
    name = config.resolve_name(args.name)
    index = [node.name for node in config.nodes].index(name)

    # Data: the first 400 images are the test set; the rest is dealt out among the nodes.
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    x_test, y_test = x[:400], y[:400]
    x_train = x[400 + index :: len(config.nodes)]
    y_train = y[400 + index :: len(config.nodes)]

    torch.set_num_threads(1)  # the nodes share this machine's cores
    torch.manual_seed(index)  # each node starts from its own weights
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    gossip = dpwa_core.connect(model, config, name)  # serve our model, pull the peers'
    gossip.node.wait_for_peers(timeout=60)  # a short job: start together
    loss = 2.3  # about log(10): an untrained classifier's loss
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(y_train), (32,))
        # The blocking pair: this 200-step job's steps take a millisecond, and gossip.step
        # (which never waits) would see a pull only every few steps; a long job calls
        # gossip.step(loss) after optimizer.step() instead (README).
        gossip.update_send(loss, samples=32)  # publish the model; maybe start a pull
        optimizer.zero_grad()
        loss_t = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        loss_t.backward()
        optimizer.step()
        loss = loss_t.item()
        gossip.update_wait(loss)  # blend the peer's model into ours, in place
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            stats = gossip.node.stats()
            print(
                f"{name} step {step} loss {loss:.3f} test accuracy {accuracy:.1%} "
                f"pulls ok {stats['pulls_ok']} failed {stats['pulls_failed']}",
                flush=True,
            )
    gossip.close()


if __name__ == "__main__":
    main()
