"""One architecture, three frameworks, one flat vector (docs/LAYOUT.md).

For each small architecture the same model is built in PyTorch, Keras and Flax. Each framework
in turn is the source: its weights (with non-trivial normalization statistics) go through
``to_flat`` and ``from_flat`` into the two others; then all three give the same flat vector and
the same outputs on the same input, to float32 rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
jax = pytest.importorskip("jax")
fnn = pytest.importorskip("flax.linen")
jnp = jax.numpy

import dpwa_core  # noqa: E402
from dpwa_core.adapters import get_adapter  # noqa: E402

tnn = torch.nn
layers = keras.layers
ATOL = 2e-5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    keras.utils.set_random_seed(0)


# --- the same architectures in each framework ---------------------------------------------------


class TorchNet(tnn.Module):
    """Runs ``body`` on channel-last input, like Keras and Flax."""

    def __init__(self, body: list[Any], image: bool = False) -> None:
        super().__init__()
        self.body = tnn.Sequential(*body)
        self.image = image

    def forward(self, x: Any) -> Any:
        if self.image:  # NHWC in, NCHW for torch's convolutions
            x = x.permute(0, 3, 1, 2)
        return self.body(x)


class GlobalMean(tnn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Any) -> Any:
        return x.mean(dim=self.dims)


@dataclass
class Arch:
    """Builders for one architecture in the three frameworks, and an input maker."""

    torch: Callable[[], Any]
    keras: Callable[[], Any]
    flax: Callable[[], Any]
    flax_input: Callable[[], Any]
    inputs: Callable[[np.random.Generator], np.ndarray]


class FlaxMLP(fnn.Module):
    @fnn.compact
    def __call__(self, x: Any) -> Any:
        hidden = fnn.relu(fnn.Dense(8)(x))
        return fnn.Dense(3)(hidden)


class FlaxCNN(fnn.Module):
    @fnn.compact
    def __call__(self, x: Any) -> Any:
        x = fnn.relu(fnn.Conv(4, (3, 3), padding="SAME")(x))
        x = fnn.relu(fnn.Conv(5, (3, 2), padding="VALID")(x))
        return fnn.Dense(2)(x.mean(axis=(1, 2)))


class FlaxLayerNorm(fnn.Module):
    @fnn.compact
    def __call__(self, x: Any) -> Any:
        x = fnn.LayerNorm(epsilon=1e-5)(fnn.Dense(8)(x))
        return fnn.Dense(3)(x)


class FlaxBatchNorm(fnn.Module):
    @fnn.compact
    def __call__(self, x: Any) -> Any:
        x = fnn.Dense(8)(x)
        x = fnn.BatchNorm(use_running_average=True, epsilon=1e-3, momentum=0.9)(x)
        return fnn.Dense(3)(fnn.relu(x))


class FlaxEmbed(fnn.Module):
    @fnn.compact
    def __call__(self, tokens: Any) -> Any:
        pooled = fnn.Embed(10, 4)(tokens).mean(axis=1)
        return fnn.Dense(3)(pooled)


def _features(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((4, 6)).astype(np.float32)


def _images(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((2, 6, 5, 3)).astype(np.float32)


def _tokens(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 10, (3, 7)).astype(np.int32)


ARCHS = {
    "mlp": Arch(
        torch=lambda: TorchNet([tnn.Linear(6, 8), tnn.ReLU(), tnn.Linear(8, 3)]),
        keras=lambda: keras.Sequential(
            [keras.Input((6,)), layers.Dense(8, activation="relu"), layers.Dense(3)]
        ),
        flax=FlaxMLP,
        flax_input=lambda: jnp.ones((1, 6)),
        inputs=_features,
    ),
    "cnn": Arch(
        torch=lambda: TorchNet(
            [
                tnn.Conv2d(3, 4, 3, padding=1),
                tnn.ReLU(),
                tnn.Conv2d(4, 5, (3, 2)),
                tnn.ReLU(),
                GlobalMean((2, 3)),
                tnn.Linear(5, 2),
            ],
            image=True,
        ),
        keras=lambda: keras.Sequential(
            [
                keras.Input((6, 5, 3)),
                layers.Conv2D(4, 3, padding="same", activation="relu"),
                layers.Conv2D(5, (3, 2), activation="relu"),
                layers.GlobalAveragePooling2D(),
                layers.Dense(2),
            ]
        ),
        flax=FlaxCNN,
        flax_input=lambda: jnp.ones((1, 6, 5, 3)),
        inputs=_images,
    ),
    "layernorm": Arch(
        torch=lambda: TorchNet([tnn.Linear(6, 8), tnn.LayerNorm(8, eps=1e-5), tnn.Linear(8, 3)]),
        keras=lambda: keras.Sequential(
            [
                keras.Input((6,)),
                layers.Dense(8),
                layers.LayerNormalization(epsilon=1e-5),
                layers.Dense(3),
            ]
        ),
        flax=FlaxLayerNorm,
        flax_input=lambda: jnp.ones((1, 6)),
        inputs=_features,
    ),
    "batchnorm": Arch(
        torch=lambda: TorchNet(
            [tnn.Linear(6, 8), tnn.BatchNorm1d(8, eps=1e-3), tnn.ReLU(), tnn.Linear(8, 3)]
        ),
        keras=lambda: keras.Sequential(
            [
                keras.Input((6,)),
                layers.Dense(8),
                layers.BatchNormalization(epsilon=1e-3),
                layers.ReLU(),
                layers.Dense(3),
            ]
        ),
        flax=FlaxBatchNorm,
        flax_input=lambda: jnp.ones((1, 6)),
        inputs=_features,
    ),
    "embedding": Arch(
        torch=lambda: TorchNet([tnn.Embedding(10, 4), GlobalMean((1,)), tnn.Linear(4, 3)]),
        keras=lambda: keras.Sequential(
            [
                keras.Input((7,), dtype="int32"),
                layers.Embedding(10, 4),
                layers.GlobalAveragePooling1D(),
                layers.Dense(3),
            ]
        ),
        flax=FlaxEmbed,
        flax_input=lambda: jnp.zeros((1, 7), jnp.int32),
        inputs=_tokens,
    ),
}


class Models:
    """One architecture built in all three frameworks, with helpers to run and convert them."""

    def __init__(self, arch: Arch, seed: int) -> None:
        self.arch = arch
        self.torch = arch.torch().eval()
        self.keras = arch.keras()
        self.flax = arch.flax()
        self.variables = self.flax.init(jax.random.key(seed), arch.flax_input())
        self.adapters = {name: get_adapter(name) for name in ("torch", "keras", "jax")}
        self._randomize_statistics(np.random.default_rng(seed))

    def state(self, framework: str) -> Any:
        return {"torch": self.torch, "keras": self.keras, "jax": self.variables}[framework]

    def to_flat(self, framework: str) -> np.ndarray:
        return self.adapters[framework].to_flat(self.state(framework))

    def from_flat(self, framework: str, flat: np.ndarray) -> None:
        result = self.adapters[framework].from_flat(self.state(framework), flat)
        if framework == "jax":
            self.variables = result

    def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            torch_out = self.torch(
                torch.from_numpy(x).long() if x.dtype == np.int32 else torch.from_numpy(x)
            ).numpy()
        return {
            "torch": torch_out,
            "keras": np.asarray(self.keras(x, training=False)),
            "jax": np.asarray(self.flax.apply(self.variables, jnp.asarray(x))),
        }

    def _randomize_statistics(self, rng: np.random.Generator) -> None:
        """Give every framework's normalization layers its own non-trivial statistics."""
        for module in self.torch.modules():
            if isinstance(module, tnn.BatchNorm1d):
                module.running_mean.copy_(torch.from_numpy(rng.normal(size=8).astype("f4")))
                module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, 8).astype("f4")))
            if isinstance(module, tnn.LayerNorm | tnn.BatchNorm1d):
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.normal_()
        for layer in self.keras.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.moving_mean.assign(rng.normal(size=8).astype("f4"))
                layer.moving_variance.assign(rng.uniform(0.5, 2, 8).astype("f4"))
            if isinstance(layer, layers.BatchNormalization | layers.LayerNormalization):
                layer.gamma.assign(rng.uniform(0.5, 1.5, 8).astype("f4"))
                layer.beta.assign(rng.normal(size=8).astype("f4"))
        stats = self.variables.get("batch_stats")
        if stats is not None:
            stats["BatchNorm_0"]["mean"] = jnp.asarray(rng.normal(size=8).astype("f4"))
            stats["BatchNorm_0"]["var"] = jnp.asarray(rng.uniform(0.5, 2, 8).astype("f4"))
        for name, module in self.variables["params"].items():
            if name.startswith(("BatchNorm", "LayerNorm")):
                module["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, 8).astype("f4"))
                module["bias"] = jnp.asarray(rng.normal(size=8).astype("f4"))


FRAMEWORKS = ("torch", "keras", "jax")


@pytest.mark.parametrize("name", list(ARCHS))
def test_same_architecture_has_the_same_layout(name: str) -> None:
    models = Models(ARCHS[name], seed=0)
    layouts = {fw: models.adapters[fw].layout(models.state(fw)) for fw in FRAMEWORKS}
    assert layouts["torch"] == layouts["keras"] == layouts["jax"], layouts
    assert len({layout.fingerprint for layout in layouts.values()}) == 1


@pytest.mark.parametrize("source", FRAMEWORKS)
@pytest.mark.parametrize("name", list(ARCHS))
def test_weights_move_between_frameworks_and_outputs_agree(name: str, source: str) -> None:
    models = Models(ARCHS[name], seed=1 + FRAMEWORKS.index(source))
    x = ARCHS[name].inputs(np.random.default_rng(7))
    before = models.outputs(x)
    flat = models.to_flat(source)
    others = [fw for fw in FRAMEWORKS if fw != source]
    # The three frameworks start with different weights: their outputs differ.
    for fw in others:
        assert not np.allclose(before[fw], before[source], atol=1e-3), fw
    for fw in others:
        models.from_flat(fw, flat)
    for fw in FRAMEWORKS:
        # Same weights, same numbers in the same order, in every framework.
        np.testing.assert_array_equal(models.to_flat(fw), flat, err_msg=fw)
    after = models.outputs(x)
    np.testing.assert_array_equal(after[source], before[source])
    for fw in others:
        np.testing.assert_allclose(after[fw], after[source], atol=ATOL, rtol=1e-5, err_msg=fw)


def test_dense_kernel_is_the_transpose_of_the_torch_weight() -> None:
    models = Models(ARCHS["mlp"], seed=3)
    flat = models.to_flat("torch")
    models.from_flat("keras", flat)
    models.from_flat("jax", flat)
    weight = models.torch.body[0].weight.detach().numpy()  # (out, in)
    np.testing.assert_array_equal(models.keras.layers[0].kernel.numpy(), weight.T)
    np.testing.assert_array_equal(
        np.asarray(models.variables["params"]["Dense_0"]["kernel"]), weight.T
    )


def test_creation_order_beats_name_order_with_twelve_layers() -> None:
    """Dense_10 sorts before Dense_2, dense_10 before dense_2: the layout must not care."""
    # Few distinct shapes keep jax's per-shape compilation short; the values tell layers apart.
    sizes = [3] + [4] * 11 + [2]
    torch_model = tnn.Sequential(
        *[tnn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)]
    )
    keras_model = keras.Sequential([keras.Input((3,))] + [layers.Dense(b) for b in sizes[1:]])

    class Deep(fnn.Module):
        @fnn.compact
        def __call__(self, x: Any) -> Any:
            for width in sizes[1:]:
                x = fnn.Dense(width)(x)
            return x

    deep = Deep()
    variables = deep.init(jax.random.key(0), jnp.ones((1, 3)))
    assert "Dense_10" in variables["params"]
    expected = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        expected += [(a, b), (b,)]
    adapters = {fw: get_adapter(fw) for fw in FRAMEWORKS}
    assert adapters["torch"].layout(torch_model).shapes == tuple(expected)
    assert adapters["keras"].layout(keras_model).shapes == tuple(expected)
    assert adapters["jax"].layout(variables).shapes == tuple(expected)
    names = [w.path for w in keras_model.weights]
    assert sorted(names) != names  # the names sort differently from creation order

    flat = adapters["torch"].to_flat(torch_model)
    adapters["keras"].from_flat(keras_model, flat)
    variables = adapters["jax"].from_flat(variables, flat)
    # A jax tree operation rebuilds every dict in sorted key order; the layout stays put.
    variables = jax.tree_util.tree_map(lambda leaf: leaf, variables)
    assert list(variables["params"])[:3] == ["Dense_0", "Dense_1", "Dense_10"]
    assert adapters["jax"].layout(variables).shapes == tuple(expected)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(keras_model(x)), reference, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(deep.apply(variables, x)), reference, atol=ATOL, rtol=1e-5
    )


