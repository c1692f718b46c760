"""The JAX adapter, on real jax arrays and flax.linen models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
fnn = pytest.importorskip("flax.linen")
jnp = jax.numpy

from dpwa_jax import JaxAdapter, remember_order  # noqa: E402

import dpwa_core  # noqa: E402
from dpwa_core.adapters import detect_adapter, get_adapter  # noqa: E402
from dpwa_core.errors import AdapterError  # noqa: E402


@pytest.fixture
def adapter() -> JaxAdapter:
    found = get_adapter("jax")
    assert isinstance(found, JaxAdapter)
    return found


class MLP(fnn.Module):
    hidden: int = 8

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        x = fnn.relu(fnn.Dense(self.hidden)(x))
        return fnn.Dense(3)(x)


class ConvBN(fnn.Module):
    @fnn.compact
    def __call__(self, x: Any) -> Any:
        x = fnn.Conv(4, (3, 3))(x)
        x = fnn.BatchNorm(use_running_average=True)(x)
        return fnn.Dense(2)(x.mean(axis=(1, 2)))


CONV_BN_SHAPES = (
    (3, 3, 3, 4),  # Conv_0 kernel (HWIO)
    (4,),  # Conv_0 bias
    (4,),  # BatchNorm_0 scale (params)
    (4,),  # BatchNorm_0 bias (params)
    (4,),  # BatchNorm_0 mean (batch_stats)
    (4,),  # BatchNorm_0 var (batch_stats)
    (4, 2),  # Dense_0 kernel
    (2,),  # Dense_0 bias
)


def mlp_variables(seed: int = 0, hidden: int = 8) -> Any:
    return MLP(hidden).init(jax.random.key(seed), jnp.ones((1, 5)))


def conv_bn_variables(seed: int = 0) -> Any:
    return ConvBN().init(jax.random.key(seed), jnp.ones((1, 5, 5, 3)))


def random_flat(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(size).astype(np.float32)


def leaves_equal(a: Any, b: Any) -> bool:
    return bool(
        jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool((x == y).all()), a, b))
    )


# --- layout ------------------------------------------------------------------------------------


def test_flax_mlp_layout_and_values(adapter: JaxAdapter) -> None:
    variables = mlp_variables()
    assert adapter.layout(variables).shapes == ((5, 8), (8,), (8, 3), (3,))
    flat = adapter.to_flat(variables)
    params = variables["params"]
    expected = np.concatenate(
        [
            np.asarray(params[name][leaf]).ravel()
            for name in ("Dense_0", "Dense_1")
            for leaf in ("kernel", "bias")
        ]
    )
    np.testing.assert_array_equal(flat, expected)


def test_batch_stats_are_merged_per_module(adapter: JaxAdapter) -> None:
    variables = conv_bn_variables()
    assert list(variables) == ["params", "batch_stats"]
    assert adapter.layout(variables).shapes == CONV_BN_SHAPES
    variables["batch_stats"]["BatchNorm_0"]["mean"] = jnp.arange(4.0)
    variables["batch_stats"]["BatchNorm_0"]["var"] = jnp.arange(4.0) + 10
    flat = adapter.to_flat(variables)
    np.testing.assert_array_equal(flat[120:124], [0, 1, 2, 3])
    np.testing.assert_array_equal(flat[124:128], [10, 11, 12, 13])
    # The bare params dict is a plain pytree: BatchNorm's statistics are simply not in it.
    assert adapter.layout(variables["params"]).size == adapter.layout(variables).size - 8


def test_other_collections_and_integer_leaves_stay_out_untouched(adapter: JaxAdapter) -> None:
    variables = dict(mlp_variables())
    variables["cache"] = {"seen": jnp.ones(5)}
    state = {"model": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "step": jnp.array(7)}
    assert adapter.layout(variables).size == 75
    assert adapter.layout(state).shapes == ((2, 3), (3,))
    new_variables = adapter.from_flat(variables, random_flat(75))
    assert new_variables["cache"]["seen"] is variables["cache"]["seen"]
    new_state = adapter.from_flat(state, np.arange(9, dtype=np.float32))
    assert new_state["step"] is state["step"]
    np.testing.assert_array_equal(new_state["model"]["b"], [6, 7, 8])


def test_plain_pytrees_use_insertion_and_list_order(adapter: JaxAdapter) -> None:
    tree = {"zeta": jnp.ones((2, 1)), "alpha": [jnp.ones(3), (jnp.ones(4), None)]}
    assert adapter.layout(tree).shapes == ((2, 1), (3,), (4,))
    assert adapter.layout(jnp.ones((2, 5))).shapes == ((2, 5),)
    # A plain dict of 2-D arrays is taken as it is: (in, out) is the caller's business.
    assert adapter.layout({"w": jnp.ones((7, 2))}).shapes == ((7, 2),)


class Pair(NamedTuple):
    first: Any
    second: Any


def test_containers_keep_their_types(adapter: JaxAdapter) -> None:
    from flax.core import FrozenDict

    tree = Pair(FrozenDict({"a": jnp.ones(2)}), (jnp.ones(1), [jnp.ones(3)]))
    new = adapter.from_flat(tree, np.arange(6, dtype=np.float32))
    assert isinstance(new, Pair) and isinstance(new.first, FrozenDict)
    assert isinstance(new.second, tuple) and isinstance(new.second[1], list)
    np.testing.assert_array_equal(new.second[1][0], [3, 4, 5])
    single = adapter.from_flat(jnp.ones(3), np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(single, [0, 1, 2])


# --- creation order -----------------------------------------------------------------------------


class Deep(fnn.Module):
    widths: tuple[int, ...]

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        for width in self.widths:
            x = fnn.Dense(width)(x)
        return x


def _expected(inputs: int, widths: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    shapes: list[tuple[int, ...]] = []
    for a, b in zip((inputs, *widths), widths, strict=False):
        shapes += [(a, b), (b,)]
    return tuple(shapes)


def test_order_survives_jax_tree_operations(adapter: JaxAdapter) -> None:
    widths = (4,) * 11 + (2,)
    variables = Deep(widths).init(jax.random.key(0), jnp.ones((1, 3)))
    flat = adapter.to_flat(variables)
    assert adapter.layout(variables).shapes == _expected(3, widths)
    # tree_map rebuilds dicts in sorted order: Dense_10 before Dense_2, bias before kernel.
    mapped = jax.tree_util.tree_map(lambda leaf: leaf, variables)
    assert list(mapped["params"])[:3] == ["Dense_0", "Dense_1", "Dense_10"]
    assert list(mapped["params"]["Dense_0"]) == ["bias", "kernel"]
    np.testing.assert_array_equal(adapter.to_flat(mapped), flat)


def test_a_sorted_tree_seen_first_gets_creation_order_for_generated_names(
    adapter: JaxAdapter,
) -> None:
    widths = (5,) * 10 + (3, 2)  # a structure no other test uses
    variables = Deep(widths).init(jax.random.key(1), jnp.ones((1, 6)))
    sorted_first = jax.tree_util.tree_map(lambda leaf: leaf, variables)
    assert adapter.layout(sorted_first).shapes == _expected(6, widths)
    np.testing.assert_array_equal(adapter.to_flat(sorted_first), adapter.to_flat(variables))


def test_remember_order_fixes_the_order_from_an_abstract_template(adapter: JaxAdapter) -> None:
    class Mixed(fnn.Module):
        @fnn.compact
        def __call__(self, x: Any) -> Any:
            x = fnn.Dense(6)(x)  # Dense_0 is created before Conv_0 ...
            x = fnn.Conv(2, (1,))(x[..., None])
            return x

    model = Mixed()
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    restored = jax.tree_util.tree_map(lambda leaf: leaf, variables)  # ... but sorts after it
    assert list(restored["params"]) == ["Conv_0", "Dense_0"]
    # jax.eval_shape(model.init, ...) would sort too; remember_order reads inside the trace.
    remember_order(model, jax.random.key(0), jnp.ones((1, 3)))
    assert adapter.layout(restored).shapes == ((3, 6), (6,), (1, 1, 2), (2,))
    # A tree in creation order works as well (this one has other shapes: a new structure).
    other = model.init(jax.random.key(0), jnp.ones((1, 4)))
    remember_order(other)
    assert adapter.layout(jax.tree_util.tree_map(lambda leaf: leaf, other)).shapes[0] == (4, 6)
    with pytest.raises(AdapterError, match="floating-point"):
        remember_order({"step": jnp.array(1)})


# --- values, dtypes, devices --------------------------------------------------------------------


def test_from_flat_returns_a_new_tree_and_copies_the_vector(adapter: JaxAdapter) -> None:
    variables = conv_bn_variables()
    original = jax.tree_util.tree_map(np.array, variables)
    new_flat = random_flat(adapter.layout(variables).size)
    kept = new_flat.copy()
    new = adapter.from_flat(variables, new_flat)
    assert new is not variables and new["params"] is not variables["params"]
    assert leaves_equal(variables, original)  # the input is untouched
    new_flat[:] = 0  # e.g. the puller's buffer, reused for the next pull
    np.testing.assert_array_equal(adapter.to_flat(new), kept)
    assert list(new["params"]) == list(variables["params"])


@pytest.mark.parametrize("factor", [0.0, 0.25, 1.0])
def test_interpolate_matches_numpy(adapter: JaxAdapter, factor: float) -> None:
    variables = conv_bn_variables()
    local = adapter.to_flat(variables)
    peer = random_flat(local.size, seed=3)
    blended = adapter.interpolate(variables, peer, factor)
    result = adapter.to_flat(blended)
    if factor in (0.0, 1.0):
        np.testing.assert_array_equal(result, local if factor == 0.0 else peer)
    else:
        expected = (1 - factor) * local.astype(np.float64) + factor * peer
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(adapter.to_flat(variables), local)


@pytest.mark.parametrize(("dtype", "rtol"), [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_low_precision_leaves_keep_their_dtype(
    adapter: JaxAdapter, dtype: str, rtol: float
) -> None:
    tree = {"w": jnp.ones((3, 4), dtype), "b": jnp.zeros(4, dtype)}
    new = adapter.from_flat(tree, random_flat(16))
    assert all(str(leaf.dtype) == dtype for leaf in jax.tree_util.tree_leaves(new))
    np.testing.assert_allclose(adapter.to_flat(new), random_flat(16), rtol=rtol, atol=1e-6)
    peer = random_flat(16, seed=2)
    blended = adapter.interpolate(new, peer, 0.5)
    assert all(str(leaf.dtype) == dtype for leaf in jax.tree_util.tree_leaves(blended))
    np.testing.assert_allclose(
        adapter.to_flat(blended), 0.5 * adapter.to_flat(new) + 0.5 * peer, rtol=rtol, atol=rtol
    )


def test_leaves_stay_on_their_device(adapter: JaxAdapter) -> None:
    device = jax.devices()[-1]
    tree = {"w": jax.device_put(jnp.ones((2, 2)), device)}
    for new in (
        adapter.from_flat(tree, random_flat(4)),
        adapter.interpolate(tree, random_flat(4), 0.5),
    ):
        assert new["w"].devices() == {device}
        assert new["w"].sharding == tree["w"].sharding


def test_flax_model_runs_with_the_new_tree(adapter: JaxAdapter) -> None:
    source, target = mlp_variables(1), mlp_variables(2)
    x = jnp.ones((2, 5))
    assert not np.allclose(MLP().apply(source, x), MLP().apply(target, x))
    target = adapter.from_flat(target, adapter.to_flat(source))
    np.testing.assert_array_equal(MLP().apply(source, x), MLP().apply(target, x))


# --- validation ---------------------------------------------------------------------------------


def test_bad_input_is_refused(adapter: JaxAdapter) -> None:
    variables = mlp_variables()
    with pytest.raises(AdapterError, match="flat has 10 elements but the model has 75"):
        adapter.from_flat(variables, np.zeros(10, np.float32))
    with pytest.raises(AdapterError, match="float32"):
        adapter.from_flat(variables, np.zeros(75))
    with pytest.raises(AdapterError, match="peer"):
        adapter.interpolate(variables, np.zeros(74, np.float32), 0.5)
    with pytest.raises(AdapterError, match="factor"):
        adapter.interpolate(variables, np.zeros(75, np.float32), 1.5)
    with pytest.raises(AdapterError, match="out"):
        adapter.to_flat(variables, out=np.zeros(75, np.float64))
    with pytest.raises(AdapterError, match="w/0 holds a numpy.ndarray"):
        adapter.layout({"w": [np.ones(3)]})


def test_handles_and_detection() -> None:
    adapter = get_adapter("jax")
    assert get_adapter("flax") is adapter
    assert adapter.handles(mlp_variables())
    assert adapter.handles([jnp.ones(2)])
    assert not adapter.handles({"w": np.ones(2)})
    assert not adapter.handles({"step": jnp.array(1)})  # nothing to average
    assert not adapter.handles({})
    assert detect_adapter(mlp_variables()) is adapter
    assert detect_adapter({"w": jnp.ones(2)}) is adapter
    with pytest.raises(AdapterError):
        detect_adapter({"w": 1.0})


# --- the training-loop idiom --------------------------------------------------------------------


def test_update_wait_returns_the_new_params(make_cluster: Callable[..., dict[str, Any]]) -> None:
    config = make_cluster(2, timeout_ms=2000)
    adapter = get_adapter("jax")
    mine, theirs = mlp_variables(1), mlp_variables(2)
    with (
        dpwa_core.connect(mine, config, "w1") as gossip,
        dpwa_core.connect(theirs, config, "w2") as other,
    ):
        assert gossip.adapter is adapter
        other.update_send(1.0)
        target = adapter.to_flat(theirs)
        params = mine
        for _ in range(40):
            gossip.update_send(1.0, params)
            params = gossip.update_wait(1.0, params)
        assert gossip.node.stats()["pulls_ok"] >= 10
    assert params is gossip.state
    # Repeated averaging with a fixed peer converges to it.
    np.testing.assert_allclose(adapter.to_flat(params), target, atol=1e-3)
    with pytest.raises(AdapterError, match="no training callback"):
        gossip.callback()
