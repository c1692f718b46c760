"""DpwaCallback: gossip every optimizer step of a real PyTorch Lightning Trainer.fit."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import cluster

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

from dpwa_torch.lightning import DpwaCallback  # noqa: E402
from dpwa_torch.optimizer import _batch_size  # noqa: E402

from dpwa_core.errors import ConfigError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from integration_pair import assert_gossiped, run_pair  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "lightning_digits" / "train.py"


class _Tiny(L.LightningModule):  # type: ignore[misc]
    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.as_dict = as_dict

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y) + 10.0  # a loss to recognize
        return {"loss": loss} if self.as_dict else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class _Recording(DpwaCallback):
    """Keeps what the handle held just before the fit closed it."""

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        assert self.gossip is not None
        self.seen = {"optimizer": self.gossip.optimizer, "model": self.gossip.state}
        super().on_fit_end(trainer, pl_module)


def _fit(callback: DpwaCallback, module: Any, steps: int, **trainer_options: Any) -> Any:
    x = torch.randn(48, 4)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        **trainer_options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=6))
    return trainer


@pytest.mark.parametrize("as_dict", [False, True])
def test_one_gossip_step_per_optimizer_step(as_dict: bool) -> None:
    callback = _Recording(cluster(2, timeout_ms=200), "w1")  # w2 never starts
    module = _Tiny(as_dict)
    trainer = _fit(callback, module, 5, accumulate_grad_batches=2)
    assert trainer.global_step == 5
    stats = callback.stats
    assert stats["steps"] == 5  # one gossip step per optimizer step, not per batch
    assert stats["samples"] == 5 * 2 * 6  # the batches of each step, 6 samples each
    assert callback.loss > 10.0  # training_step's loss, from a tensor or a dict
    assert callback.gossip is None  # closed at fit end
    assert isinstance(callback.seen["optimizer"], torch.optim.Adam)  # carried at catch-up
    assert callback.seen["model"] is module


def test_samples_per_batch_overrides_the_batch_size() -> None:
    callback = DpwaCallback(cluster(2, timeout_ms=200), "w1", samples_per_batch=1)
    _fit(callback, _Tiny(), 3)
    assert callback.stats["samples"] == 3


def test_refuses_a_multi_process_trainer() -> None:
    callback = DpwaCallback(cluster(2), "w1")
    with pytest.raises(ConfigError, match="one Trainer process"):
        callback.on_fit_start(SimpleNamespace(world_size=2), _Tiny())
    with pytest.raises(ValueError, match="samples_per_batch"):
        DpwaCallback(cluster(2), "w1", samples_per_batch=0)


def test_batch_size_of_common_batch_shapes() -> None:
    x = torch.zeros(7, 3)
    assert _batch_size(x) == 7
    assert _batch_size((x, torch.zeros(7))) == 7
    assert _batch_size({"input": x, "label": torch.zeros(7)}) == 7
    assert _batch_size([{"input": x}]) == 7
    assert _batch_size("text") == 1


def test_example_two_trainer_fits_gossip(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    saved, outputs = run_pair(EXAMPLE, cluster(2), tmp_path, "--steps", "120")
    assert_gossiped(saved)
    for name, out in outputs.items():
        assert f"{name} step 120 " in out, out