def _pair_config(make_cluster: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return make_cluster(2, timeout_ms=2000)


def test_torch_and_jax_nodes_with_one_architecture_average(
    make_cluster: Callable[..., dict[str, Any]],
) -> None:
    models = Models(ARCHS["batchnorm"], seed=5)
    config = _pair_config(make_cluster)
    with (
        dpwa_core.connect(models.torch, config, "w1") as torch_node,
        dpwa_core.connect(models.variables, config, "w2") as jax_node,
    ):
        assert torch_node.node.layout == jax_node.node.layout
        torch_flat = models.to_flat("torch")
        jax_flat = models.to_flat("jax")
        torch_node.update_send(1.0)
        result = None
        for _ in range(50):  # until the pull lands (the peer may still be starting)
            jax_node.update_send(1.0)
            models.variables = jax_node.update_wait(1.0)
            result = jax_node.last
            if result is not None:
                break
        assert result is not None and result.peer == "w1"
        expected = (1 - result.factor) * jax_flat + result.factor * torch_flat
        np.testing.assert_allclose(models.to_flat("jax"), expected, rtol=1e-6, atol=1e-6)


def test_different_architectures_are_refused_showing_both_layouts(
    make_cluster: Callable[..., dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    torch_model = tnn.Sequential(tnn.Linear(6, 8), tnn.ReLU(), tnn.Linear(8, 3))
    jax_params = FlaxLayerNorm().init(jax.random.key(0), jnp.ones((1, 6)))  # a LayerNorm more
    caplog.set_level(logging.WARNING, logger="dpwa")
    config = _pair_config(make_cluster)
    with (
        dpwa_core.connect(torch_model, config, "w1") as torch_node,
        dpwa_core.connect(jax_params, config, "w2") as jax_node,
    ):
        torch_node.update_send(1.0)
        before = get_adapter("jax").to_flat(jax_params)
        deadline = 50
        while deadline and torch_node.node.stats()["rejected"] == 0:
            jax_node.update_send(1.0)
            jax_params = jax_node.update_wait(1.0)
            deadline -= 1
        assert torch_node.node.stats()["rejected"] >= 1
        assert jax_node.last is None
        np.testing.assert_array_equal(get_adapter("jax").to_flat(jax_params), before)
    text = caplog.text
    assert "layout mismatch" in text
    assert "[6x8, 8, 8x3, 3]" in text  # the torch node's layout, canonical shapes
    assert "[6x8, 8, 8, 8, 8x3, 3]" in text  # the jax node's
