"""Finite in, finite out: blending finite parameters never gives Inf or NaN, in every adapter.

A peer alternating -3e38 and +3e38 (finite, so accepted by the NaN/Inf check) used to make the
naive ``local + f * (peer - local)`` overflow float32. Every blend is checked against the
float64 convex combination, within float32 rounding.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dpwa_core.adapters import Adapter, lerp_inplace, output_flat, validate_flat
from dpwa_core.layout import Layout
from dpwa_core.node import PullResult

SIZE = 8  # the models below have 8 float32 parameters
MAX = float(np.finfo(np.float32).max)
EPS = float(np.finfo(np.float32).eps)

_special = st.sampled_from([MAX, -MAX, 3e38, -3e38, 3.4e38, -3.4e38, 1e38, -1e38, 0.0, 1.0])
_values = st.one_of(
    _special,
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.floats(-10, 10, width=32),
)
vectors = arrays(np.float32, SIZE, elements=_values)
factors = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-7, 1 - 1e-7]), st.floats(0, 1))


def check(
    result: np.ndarray, local: np.ndarray, peer: np.ndarray, factor: float, tiny: float = 1e-44
) -> None:
    """``result`` is finite and within float32 rounding of the float64 convex combination.

    ``tiny`` is the absolute slack near zero: a few subnormal units, or the smallest normal
    number for XLA, which flushes subnormal results to zero.
    """
    result = np.asarray(result, np.float64)
    assert np.isfinite(result).all(), (local, peer, factor, result)
    a, b = local.astype(np.float64), peer.astype(np.float64)
    exact = (1 - factor) * a + factor * b
    scale = np.maximum(np.abs(a), np.abs(b))
    tolerance = 8 * EPS * scale + tiny
    assert (np.abs(result - exact) <= tolerance).all(), (local, peer, factor, result, exact)
    slack = 0.0 if tiny <= 1e-44 else tiny  # factor 0 and 1 are exact (up to XLA's flush)
    if factor == 0:
        np.testing.assert_allclose(result, a, rtol=0, atol=slack)
    if factor == 1:
        np.testing.assert_allclose(result, b, rtol=0, atol=slack)


@given(vectors, vectors, factors)
def test_lerp_inplace(local: np.ndarray, peer: np.ndarray, factor: float) -> None:
    check(lerp_inplace(local.copy(), peer, factor), local, peer, factor)


@given(vectors, vectors, factors)
def test_pull_result_blend_into(local: np.ndarray, peer: np.ndarray, factor: float) -> None:
    result = PullResult(peer, factor, "w1", 1.0, 0.0, 0.0)
    params = local.copy()
    assert result.blend_into(params) is params
    check(params, local, peer, factor)


class _ListAdapter(Adapter):
    """The smallest adapter: it keeps the base class's interpolate."""

    framework_name = "builtins"

    def handles(self, state: object) -> bool:
        return isinstance(state, list)

    def layout(self, state: Any) -> Layout:
        return Layout.flat(len(state))

    def to_flat(self, state: Any, out: Any = None) -> Any:
        out = output_flat(out, self.layout(state))
        out[:] = state
        return out

    def from_flat(self, state: Any, flat: Any) -> Any:
        state[:] = validate_flat(flat, self.layout(state)).tolist()
        return state


@given(vectors, vectors, factors)
def test_base_adapter_interpolate(local: np.ndarray, peer: np.ndarray, factor: float) -> None:
    state = local.tolist()
    check(np.array(_ListAdapter().interpolate(state, peer, factor)), local, peer, factor)


def test_naive_formula_overflows() -> None:
    """The attack this file is about: the old formula turns finite values into Inf and NaN."""
    local = np.array([-3e38, 3e38], np.float32)
    peer = -local
    with np.errstate(over="ignore", invalid="ignore"):
        naive = local + np.float32(0.5) * (peer - local)
    assert not np.isfinite(naive).all()
    check(lerp_inplace(local.copy(), peer, 0.5), local, peer, 0.5)


def test_large_vectors_cross_blocks() -> None:
    """Blocks are fixed one by one: only the block that overflows takes the slow path."""
    rng = np.random.default_rng(0)
    local = rng.standard_normal(3 * 1024 * 1024 + 17).astype(np.float32)
    peer = rng.standard_normal(local.size).astype(np.float32)
    spots = rng.choice(local.size, 50, replace=False)
    local[spots] = -3e38
    peer[spots] = 3e38
    for factor in (0.3, 0.5, 0.7):
        check(lerp_inplace(local.copy(), peer, factor), local, peer, factor)


# --- PyTorch -------------------------------------------------------------------------------


@cache
def _torch() -> Any:
    torch = pytest.importorskip("torch")
    from dpwa_core.adapters import get_adapter

    return torch, get_adapter("torch")


def _torch_module(flat: bool) -> Any:
    torch, adapter = _torch()
    model = torch.nn.Linear(3, 2)  # 6 + 2 = 8 parameters, its weight transposed in the layout
    return adapter.prepare(model, zero_copy=flat)


