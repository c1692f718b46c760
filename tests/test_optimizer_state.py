"""Optimizer state through the adapters: one flat float32 buffer with its own fingerprint.

Each framework's tests import it with ``pytest.importorskip``; every round trip trains the
optimizer for real first and compares every state tensor exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from dpwa_core.adapters import Adapter, get_adapter
from dpwa_core.errors import AdapterError
from dpwa_core.layout import Layout
from dpwa_core.optimizer_state import (
    MAX_EXACT_INTEGER,
    OptimizerLayout,
    check_integers,
    validate_optimizer_flat,
)

# ---------------------------------------------------------------------------------------------
# OptimizerLayout and the neutral helpers


def test_layout_size_hash_and_description() -> None:
    layout = OptimizerLayout("torch.optim.Adam", ["0.exp_avg", "0.step"], [(3, 2), ()])
    assert (layout.size, layout.nbytes) == (7, 28)
    assert layout.shapes == ((3, 2), ())
    assert layout.fingerprint == (7, layout.shape_hash)
    assert 0 <= layout.shape_hash < 2**64
    same = OptimizerLayout("torch.optim.Adam", ("0.exp_avg", "0.step"), ((3, 2), ()))
    assert same == layout and same.fingerprint == layout.fingerprint
    # The kind, the names and the shapes all count.
    others = [
        OptimizerLayout("torch.optim.AdamW", ("0.exp_avg", "0.step"), ((3, 2), ())),
        OptimizerLayout("torch.optim.Adam", ("0.exp_avg_sq", "0.step"), ((3, 2), ())),
        OptimizerLayout("torch.optim.Adam", ("0.exp_avg", "0.step"), ((2, 3), ())),
    ]
    assert len({layout.shape_hash, *(other.shape_hash for other in others)}) == 4
    # A model layout with the same shapes does not collide with it.
    assert layout.shape_hash != Layout([(3, 2), ()]).shape_hash
    text = layout.describe()
    assert "torch.optim.Adam" in text and "7 elements" in text
    assert "0.exp_avg:3x2" in text and "0.step:scalar" in text
    assert OptimizerLayout("optax", (), ()).size == 0


def test_layout_refuses_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="unique"):
        OptimizerLayout("k", ("a", "a"), ((1,), (2,)))
    with pytest.raises(ValueError, match="one name per shape"):
        OptimizerLayout("k", ("a",), ((1,), (2,)))
    with pytest.raises(ValueError, match="negative"):
        OptimizerLayout("k", ("a",), ((-1,),))
    with pytest.raises(ValueError, match="kind"):
        OptimizerLayout("", ("a",), ((1,),))


def test_shape_hash_is_the_same_in_another_process() -> None:
    layout = OptimizerLayout("keras.optimizers.Adam", ("iteration", "0.momentum"), ((), (4, 2)))
    code = (
        "from dpwa_core.optimizer_state import OptimizerLayout as L;"
        "print(L('keras.optimizers.Adam', ('iteration', '0.momentum'), ((), (4, 2))).shape_hash)"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert int(out.stdout) == layout.shape_hash


def test_validate_and_integer_checks() -> None:
    layout = OptimizerLayout("k", ("a", "b"), ((2,), ()))
    good = np.zeros(3, np.float32)
    assert validate_optimizer_flat(good, layout) is good
    bad: list[Any] = [
        [0.0, 0.0, 0.0],
        np.zeros(3, np.float64),
        np.zeros((3, 1), np.float32),
        np.zeros(4, np.float32),
        np.array([0, np.nan, 0], np.float32),
        np.array([0, 0, np.inf], np.float32),
    ]
    for flat in bad:
        with pytest.raises(AdapterError, match="optimizer state"):
            validate_optimizer_flat(flat, layout)
    check_integers(np.array([0.0, MAX_EXACT_INTEGER], np.float32), np.int64, "count")
    check_integers(np.array([0.5], np.float32), np.float32, "lr")  # floats pass
    for values, dtype in [
        (np.array([1.5], np.float32), np.int32),
        (np.array([MAX_EXACT_INTEGER + 2], np.float64), np.int64),
        (np.array([-1.0], np.float32), np.uint8),
        (np.array([300.0], np.float32), np.int8),
        (np.array([2.0], np.float32), np.bool_),
    ]:
        with pytest.raises(AdapterError, match="exactly"):
            check_integers(values, dtype, "count")


def test_base_adapter_does_not_carry_optimizer_state() -> None:
    class Bare(Adapter):
        framework_name = "builtins"

        def handles(self, state: object) -> bool:
            return isinstance(state, list)

        def layout(self, state: Any) -> Layout:
            return Layout.flat(len(state))

        def to_flat(self, state: Any, out: Any = None) -> Any:
            return np.asarray(state, np.float32)

        def from_flat(self, state: Any, flat: Any) -> Any:
            return state

    bare = Bare()
    with pytest.raises(AdapterError, match="builtins adapter does not carry optimizer state"):
        bare.optimizer_layout(object(), [1.0])
    with pytest.raises(AdapterError, match="does not carry optimizer state"):
        bare.optimizer_to_flat(object(), [1.0])
    with pytest.raises(AdapterError, match="does not carry optimizer state"):
        bare.optimizer_from_flat(object(), [1.0], np.zeros(0, np.float32))


# ---------------------------------------------------------------------------------------------
# PyTorch


def _torch_model(seed: int, hidden: int = 8) -> Any:
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
    )


def _torch_train(model: Any, optimizer: Any, steps: int, seed: int = 0) -> None:
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        y = torch.randn(16, 2, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _torch_state(optimizer: Any, model: Any) -> list[tuple[int, str, Any]]:
    """Every (parameter index, key, value clone) of the optimizer's state, in model order."""
    found = []
    for i, param in enumerate(model.parameters()):
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            clone = value.detach().clone() if hasattr(value, "detach") else value
            found.append((i, key, clone))
    return found


