"""One node of a PyTorch Lightning job that learns scikit-learn's digits by gossip.

Start one process per node of the config, each with its own name:

    DPWA_NODE=w1 python examples/lightning_digits/train.py &
    DPWA_NODE=w2 python examples/lightning_digits/train.py &
    wait

Each process runs its own ``Trainer.fit`` on its half of the images; ``DpwaCallback`` connects
the module when the fit starts and gossips after every optimizer step. ``--save DIR`` writes
DIR/NAME.npz (the starting and final parameters and the pull counts), to compare the nodes.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from dpwa_torch.lightning import DpwaCallback
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import dpwa_core


class Digits(L.LightningModule):
    """A small MLP classifier for 8x8 digits."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)  # DpwaCallback reports this loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _vector(model: torch.nn.Module) -> np.ndarray:
    """The model's parameters as one vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def main() -> None:
    """Fit this node, then print its test accuracy and gossip counters."""
    parser = argparse.ArgumentParser(description="One Lightning node learning the digits.")
    here = Path(__file__).parent
    parser.add_argument("--config", type=Path, default=here / "cluster.yaml", help="cluster")
    parser.add_argument("--name", help="this node's name (default: $DPWA_NODE)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--save", type=Path, help="folder for NAME.npz (parameters, pulls)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # quiet the banners
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    config = dpwa_core.load_config(args.config)
    name = config.resolve_name(args.name)
    index = [node.name for node in config.nodes].index(name)

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    x_test, y_test = x[:400], y[:400]
    share = slice(400 + index, None, len(config.nodes))
    loader = DataLoader(TensorDataset(x[share], y[share]), batch_size=32, shuffle=True)

    torch.set_num_threads(1)  # the nodes share this machine's cores
    torch.manual_seed(index)  # each node starts from its own weights
    model = Digits()
    start = _vector(model)
    gossip = DpwaCallback(config, name, wait_for_peers=60)  # a short job: start together
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        callbacks=[gossip],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader)

    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    stats = gossip.stats  # the node's counters when the fit closed it
    print(
        f"{name} step {trainer.global_step} loss {gossip.loss:.3f} test accuracy {accuracy:.1%} "
        f"pulls ok {stats['pulls_ok']} failed {stats['pulls_failed']}",
        flush=True,
    )
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        np.savez(
            args.save / f"{name}.npz", start=start, final=_vector(model), pulls_ok=stats["pulls_ok"]
        )


if __name__ == "__main__":
    main()
