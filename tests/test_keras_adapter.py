"""The Keras adapter and its callback, on real Keras 3 models (TensorFlow backend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
layers = keras.layers

from dpwa_tensorflow import GossipCallback, KerasAdapter  # noqa: E402

import dpwa_core  # noqa: E402
from dpwa_core.adapters import detect_adapter, get_adapter  # noqa: E402
from dpwa_core.errors import AdapterError  # noqa: E402


@pytest.fixture
def adapter() -> KerasAdapter:
    found = get_adapter("tensorflow")
    assert isinstance(found, KerasAdapter)
    return found


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(0)


def mlp(dtype: str | None = None) -> Any:
    return keras.Sequential(
        [keras.Input((5,)), layers.Dense(8, activation="relu", dtype=dtype), layers.Dense(3)]
    )


def everything() -> Any:
    """Conv2D, BatchNorm, Dropout (a seed variable), LayerNorm and Dense in one model."""
    return keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            layers.Conv2D(4, 3),
            layers.BatchNormalization(),
            layers.Dropout(0.5),
            layers.GlobalAveragePooling2D(),
            layers.LayerNormalization(),
            layers.Dense(2),
        ]
    )


EVERYTHING_SHAPES = (
    (3, 3, 3, 4),  # conv kernel, HWIO
    (4,),  # conv bias
    (4,),  # gamma
    (4,),  # beta
    (4,),  # moving_mean
    (4,),  # moving_variance (the Dropout's int64 seed state is left out)
    (4,),  # layer norm gamma
    (4,),  # layer norm beta
    (4, 2),  # dense kernel, (in, out)
    (2,),  # dense bias
)


def reference_flat(model: Any) -> np.ndarray:
    """What the buffer must hold, built independently of the adapter."""
    parts = [
        np.asarray(w.numpy(), np.float64).ravel() for w in model.weights if "float" in str(w.dtype)
    ]
    return np.concatenate(parts).astype(np.float32)


def snapshot(model: Any) -> list[np.ndarray]:
    return [np.array(w.numpy()) for w in model.weights]


def random_flat(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(size).astype(np.float32)


# --- layout ------------------------------------------------------------------------------------


def test_layout_covers_every_float_weight_in_creation_order(adapter: KerasAdapter) -> None:
    model = everything()
    assert any("seed" in v.path for v in model.variables)  # there is an integer variable
    assert adapter.layout(model).shapes == EVERYTHING_SHAPES
    flat = adapter.to_flat(model)
    assert flat.dtype == np.float32 and flat.ndim == 1
    np.testing.assert_array_equal(flat, reference_flat(model))
    bn = model.layers[1]
    np.testing.assert_array_equal(flat[120:124], bn.moving_mean.numpy())
    np.testing.assert_array_equal(flat[124:128], bn.moving_variance.numpy())


def test_embedding_and_order_beyond_ten_layers(adapter: KerasAdapter) -> None:
    model = keras.Sequential(
        [keras.Input((3,), dtype="int32"), layers.Embedding(7, 4), layers.Flatten()]
        + [layers.Dense(width) for width in range(2, 14)]
    )
    widths = [12] + list(range(2, 14))
    expected = [(7, 4)]
    for a, b in zip(widths, widths[1:], strict=False):
        expected += [(a, b), (b,)]
    assert adapter.layout(model).shapes == tuple(expected)
    paths = [w.path for w in model.weights]
    assert sorted(paths) != paths


def test_shared_layer_is_stored_once(adapter: KerasAdapter) -> None:
    shared = layers.Dense(4)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, shared(shared(inputs)))
    assert adapter.layout(model).shapes == ((4, 4), (4,))


def test_unbuilt_model_and_other_objects_are_refused(adapter: KerasAdapter) -> None:
    with pytest.raises(AdapterError, match="build it first"):
        adapter.layout(keras.Sequential([layers.Dense(2)]))
    with pytest.raises(AdapterError, match="keras.Model"):
        adapter.to_flat([1.0])
    assert adapter.handles(mlp())
    assert adapter.handles(layers.Dense(2))
    assert not adapter.handles({"w": 1.0})


# --- round trips and interpolation --------------------------------------------------------------


@pytest.mark.parametrize("build", [mlp, everything])
def test_round_trip_sets_exactly_the_given_values(
    adapter: KerasAdapter, build: Callable[[], Any]
) -> None:
    model = build()
    size = adapter.layout(model).size
    new = random_flat(size)
    assert adapter.from_flat(model, new) is model
    np.testing.assert_array_equal(adapter.to_flat(model), new)
    np.testing.assert_array_equal(reference_flat(model), new)
    # from_flat copies: changing the vector afterwards does not reach the model.
    kept = new.copy()
    new += 1
    np.testing.assert_array_equal(adapter.to_flat(model), kept)


def test_out_buffer_is_filled_in_place(adapter: KerasAdapter) -> None:
    model = everything()
    frame = np.zeros(adapter.layout(model).size + 4, np.float32)
    result = adapter.to_flat(model, out=frame[4:])
    assert np.shares_memory(result, frame)
    np.testing.assert_array_equal(frame[4:], reference_flat(model))
    for out in (np.zeros(3, np.float32), np.zeros(frame.size - 4, np.float64)):
        with pytest.raises(AdapterError):
            adapter.to_flat(model, out=out)


@pytest.mark.parametrize("factor", [0.0, 0.25, 1.0])
def test_interpolate_matches_numpy(adapter: KerasAdapter, factor: float) -> None:
    model = everything()
    local = adapter.to_flat(model)
    peer = random_flat(local.size, seed=3)
    assert adapter.interpolate(model, peer, factor) is model
    result = adapter.to_flat(model)
    if factor in (0.0, 1.0):
        np.testing.assert_array_equal(result, local if factor == 0.0 else peer)
    else:
        expected = (1 - factor) * local.astype(np.float64) + factor * peer
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [("float16", 1e-3), ("bfloat16", 8e-3), ("float64", 1e-7)]
)
def test_other_float_dtypes_round_trip(adapter: KerasAdapter, dtype: str, rtol: float) -> None:
    model = mlp(dtype)
    assert str(model.layers[0].kernel.dtype) == dtype
    new = random_flat(adapter.layout(model).size)
    adapter.from_flat(model, new)
    assert str(model.layers[0].kernel.dtype) == dtype
    np.testing.assert_allclose(adapter.to_flat(model), new, rtol=rtol, atol=1e-6)
    peer = random_flat(new.size, seed=2)
    start = adapter.to_flat(model)
    adapter.interpolate(model, peer, 0.5)
    np.testing.assert_allclose(
        adapter.to_flat(model), 0.5 * start + 0.5 * peer, rtol=rtol, atol=rtol
    )


def test_model_still_trains_after_from_flat(adapter: KerasAdapter) -> None:
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 5)), rng.standard_normal((32, 3))
    model.train_on_batch(x, y)
    adapter.from_flat(model, random_flat(adapter.layout(model).size) * 0.1)
    first = float(model.train_on_batch(x, y))
    for _ in range(20):
        last = float(model.train_on_batch(x, y))
    assert last < first


# --- validation ---------------------------------------------------------------------------------


def test_bad_input_raises_and_leaves_model_unchanged(adapter: KerasAdapter) -> None:
    model = everything()
    before = snapshot(model)
    size = adapter.layout(model).size
    bad = [
        np.zeros(size - 1, np.float32),
        np.zeros(size, np.float64),
        np.zeros((1, size), np.float32),
        [0.0] * size,
    ]
    for flat in bad:
        with pytest.raises(AdapterError):
            adapter.from_flat(model, flat)  # type: ignore[arg-type]
        with pytest.raises(AdapterError):
            adapter.interpolate(model, flat, 0.5)  # type: ignore[arg-type]
    for factor in (float("nan"), -0.5, 1.5):
        with pytest.raises(AdapterError, match="factor"):
            adapter.interpolate(model, random_flat(size), factor)
    for old, new in zip(before, snapshot(model), strict=True):
        np.testing.assert_array_equal(old, new)


# --- registry and connect -----------------------------------------------------------------------


def test_all_names_give_the_same_instance_and_detection_finds_it() -> None:
    adapter = get_adapter("tensorflow")
    assert get_adapter("tf") is adapter and get_adapter("Keras") is adapter
    assert detect_adapter(mlp()) is adapter
    assert detect_adapter(layers.Dense(3)) is adapter


# --- the callback ------------------------------------------------------------------------------


class RecordingGossip:
    """Stands in for a Gossip handle to check what the callback reports, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def step(self, loss: float, samples: int = 1) -> None:
        self.calls.append(("step", loss, samples))