def _assert_same_torch_state(a: list[Any], b: list[Any]) -> None:
    torch = pytest.importorskip("torch")
    assert [(i, k) for i, k, _ in a] == [(i, k) for i, k, _ in b]
    for (_, key, x), (_, _, y) in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x, y), key
        else:
            assert x == y, key


_TORCH_OPTIMIZERS = {
    "sgd_momentum": lambda torch, p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda torch, p: torch.optim.Adam(p, lr=1e-2),
    "adamw_amsgrad": lambda torch, p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "rmsprop": lambda torch, p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}


@pytest.mark.parametrize("name", sorted(_TORCH_OPTIMIZERS))
@pytest.mark.parametrize("flattened", [False, True], ids=["plain", "flattened"])
def test_torch_round_trip_is_bit_identical(name: str, flattened: bool) -> None:
    torch = pytest.importorskip("torch")
    adapter = get_adapter("torch")
    make = _TORCH_OPTIMIZERS[name]
    source, target = _torch_model(0), _torch_model(1)
    if flattened:  # what connect() does to CPU models; the Parameter objects stay the same
        adapter.prepare(source)
    source_opt = make(torch, source.parameters())
    target_opt = make(torch, target.parameters())
    if flattened:  # the optimizer made before flattening must work as well
        adapter.prepare(target)
    if flattened:
        from dpwa_torch import flat_buffer

        assert flat_buffer(source) is not None and flat_buffer(target) is not None
    _torch_train(source, source_opt, 5, seed=1)
    _torch_train(target, target_opt, 2, seed=2)

    layout = adapter.optimizer_layout(source_opt, source)
    assert layout == adapter.optimizer_layout(target_opt, target)
    assert layout.kind.startswith("torch.optim.")
    assert layout.size > 0
    if name.startswith("adam"):
        assert "0.step" in layout.names and layout.shapes[layout.names.index("0.step")] == ()

    before = _torch_state(source_opt, source)
    flat = adapter.optimizer_to_flat(source_opt, source)
    assert flat.dtype == np.float32 and flat.shape == (layout.size,)
    flat.setflags(write=False)  # as a buffer received from the network
    assert adapter.optimizer_from_flat(target_opt, target, flat) is target_opt
    _assert_same_torch_state(_torch_state(target_opt, target), before)
    _assert_same_torch_state(_torch_state(source_opt, source), before)  # source untouched
    # Both now take the same step from the same model.
    target.load_state_dict(source.state_dict())
    _torch_train(source, source_opt, 1, seed=3)
    _torch_train(target, target_opt, 1, seed=3)
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)


