"""The demo's per-framework trainers: each learns the digits alone, and all share one layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")

from dpwa_core.adapters import get_adapter  # noqa: E402
from dpwa_demo.data import load_digits_data  # noqa: E402
from dpwa_demo.trainers import TRAINERS, make_trainer  # noqa: E402

NEEDS = {
    "torch": ("torch",),
    "tensorflow": ("keras", "tensorflow"),
    "jax": ("jax", "flax", "optax"),
}
SIZES = {"hidden": 16, "lr": 0.1}


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_digits_data(nodes=1)


def build(framework: str, digits: Any, seed: int = 0) -> Any:
    for module in NEEDS[framework]:
        pytest.importorskip(module)
    return make_trainer(framework, inputs=digits.inputs, classes=digits.classes, seed=seed, **SIZES)


def test_every_framework_has_a_trainer() -> None:
    assert set(NEEDS) <= set(TRAINERS)


@pytest.mark.parametrize("framework", ["tensorflow", "jax"])
def test_trainer_learns_alone(framework: str, digits: Any) -> None:
    trainer = build(framework, digits)
    assert trainer.framework == framework
    assert trainer.stats() is None  # not connected
    x, y = digits.shard(0)
    rng = np.random.default_rng(0)
    loss_before, accuracy_before = trainer.evaluate(x, y)
    losses = []
    for _ in range(40):
        rows = rng.integers(0, len(y), 32)
        losses.append(trainer.train_step(x[rows], y[rows]))
    loss_after, accuracy_after = trainer.evaluate(x, y)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert loss_after < loss_before * 0.7, (loss_before, loss_after)
    assert accuracy_after > max(accuracy_before, 0.5)
    trainer.close()  # a no-op when not connected


@pytest.mark.parametrize("framework", ["torch", "tensorflow", "jax"])
def test_warm_up_leaves_the_model_as_it_was(framework: str, digits: Any) -> None:
    trainer = build(framework, digits)
    x, y = digits.shard(0)
    before = trainer.flat()
    scores = trainer.evaluate(x, y)
    trainer.warm_up(x[:32], y[:32])
    np.testing.assert_array_equal(trainer.flat(), before)
    assert trainer.evaluate(x, y) == scores
    trainer.train_step(x[:32], y[:32])  # and training still moves it
    assert not np.array_equal(trainer.flat(), before)


@pytest.mark.parametrize("framework", ["tensorflow", "jax"])
def test_trainer_matches_the_torch_trainer(framework: str, digits: Any) -> None:
    """Same layout as TorchTrainer's, and with TorchTrainer's weights the same predictions."""
    reference = build("torch", digits)
    trainer = build(framework, digits)
    adapter = get_adapter(framework)
    state = trainer.params if framework == "jax" else trainer.model
    assert adapter.layout(state) == get_adapter("torch").layout(reference.model)
    flat = reference.flat()
    assert trainer.flat().shape == flat.shape
    assert not np.allclose(trainer.flat(), flat)
    if framework == "jax":
        trainer.params = adapter.from_flat(trainer.params, flat)
    else:
        adapter.from_flat(trainer.model, flat)
    np.testing.assert_array_equal(trainer.flat(), flat)
    x, y = digits.x_test, digits.y_test
    np.testing.assert_allclose(trainer.evaluate(x, y), reference.evaluate(x, y), rtol=1e-5)


def test_trainers_of_three_frameworks_gossip_in_one_cluster(
    digits: Any, make_cluster: Callable[..., dict[str, Any]]
) -> None:
    trainers = {
        name: build(fw, digits, seed)
        for seed, (name, fw) in enumerate([("w1", "torch"), ("w2", "tensorflow"), ("w3", "jax")])
    }
    config = make_cluster(3, timeout_ms=2000)
    x, y = digits.shard(0)
    try:
        for name, trainer in trainers.items():
            trainer.connect(config, name)
        for step in range(15):
            for trainer in trainers.values():
                trainer.train_step(x[step * 16 : step * 16 + 16], y[step * 16 : step * 16 + 16])
        stats = {name: trainer.stats() for name, trainer in trainers.items()}
    finally:
        for trainer in trainers.values():
            trainer.close()
    for name, node_stats in stats.items():
        assert node_stats is not None
        assert node_stats["pulls_ok"] >= 5, (name, node_stats)
        assert node_stats["rejected"] == 0, (name, node_stats)