def test_callback_recovers_batch_losses_from_running_means() -> None:
    gossip = RecordingGossip()
    callback = GossipCallback(gossip, samples_per_batch=8, initial_loss=9.0)
    for epoch_losses in ([4.0, 2.0, 3.0], [1.0, 0.5]):
        callback.on_epoch_begin(0)
        total = 0.0
        for batch, loss in enumerate(epoch_losses):
            callback.on_train_batch_begin(batch)
            total += loss
            callback.on_train_batch_end(batch, {"loss": total / (batch + 1)})
    callback.on_train_batch_end(2, {})  # logs without a loss: the last batch's loss again
    # One gossip step after each batch, with that batch's own loss and the batch's samples.
    assert [kind for kind, _, _ in gossip.calls] == ["step"] * 6
    assert [loss for _, loss, _ in gossip.calls] == pytest.approx([4.0, 2.0, 3.0, 1.0, 0.5, 0.5])
    assert {samples for _, _, samples in gossip.calls} == {8}
    with pytest.raises(ValueError, match="samples_per_batch"):
        GossipCallback(gossip, samples_per_batch=0)


@pytest.mark.parametrize("blocking", [False, True])
def test_fit_with_the_callback_averages_with_a_peer(
    make_cluster: Callable[..., dict[str, Any]], blocking: bool
) -> None:
    """Two Keras nodes on loopback: w1 trains with the callback, w2 only publishes."""
    config = make_cluster(2, timeout_ms=2000, blocking=blocking)
    trainer, peer = mlp(), mlp()
    adapter = get_adapter("keras")
    adapter.from_flat(peer, np.zeros(adapter.layout(peer).size, np.float32))
    trainer.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 5)), rng.standard_normal((64, 3))
    with (
        dpwa_core.connect(trainer, config, "w1") as gossip,
        dpwa_core.connect(peer, config, "w2") as other,
    ):
        assert gossip.adapter is adapter
        other.update_send(1.0)
        start = np.linalg.norm(adapter.to_flat(trainer))
        history = trainer.fit(
            x, y, batch_size=8, epochs=2, verbose=0, callbacks=[gossip.callback()]
        )
        stats = gossip.node.stats()
    if blocking:
        # 16 batches, one pull each at most (the peer may answer late while starting up).
        assert 8 <= stats["pulls_ok"] <= 16, stats
        # Averaging with an all-zero peer (factor 0.5) shrinks the weights far below training's
        # pace.
        assert np.linalg.norm(adapter.to_flat(trainer)) < start / 10
    else:
        # A pull is blended at the first batch after it lands: at most one per batch, and
        # each halves the weights (training at lr 0.01 moves them far less).
        assert 1 <= stats["pulls_ok"] <= 16, stats
        assert np.linalg.norm(adapter.to_flat(trainer)) < start * 0.75
        assert stats["blocked_s"] == 0.0, stats
    assert len(history.history["loss"]) == 2