def test_torch_to_flat_fills_out_and_checks_it() -> None:
    torch = pytest.importorskip("torch")
    adapter = get_adapter("torch")
    model = _torch_model(0)
    optimizer = torch.optim.Adam(model.parameters())
    _torch_train(model, optimizer, 2)
    layout = adapter.optimizer_layout(optimizer, model)
    out = np.full(layout.size, -1.0, np.float32)
    assert adapter.optimizer_to_flat(optimizer, model, out=out) is out
    np.testing.assert_array_equal(out, adapter.optimizer_to_flat(optimizer, model))
    with pytest.raises(AdapterError, match="out must be"):
        adapter.optimizer_to_flat(optimizer, model, out=np.empty(layout.size + 1, np.float32))


def test_torch_fingerprints_differ_by_type_and_model() -> None:
    torch = pytest.importorskip("torch")
    adapter = get_adapter("torch")
    layouts = []
    for make, model in [
        (lambda p: torch.optim.Adam(p), _torch_model(0)),
        (lambda p: torch.optim.AdamW(p), _torch_model(0)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), _torch_model(0)),
        (lambda p: torch.optim.Adam(p), _torch_model(0, hidden=9)),
    ]:
        optimizer = make(model.parameters())
        _torch_train(model, optimizer, 1)
        layouts.append(adapter.optimizer_layout(optimizer, model))
    assert len({layout.fingerprint for layout in layouts}) == len(layouts)
    # Hyperparameters are not part of the layout: another learning rate, the same fingerprint.
    model = _torch_model(5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5, betas=(0.5, 0.6))
    _torch_train(model, optimizer, 1)
    assert adapter.optimizer_layout(optimizer, model).fingerprint == layouts[0].fingerprint


def test_torch_bad_buffers_change_nothing() -> None:
    torch = pytest.importorskip("torch")
    adapter = get_adapter("torch")
    model = _torch_model(0)
    optimizer = torch.optim.Adam(model.parameters())
    _torch_train(model, optimizer, 3)
    before = _torch_state(optimizer, model)
    size = adapter.optimizer_layout(optimizer, model).size
    nan = np.ones(size, np.float32)
    nan[-1] = np.nan
    bad: list[Any] = [
        np.ones(size - 1, np.float32),
        np.ones(size, np.float64),
        np.ones((size, 1), np.float32),
        nan,
        np.full(size, np.inf, np.float32),
        torch.ones(size),
    ]
    for flat in bad:
        with pytest.raises(AdapterError, match="optimizer state"):
            adapter.optimizer_from_flat(optimizer, model, flat)
        _assert_same_torch_state(_torch_state(optimizer, model), before)


def test_torch_counters_must_be_whole_numbers() -> None:
    torch = pytest.importorskip("torch")
    adapter = get_adapter("torch")
    model = _torch_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _torch_train(model, optimizer, 1)
    first = next(iter(model.parameters()))
    optimizer.state[first]["count"] = torch.tensor(7, dtype=torch.int64)  # an integer counter
    layout = adapter.optimizer_layout(optimizer, model)
    flat = adapter.optimizer_to_flat(optimizer, model)
    at = sum(int(np.prod(s)) for s in layout.shapes[: layout.names.index("0.count")])
    assert flat[at] == 7.0
    before = _torch_state(optimizer, model)
    flat[at] = 7.5
    with pytest.raises(AdapterError, match="exactly"):
        adapter.optimizer_from_flat(optimizer, model, flat)
    _assert_same_torch_state(_torch_state(optimizer, model), before)
    flat[at] = 9.0
    adapter.optimizer_from_flat(optimizer, model, flat)
    assert optimizer.state[first]["count"].dtype == torch.int64
    assert int(optimizer.state[first]["count"]) == 9
    optimizer.state[first]["count"].fill_(MAX_EXACT_INTEGER + 1)
    with pytest.raises(AdapterError, match="exactly"):
        adapter.optimizer_to_flat(optimizer, model)


def test_torch_keeps_dtypes() -> None:
    torch = pytest.importorskip("torch")
    adapter = get_adapter("torch")
    model = _torch_model(0).double()
    optimizer = torch.optim.Adam(model.parameters())
    _torch_train_double(model, optimizer)
    flat = adapter.optimizer_to_flat(optimizer, model)
    adapter.optimizer_from_flat(optimizer, model, flat)
    for _, key, value in _torch_state(optimizer, model):
        assert value.dtype == (torch.float32 if key == "step" else torch.float64), key
    np.testing.assert_array_equal(adapter.optimizer_to_flat(optimizer, model), flat)


