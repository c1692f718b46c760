"""One node of a Hugging Face ``Trainer`` job, a tiny BERT classifier trained by gossip.

Start one process per node of the config, each with its own name:

    DPWA_NODE=w1 python examples/transformers_tiny/train.py &
    DPWA_NODE=w2 python examples/transformers_tiny/train.py &
    wait

The model is built from a config (two layers, 32 wide: nothing is downloaded) and learns a
synthetic task, "does the sequence hold token 3?", from this node's own examples. Each process
runs its own ``Trainer.train``; ``DpwaTrainerCallback`` connects the model at train begin and
gossips after every optimizer step. ``--save DIR`` writes DIR/NAME.npz (the starting and final
parameters and the pull counts), to compare the nodes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from dpwa_torch.transformers import DpwaTrainerCallback
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import dpwa_core

VOCAB, LENGTH = 32, 12


class Sequences(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences labelled by whether token 3 occurs in them."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, VOCAB, (count, LENGTH), generator=generator)
        holds = torch.rand(count, generator=generator) < 0.5
        where = torch.randint(0, LENGTH, (count,), generator=generator)
        self.ids[holds, where[holds]] = 3
        self.labels = holds.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _vector(model: torch.nn.Module) -> np.ndarray:
    """The model's parameters as one vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def main() -> None:
    """Train this node, then print its accuracy on held-out sequences and its gossip counters."""
    parser = argparse.ArgumentParser(description="One Trainer node of a tiny BERT.")
    here = Path(__file__).parent
    parser.add_argument("--config", type=Path, default=here / "cluster.yaml", help="cluster")
    parser.add_argument("--name", help="this node's name (default: $DPWA_NODE)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--save", type=Path, help="folder for NAME.npz (parameters, pulls)")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()

    config = dpwa_core.load_config(args.config)
    name = config.resolve_name(args.name)
    index = [node.name for node in config.nodes].index(name)

    torch.set_num_threads(1)  # the nodes share this machine's cores
    torch.manual_seed(index)  # each node starts from its own weights
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=LENGTH,
            num_labels=2,
        )
    )
    start = _vector(model)
    gossip = DpwaTrainerCallback(config, name, wait_for_peers=60)  # a short job: start together
    with tempfile.TemporaryDirectory() as output_dir:
        training = TrainingArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=1e-3,
            seed=index,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=Sequences(2000, seed=100 + index),  # this node's own examples
            callbacks=[gossip],
        )
        trainer.train()

    test = Sequences(400, seed=7)
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=test.ids).logits.argmax(1)
    accuracy = (predicted == test.labels).float().mean().item()
    stats = gossip.stats  # the node's counters when training closed it
    print(
        f"{name} step {trainer.state.global_step} loss {gossip.loss:.3f} "
        f"test accuracy {accuracy:.1%} pulls ok {stats['pulls_ok']} failed {stats['pulls_failed']}",
        flush=True,
    )
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        np.savez(
            args.save / f"{name}.npz", start=start, final=_vector(model), pulls_ok=stats["pulls_ok"]
        )


if __name__ == "__main__":
    main()
