"""DpwaTrainerCallback: gossip every optimizer step of a real Hugging Face Trainer."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import cluster

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from dpwa_torch.transformers import DpwaTrainerCallback  # noqa: E402

from dpwa_core.errors import ConfigError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from integration_pair import assert_gossiped, run_pair  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "transformers_tiny" / "train.py"


def _model() -> Any:
    config = transformers.BertConfig(
        vocab_size=16,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


class _Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, count: int) -> None:
        self.ids = torch.randint(0, 16, (count, 6), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": (self.ids[i] == 3).any().long()}


class _NoLossInOutput(transformers.Trainer):  # type: ignore[misc]
    """A compute_loss that takes the labels away from the model: its output holds no loss."""

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kw: Any
    ) -> Any:
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels) + 10.0
        return (loss, outputs) if return_outputs else loss


class _Recording(DpwaTrainerCallback):
    """Keeps what the handle held just before training closed it, and every reported loss."""

    reported: list[float]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_step_end(args, state, control, **kwargs)
        self.reported = [*getattr(self, "reported", []), self.loss]

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.gossip is not None
        self.seen = {"optimizer": self.gossip.optimizer, "model": self.gossip.state}
        super().on_train_end(args, state, control, **kwargs)


def _train(
    callback: DpwaTrainerCallback,
    tmp_path: Path,
    steps: int,
    trainer_class: Any = None,
    **options: Any,
) -> Any:
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **options,
    )
    trainer = (trainer_class or transformers.Trainer)(
        model=model, args=args, train_dataset=_Rows(40), callbacks=[callback]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, model


def test_one_gossip_step_per_optimizer_step(tmp_path: Path) -> None:
    callback = _Recording(cluster(2, timeout_ms=200), "w1")  # w2 never starts
    trainer, model = _train(
        callback, tmp_path, 4, gradient_accumulation_steps=2, logging_strategy="no"
    )
    assert trainer.state.global_step == 4
    assert callback.stats["steps"] == 4  # once per optimizer step, not per micro-batch
    assert callback.stats["samples"] == 4 * 2 * 4  # the rows of each step's micro-batches
    assert len(callback.reported) == 4 and 1.0 not in callback.reported  # the model's losses
    assert all(0.0 < loss < 5.0 for loss in callback.reported)
    assert callback.seen["model"] is model
    assert isinstance(callback.seen["optimizer"], torch.optim.AdamW)  # unwrapped from accelerate
    assert callback.gossip is None and callback._hook is None  # closed, hook removed


def test_a_model_output_without_loss_reports_the_logged_loss(tmp_path: Path) -> None:
    callback = _Recording(cluster(2, timeout_ms=200), "w1", samples_per_step=5)
    trainer, _ = _train(callback, tmp_path, 3, trainer_class=_NoLossInOutput, logging_steps=1)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # on_log follows on_step_end: step 1 has only the initial loss, then each step the last log
    assert callback.reported[0] == 1.0
    assert callback.reported[1:] == pytest.approx(logged[: len(callback.reported) - 1])
    assert min(callback.reported[1:]) > 10.0  # compute_loss's loss, not the model's
    assert callback.stats["samples"] == 3 * 5  # samples_per_step


def test_refuses_distributed_arguments() -> None:
    callback = DpwaTrainerCallback(cluster(2), "w1")
    with pytest.raises(ConfigError, match="one Trainer process"):
        callback.on_train_begin(SimpleNamespace(world_size=4), None, None, model=_model())
    with pytest.raises(ValueError, match="samples_per_step"):
        DpwaTrainerCallback(cluster(2), "w1", samples_per_step=0)


def test_example_two_trainers_gossip(tmp_path: Path) -> None:
    saved, outputs = run_pair(EXAMPLE, cluster(2), tmp_path, "--steps", "80")
    assert_gossiped(saved)
    for name, out in outputs.items():
        assert f"{name} step 80 " in out, out