def _torch_train_double(model: Any, optimizer: Any) -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 4, dtype=torch.float64)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def test_torch_unbuilt_stateless_and_foreign() -> None:
    torch = pytest.importorskip("torch")
    adapter = get_adapter("torch")
    model = _torch_model(0)
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(AdapterError, match=r"first optimizer\.step\(\)"):
        adapter.optimizer_layout(fresh, model)
    with pytest.raises(AdapterError, match="no state yet"):
        adapter.optimizer_to_flat(fresh, model)

    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert adapter.optimizer_layout(plain, model).size == 0  # before a step too
    _torch_train(model, plain, 2)
    layout = adapter.optimizer_layout(plain, model)
    assert layout.size == 0 and layout.kind == "torch.optim.SGD"
    empty = adapter.optimizer_to_flat(plain, model)
    assert empty.shape == (0,)
    assert adapter.optimizer_from_flat(plain, model, empty) is plain

    other = _torch_model(1)
    foreign = torch.optim.Adam(other.parameters())
    _torch_train(other, foreign, 1)
    with pytest.raises(AdapterError, match="not parameters of this model"):
        adapter.optimizer_layout(foreign, model)
    with pytest.raises(AdapterError, match=r"torch\.optim\.Optimizer"):
        adapter.optimizer_layout(object(), model)


# ---------------------------------------------------------------------------------------------
# Keras 3


def _keras_model(hidden: int = 8) -> Any:
    keras = pytest.importorskip("keras")
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(2)]
    )