@pytest.mark.parametrize("flat", [True, False], ids=["zero-copy", "per-tensor"])
@settings(max_examples=60, deadline=None)
@given(local=vectors, peer=vectors, factor=factors)
def test_torch_module(flat: bool, local: np.ndarray, peer: np.ndarray, factor: float) -> None:
    import dpwa_torch

    _, adapter = _torch()
    model = _torch_module(flat)
    assert (dpwa_torch.flat_buffer(model) is not None) == flat
    adapter.from_flat(model, local)
    adapter.interpolate(model, peer, factor)
    check(adapter.to_flat(model), local, peer, factor)


@settings(max_examples=60, deadline=None)
@given(local=vectors, peer=vectors, factor=factors)
def test_torch_tensor_dict(local: np.ndarray, peer: np.ndarray, factor: float) -> None:
    torch, adapter = _torch()
    state = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    adapter.from_flat(state, local)
    adapter.interpolate(state, peer, factor)
    check(adapter.to_flat(state), local, peer, factor)


def test_torch_large_flat_model_crosses_chunks() -> None:
    torch, adapter = _torch()
    model = adapter.prepare(torch.nn.Linear(1500, 1500), zero_copy=True)  # 2.25 M parameters
    rng = np.random.default_rng(1)
    size = adapter.layout(model).size
    local = rng.standard_normal(size).astype(np.float32)
    peer = rng.standard_normal(size).astype(np.float32)
    spots = rng.choice(size, 40, replace=False)
    local[spots[::2]], peer[spots[::2]] = -3e38, 3e38
    local[spots[1::2]], peer[spots[1::2]] = 3.4e38, -3.4e38
    for factor in (0.25, 0.5, 0.75):
        adapter.from_flat(model, local)
        adapter.interpolate(model, peer, factor)
        check(adapter.to_flat(model), local, peer, factor)


def test_torch_normal_values_bit_identical_to_lerp() -> None:
    """Where nothing overflows, the zero-copy blend is torch.lerp, bit for bit."""
    torch, adapter = _torch()
    model = adapter.prepare(torch.nn.Linear(1500, 1500), zero_copy=True)
    size = adapter.layout(model).size
    rng = np.random.default_rng(2)
    local = rng.standard_normal(size).astype(np.float32)
    peer = (rng.standard_normal(size) * 1e3).astype(np.float32)
    adapter.from_flat(model, local)
    adapter.interpolate(model, peer, 0.3)
    expected = torch.from_numpy(local.copy()).lerp_(torch.from_numpy(peer), 0.3).numpy()
    np.testing.assert_array_equal(adapter.to_flat(model), expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_narrow_dtypes_are_clamped(dtype: str) -> None:
    torch, adapter = _torch()
    state = {"w": torch.zeros(SIZE, dtype=getattr(torch, dtype))}
    peer = np.array([1e5, -1e5, 3e38, -3e38, 1, 2, 3, 4], np.float32)
    adapter.interpolate(state, peer, 0.9)
    assert torch.isfinite(state["w"]).all()


# --- Keras ---------------------------------------------------------------------------------


@cache
def _keras() -> Any:
    keras = pytest.importorskip("keras")
    from dpwa_core.adapters import get_adapter

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return keras, get_adapter("keras"), model


@settings(max_examples=40, deadline=None)
@given(local=vectors, peer=vectors, factor=factors)
def test_keras(local: np.ndarray, peer: np.ndarray, factor: float) -> None:
    _, adapter, model = _keras()
    adapter.from_flat(model, local)
    adapter.interpolate(model, peer, factor)
    check(adapter.to_flat(model), local, peer, factor)


def test_keras_float16_is_clamped() -> None:
    keras, adapter, _ = _keras()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, dtype="float16")])
    peer = np.array([1e5, -1e5, 3e38, -3e38, 1, 2, 3, 4], np.float32)
    adapter.interpolate(model, peer, 0.9)
    assert np.isfinite(adapter.to_flat(model)).all()


# --- JAX -----------------------------------------------------------------------------------


@cache
def _jax() -> Any:
    jnp = pytest.importorskip("jax.numpy")
    from dpwa_core.adapters import get_adapter

    return jnp, get_adapter("jax")


@settings(max_examples=60, deadline=None)
@given(local=vectors, peer=vectors, factor=factors)
def test_jax(local: np.ndarray, peer: np.ndarray, factor: float) -> None:
    jnp, adapter = _jax()
    state = adapter.from_flat({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, local)
    blended = adapter.interpolate(state, peer, factor)
    check(adapter.to_flat(blended), local, peer, factor, tiny=float(np.finfo(np.float32).tiny))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_jax_narrow_dtypes_are_clamped(dtype: str) -> None:
    jnp, adapter = _jax()
    state = {"w": jnp.zeros(SIZE, dtype=dtype)}
    peer = np.array([1e5, -1e5, 3e38, -3e38, 1, 2, 3, 4], np.float32)
    blended = adapter.interpolate(state, peer, 0.9)
    assert bool(jnp.isfinite(blended["w"]).all())
