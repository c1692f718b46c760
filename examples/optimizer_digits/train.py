"""One node of a PyTorch job whose optimizer gossips: ``opt.step()`` is the only dpwa call.

Start one process per node of the config, each with its own name:

    DPWA_NODE=w1 python examples/optimizer_digits/train.py &
    DPWA_NODE=w2 python examples/optimizer_digits/train.py &
    wait

Each node trains on its own half of scikit-learn's digits; ``GossipOptimizer`` runs Adam's step
and then one non-blocking gossip step, so each node's model learns from the other's data too.
``--save DIR`` writes DIR/NAME.npz (the starting and final parameters and the pull counts), to
compare the nodes afterwards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from dpwa_torch.optimizer import GossipOptimizer
from sklearn.datasets import load_digits

import dpwa_core


def _vector(model: torch.nn.Module) -> torch.Tensor:
    """The model's parameters as one vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    """Train this node, printing test accuracy and gossip counters every 100 steps."""
    parser = argparse.ArgumentParser(description="One node learning the digits by gossip.")
    here = Path(__file__).parent
    parser.add_argument("--config", type=Path, default=here / "cluster.yaml", help="cluster")
    parser.add_argument("--name", help="this node's name (default: $DPWA_NODE)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--save", type=Path, help="folder for NAME.npz (parameters, pulls)")
    args = parser.parse_args()

    config = dpwa_core.load_config(args.config)
    name = config.resolve_name(args.name)
    index = [node.name for node in config.nodes].index(name)

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    x_test, y_test = x[:400], y[:400]
    x_train, y_train = x[400 + index :: len(config.nodes)], y[400 + index :: len(config.nodes)]

    torch.set_num_threads(1)  # the nodes share this machine's cores
    torch.manual_seed(index)  # each node starts from its own weights
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    start = _vector(model)

    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    with GossipOptimizer(adam, model, config, name, samples_per_step=32) as opt:
        opt.gossip.node.wait_for_peers(timeout=60)  # a short job: start together
        for step in range(1, args.steps + 1):
            batch = torch.randint(0, len(y_train), (32,))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            opt.step(loss=loss.item())  # Adam's step, then gossip.step: never waits
            if step % 100 == 0 or step == args.steps:
                with torch.no_grad():
                    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
                stats = opt.gossip.node.stats()
                print(
                    f"{name} step {step} loss {opt.loss:.3f} test accuracy {accuracy:.1%} "
                    f"pulls ok {stats['pulls_ok']} failed {stats['pulls_failed']}",
                    flush=True,
                )
        if args.save is not None:
            final = _vector(model)
            args.save.mkdir(parents=True, exist_ok=True)
            np.savez(
                args.save / f"{name}.npz",
                start=start.numpy(),
                final=final.numpy(),
                pulls_ok=opt.gossip.node.stats()["pulls_ok"],
            )


if __name__ == "__main__":
    main()
