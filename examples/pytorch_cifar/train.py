"""One node of a CIFAR-10 job trained by gossip, with today's PyTorch.

The original dpwa's CIFAR-10 example, brought up to date: one process per node reads the shared
config and is told its name; it trains on its own share of the training images and gossips with
the others. Start every node of config.yaml (4 here, as in the original):

    dpwa launch examples/pytorch_cifar/config.yaml -- \\
        python examples/pytorch_cifar/train.py --data ~/data/cifar-10-batches-py

or by hand, one per terminal or machine: ``python train.py --name w1 --data PATH``. Nothing is
downloaded: ``--data`` is an extracted CIFAR-10 python version (``cifar-10-batches-py``), or
``--synthetic N`` trains on N generated images of CIFAR's shape to try the setup out.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cifar
import numpy as np
import torch
from models import MODELS

import dpwa_core


def parse_args() -> argparse.Namespace:
    """The command line; ``--help`` lists the options."""
    parser = argparse.ArgumentParser(description="One node of a CIFAR-10 gossip job.")
    here = Path(__file__).parent
    parser.add_argument("--config", type=Path, default=here / "config.yaml", help="cluster")
    parser.add_argument("--name", help="this node's name in the config (default: $DPWA_NODE)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a local cifar-10-batches-py folder")
    source.add_argument("--synthetic", type=int, metavar="N", help="N generated images instead")
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--steps", type=int, default=20000, help="SGD steps of this node")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak rate of the cosine schedule")
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between test runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, help="seed of this node (default: its index)")
    return parser.parse_args()


def evaluate(model: torch.nn.Module, x: np.ndarray, y: torch.Tensor, device: str) -> float:
    """Accuracy of ``model`` on uint8 images ``x`` with labels ``y``, in batches of 1000."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), 1000):
            logits = model(cifar.to_tensor(x[start : start + 1000]).to(device))
            correct += (logits.argmax(1).cpu() == y[start : start + 1000]).sum().item()
    model.train()
    return correct / len(y)


def main() -> None:
    """Train this node, printing test accuracy and gossip counters every ``--eval-every``."""
    args = parse_args()
    config = dpwa_core.load_config(args.config)
    name = config.resolve_name(args.name)
    names = [node.name for node in config.nodes]
    index = names.index(name)
    if args.device == "cpu":  # share this machine's cores with the other nodes on it
        here = sum(node.host == config.node(name).host for node in config.nodes)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // here))
    torch.manual_seed(index if args.seed is None else args.seed)

    if args.data is not None:
        x_train, y_train, x_test, y_test = cifar.load(args.data)
    else:
        x_train, y_train = cifar.synthetic(args.synthetic, seed=0)
        x_test, y_test = cifar.synthetic(max(args.synthetic // 5, 10), seed=1)
    x_train, y_train = x_train[index :: len(names)], y_train[index :: len(names)]  # our share
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    y_test = torch.from_numpy(y_test)
    print(f"{name}: {len(y_train)} training images, {len(y_test)} test images", flush=True)

    model = MODELS[args.model]().to(args.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    # Parameters and BatchNorm statistics are gossiped; momentum buffers stay local.
    with dpwa_core.connect(model, config, name) as gossip:
        gossip.node.wait_for_peers(timeout=120)
        loss, started = 2.3, time.monotonic()  # 2.3 = log(10), an untrained classifier
        for step in range(1, args.steps + 1):
            rows = torch.randint(0, len(y_train), (args.batch_size,))
            inputs = cifar.augment(cifar.to_tensor(x_train[rows].numpy())).to(args.device)
            labels = y_train[rows].to(args.device)
            # The blocking pair (each step waits for its pull); on a slow link call
            # gossip.step(loss) after optimizer.step() instead, which never waits (README).
            gossip.update_send(loss, samples=len(rows))  # publish; maybe start a pull
            optimizer.zero_grad(set_to_none=True)
            loss_t = torch.nn.functional.cross_entropy(model(inputs), labels)
            loss_t.backward()
            optimizer.step()
            schedule.step()
            loss = loss_t.item()
            gossip.update_wait(loss)  # blend the peer's model into ours, in place
            if step % args.eval_every == 0 or step == args.steps:
                accuracy = evaluate(model, x_test, y_test, args.device)
                stats = gossip.node.stats()
                print(
                    f"{name} step {step} loss {loss:.3f} test accuracy {accuracy:.1%} "
                    f"pulls ok {stats['pulls_ok']} failed {stats['pulls_failed']} "
                    f"timed out {stats['pulls_timed_out']} ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