def _keras_steps(model: Any, optimizer: Any, steps: int, seed: int = 0) -> None:
    """Real training steps through apply_gradients, on the gradients of an MSE loss."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((16, 4)).astype(np.float32)
        y = rng.standard_normal((16, 2)).astype(np.float32)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))


def _keras_values(optimizer: Any) -> list[tuple[str, np.ndarray]]:
    return [
        (v.name, np.array(v.value.numpy()))
        for v in optimizer.variables
        if v.name != "learning_rate"
    ]


def _assert_same_keras_values(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for (name, x), (_, y) in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), name


@pytest.mark.parametrize("kind", ["adam", "sgd_momentum"])
def test_keras_round_trip_is_bit_identical(kind: str) -> None:
    keras = pytest.importorskip("keras")
    adapter = get_adapter("keras")

    def make(lr: float) -> Any:
        if kind == "adam":
            return keras.optimizers.Adam(lr)
        return keras.optimizers.SGD(lr, momentum=0.9)

    source, target = _keras_model(), _keras_model()  # auto-named layers differ: dense vs dense_2
    source_opt, target_opt = make(1e-2), make(0.5)
    source.compile(source_opt, "mse")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 4)), rng.standard_normal((32, 2))
    source.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 4 steps through model.fit
    _keras_steps(target, target_opt, 1, seed=2)

    layout = adapter.optimizer_layout(source_opt, source)
    assert layout == adapter.optimizer_layout(target_opt, target)
    assert layout.kind == ("keras.optimizers.Adam" if kind == "adam" else "keras.optimizers.SGD")
    assert layout.names[0] == "iteration" and layout.shapes[0] == ()
    assert "0.momentum" in layout.names and "learning_rate" not in layout.names

    before = _keras_values(source_opt)
    assert int(before[0][1]) == 4
    flat = adapter.optimizer_to_flat(source_opt, source)
    assert flat.shape == (layout.size,) and flat[0] == 4.0
    assert adapter.optimizer_from_flat(target_opt, target, flat) is target_opt
    _assert_same_keras_values(_keras_values(target_opt), before)
    assert float(target_opt.learning_rate) == 0.5  # the node keeps its own learning rate
    _assert_same_keras_values(_keras_values(source_opt), before)


def test_keras_fingerprints_unbuilt_stateless_and_bad_buffers() -> None:
    keras = pytest.importorskip("keras")
    adapter = get_adapter("keras")
    model = _keras_model()
    fresh = keras.optimizers.Adam()
    with pytest.raises(AdapterError, match="not built yet.*first model.fit batch"):
        adapter.optimizer_layout(fresh, model)

    adam = keras.optimizers.Adam()
    _keras_steps(model, adam, 2)
    momentum = keras.optimizers.SGD(0.1, momentum=0.9)
    _keras_steps(model, momentum, 1)
    plain = keras.optimizers.SGD(0.1)
    _keras_steps(model, plain, 1)
    wider = _keras_model(hidden=9)
    adam_wider = keras.optimizers.Adam()
    _keras_steps(wider, adam_wider, 1)
    layouts = [
        adapter.optimizer_layout(adam, model),
        adapter.optimizer_layout(momentum, model),
        adapter.optimizer_layout(plain, model),
        adapter.optimizer_layout(adam_wider, wider),
    ]
    assert len({layout.fingerprint for layout in layouts}) == 4
    # Plain SGD keeps only its step counter.
    assert layouts[2].names == ("iteration",) and layouts[2].size == 1

    before = _keras_values(adam)
    size = layouts[0].size
    nan = np.zeros(size, np.float32)
    nan[3] = np.nan
    fraction = adapter.optimizer_to_flat(adam, model)
    fraction[0] = 2.5  # the iteration counter must be a whole number
    bad: list[Any] = [np.zeros(size + 1, np.float32), np.zeros(size, np.float64), nan, fraction]
    for flat in bad:
        with pytest.raises(AdapterError, match="optimizer state"):
            adapter.optimizer_from_flat(adam, model, flat)
        _assert_same_keras_values(_keras_values(adam), before)

    adam.iterations.assign(MAX_EXACT_INTEGER + 1)
    with pytest.raises(AdapterError, match="exactly"):
        adapter.optimizer_to_flat(adam, model)
    with pytest.raises(AdapterError, match="keras.Model or keras.Layer"):
        adapter.optimizer_layout(adam, object())


def test_frameworks_have_different_fingerprints() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("keras")
    model = _torch_model(0)
    optimizer = torch.optim.Adam(model.parameters())
    _torch_train(model, optimizer, 1)
    keras_model = _keras_model()
    keras_opt = pytest.importorskip("keras").optimizers.Adam()
    _keras_steps(keras_model, keras_opt, 1)
    torch_layout = get_adapter("torch").optimizer_layout(optimizer, model)
    keras_layout = get_adapter("keras").optimizer_layout(keras_opt, keras_model)
    assert torch_layout.fingerprint != keras_layout.fingerprint


# ---------------------------------------------------------------------------------------------
# JAX / optax


def _jax_params(seed: int, hidden: int = 8) -> Any:
    jax = pytest.importorskip("jax")
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "dense1": {"kernel": jax.random.normal(k1, (4, hidden)), "bias": jax.numpy.zeros(hidden)},
        "dense2": {"kernel": jax.random.normal(k2, (hidden, 2)), "bias": jax.numpy.zeros(2)},
    }


def _jax_loss(params: Any, x: Any, y: Any) -> Any:
    jnp = pytest.importorskip("jax.numpy")
    h = jnp.maximum(x @ params["dense1"]["kernel"] + params["dense1"]["bias"], 0)
    return jnp.mean(jnp.square(h @ params["dense2"]["kernel"] + params["dense2"]["bias"] - y))


def _optax_steps(tx: Any, params: Any, opt_state: Any, steps: int, seed: int = 0) -> Any:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((16, 4)).astype(np.float32)
        y = rng.standard_normal((16, 2)).astype(np.float32)
        grads = jax.grad(_jax_loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def _assert_same_leaves(a: Any, b: Any) -> None:
    jax = pytest.importorskip("jax")
    left, left_def = jax.tree_util.tree_flatten(a)
    right, right_def = jax.tree_util.tree_flatten(b)
    assert left_def == right_def
    for x, y in zip(left, right, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


_OPTAX = {
    "adam": lambda optax: optax.adam(1e-2),
    "sgd_momentum": lambda optax: optax.sgd(0.05, momentum=0.9),
    "chain_adamw": lambda optax: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
}


@pytest.mark.parametrize("name", sorted(_OPTAX))
def test_optax_round_trip_is_bit_identical(name: str) -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    adapter = get_adapter("jax")
    tx = _OPTAX[name](optax)
    source_params, target_params = _jax_params(0), _jax_params(1)
    source_params, source_state = _optax_steps(tx, source_params, tx.init(source_params), 4, 1)
    target_params, target_state = _optax_steps(tx, target_params, tx.init(target_params), 1, 2)
    kept = jax.tree_util.tree_map(np.array, target_state)

    layout = adapter.optimizer_layout(source_state, source_params)
    assert layout == adapter.optimizer_layout(target_state, target_params)
    assert layout.kind.startswith("optax ") and layout.size > 0
    flat = adapter.optimizer_to_flat(source_state, source_params)
    assert flat.shape == (layout.size,)
    flat.setflags(write=False)
    new_state = adapter.optimizer_from_flat(target_state, target_params, flat)
    _assert_same_leaves(new_state, source_state)
    _assert_same_leaves(target_state, kept)  # the old state is not modified
    if name != "sgd_momentum":
        counts = [leaf for leaf in jax.tree_util.tree_leaves(new_state) if leaf.dtype.kind == "i"]
        assert counts and all(int(c) == 4 and c.dtype == np.int32 for c in counts)
    # The new state drives the same update as the source's.
    one, _ = _optax_steps(tx, source_params, source_state, 1, 3)
    two, _ = _optax_steps(tx, source_params, new_state, 1, 3)
    _assert_same_leaves(one, two)


def test_optax_fingerprints_stateless_and_bad_buffers() -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    adapter = get_adapter("jax")
    params = _jax_params(0)
    states = [
        optax.adam(1e-3).init(params),
        optax.adamw(1e-3).init(params),
        optax.sgd(0.1, momentum=0.9).init(params),
        optax.adam(1e-3).init(_jax_params(0, hidden=9)),
    ]
    layouts = [adapter.optimizer_layout(state, params) for state in states]
    assert len({layout.fingerprint for layout in layouts}) == len(layouts)
    # Hyperparameters are not in a plain optax state: another learning rate, same fingerprint.
    assert adapter.optimizer_layout(optax.adam(0.5).init(params), params) == layouts[0]

    plain = optax.sgd(0.1).init(params)
    assert adapter.optimizer_layout(plain, params).size == 0
    empty = adapter.optimizer_to_flat(plain, params)
    assert empty.shape == (0,)
    _assert_same_leaves(adapter.optimizer_from_flat(plain, params, empty), plain)

    tx = optax.adam(1e-2)
    params, state = _optax_steps(tx, params, tx.init(params), 2)
    size = adapter.optimizer_layout(state, params).size
    nan = np.zeros(size, np.float32)
    nan[-1] = np.nan
    fraction = adapter.optimizer_to_flat(state, params)
    assert fraction[0] == 2.0  # the count comes first
    fraction[0] = 2.5
    bad: list[Any] = [np.zeros(size - 1, np.float32), np.zeros(size, np.float64), nan, fraction]
    for flat in bad:
        with pytest.raises(AdapterError, match="optimizer state"):
            adapter.optimizer_from_flat(state, params, flat)

    big = jax.tree_util.tree_map(
        lambda leaf: leaf + MAX_EXACT_INTEGER if leaf.dtype.kind == "i" else leaf, state
    )
    with pytest.raises(AdapterError, match="exactly"):
        adapter.optimizer_to_flat(big, params)
    with pytest.raises(AdapterError, match="GradientTransformation"):
        adapter.optimizer_layout(tx, params)
    keyed = {"key": jax.random.key(0), "count": jax.numpy.zeros((), jax.numpy.int32)}
    with pytest.raises(AdapterError, match="random keys"):
        adapter.optimizer_layout(keyed, params)


def test_optax_fingerprint_is_the_same_in_another_process() -> None:
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    code = (
        "import jax.numpy as jnp, optax;"
        "from dpwa_core.adapters import get_adapter;"
        "p = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)};"
        "s = optax.chain(optax.clip(1.0), optax.adam(1e-3)).init(p);"
        "print(get_adapter('jax').optimizer_layout(s, p).shape_hash)"
    )
    env = dict(os.environ, PYTHONHASHSEED="999", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    jnp = pytest.importorskip("jax.numpy")
    params = {"b": jnp.zeros(2), "w": jnp.ones((3, 2))}  # another insertion order, one tree
    state = optax.chain(optax.clip(1.0), optax.adam(0.5)).init(params)
    assert (
        int(out.stdout.split()[-1]) == get_adapter("jax").optimizer_layout(state, params).shape_hash
    )


def test_optax_and_torch_fingerprints_differ() -> None:
    torch = pytest.importorskip("torch")
    optax = pytest.importorskip("optax")
    model = _torch_model(0)
    optimizer = torch.optim.Adam(model.parameters())
    _torch_train(model, optimizer, 1)
    params = _jax_params(0)
    state = optax.adam(1e-3).init(params)
    assert (
        get_adapter("torch").optimizer_layout(optimizer, model).fingerprint
        != get_adapter("jax").optimizer_layout(state, params).fingerprint
    )
