"""Blending a lead: ``local[span] += f * lead``, one pass over the pulled elements, every adapter.

A staleness-corrected pull (``Gossip.step``) is blended as the peer's lead over our model at the
request, added with the factor on the elements the pull covered (the whole model, or one slice
of it). Each adapter's ``add_scaled`` must change exactly those elements, by exactly that
amount (within float32 rounding), leave every other element bit for bit, and never turn finite
values into Inf or NaN; ``read_span`` must read exactly that range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dpwa_core.adapters import Adapter, AdapterError, get_adapter
from dpwa_core.delta import add_scaled_inplace
from dpwa_core.node import PullResult

MAX = float(np.finfo(np.float32).max)
EPS = float(np.finfo(np.float32).eps)

_special = st.sampled_from([MAX, -MAX, 3e38, -3e38, 1e38, 0.0, 1.0, -2.5])
_values = st.one_of(
    _special,
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.floats(-10, 10, width=32),
)
# A blend's factor is float32, as the model is: one below float32's smallest normal number
# would keep only a few bits, so factors are 0 or normal.
TINY = float(np.finfo(np.float32).tiny)
factors = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-7, TINY]), st.floats(TINY, 1))


def expected(local: np.ndarray, lead: np.ndarray, factor: float) -> np.ndarray:
    """The float64 sum, saturated to float32's range."""
    return np.clip(local.astype(np.float64) + factor * lead.astype(np.float64), -MAX, MAX)


def check(result: np.ndarray, local: np.ndarray, lead: np.ndarray, factor: float) -> None:
    result = np.asarray(result, np.float64)
    assert np.isfinite(result).all(), (local, lead, factor, result)
    exact = expected(local, lead, factor)
    scale = np.maximum(np.abs(local.astype(np.float64)), np.abs(factor * lead.astype(np.float64)))
    assert (np.abs(result - exact) <= 4 * EPS * scale + 1e-37).all(), (local, lead, result, exact)
    if factor == 0:
        np.testing.assert_array_equal(result, local)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_add_scaled_inplace_saturates_and_is_exact_elsewhere(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 40))
    local = data.draw(arrays(np.float32, size, elements=_values))
    lead = data.draw(arrays(np.float32, size, elements=_values))
    factor = data.draw(factors)
    out = local.copy()
    assert add_scaled_inplace(out, lead, factor) is out
    check(out, local, lead, factor)


def test_add_scaled_inplace_crosses_blocks_and_refuses_mismatches() -> None:
    rng = np.random.default_rng(0)
    local = rng.standard_normal(300_000).astype(np.float32)
    lead = rng.standard_normal(300_000).astype(np.float32)
    local[[5, 200_000]], lead[[5, 200_000]] = 3e38, 3e38  # two blocks overflow, the rest not
    out = local.copy()
    add_scaled_inplace(out, lead, 0.75)
    check(out, local, lead, 0.75)
    assert out[5] == out[200_000] == np.float32(MAX)
    with pytest.raises(ValueError, match="shapes"):
        add_scaled_inplace(out, lead[:-1], 0.5)
    frozen = out.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        add_scaled_inplace(frozen, lead, 0.5)


def test_a_nan_in_the_lead_moves_nothing() -> None:
    out = np.array([1.0, 2.0, 3.0], np.float32)
    add_scaled_inplace(out, np.array([np.nan, 1.0, np.inf], np.float32), 0.5)
    np.testing.assert_array_equal(out, [1.0, 2.5, MAX])


def test_pull_result_blends_a_lead_on_its_span_only() -> None:
    local = np.arange(10, dtype=np.float32)
    lead = np.full(10, 4.0, np.float32)
    lead[:3] = np.nan  # outside the span: means nothing, never read
    result = PullResult(lead, 0.5, "w2", 0.0, 0.0, 0.0, lead=True, span=(3, 7))
    result.blend_into(local)
    np.testing.assert_array_equal(local, [0, 1, 2, 5, 6, 7, 8, 7, 8, 9])


# --- every adapter -------------------------------------------------------------------------


def _torch_module(flat: bool) -> Callable[[], tuple[Adapter, Any]]:
    def make() -> tuple[Adapter, Any]:
        torch = pytest.importorskip("torch")
        adapter = get_adapter("torch")
        # A conv (its weight permuted to HWIO in the layout), a linear (transposed) and a
        # float64 buffer: per tensor, the range cuts through permuted tensors.
        model = torch.nn.Sequential(
            torch.nn.Conv2d(2, 3, 2), torch.nn.Flatten(), torch.nn.Linear(3, 4)
        )
        model.register_buffer("scale", torch.ones(5, dtype=torch.float64))
        return adapter, adapter.prepare(model, zero_copy=flat)

    return make


def _torch_dict() -> tuple[Adapter, Any]:
    torch = pytest.importorskip("torch")
    return get_adapter("torch"), {
        "w": torch.zeros(4, 6),
        "half": torch.zeros(7, dtype=torch.float16),
        "b": torch.zeros(3),
    }


def _keras() -> tuple[Adapter, Any]:
    keras = pytest.importorskip("keras")
    return get_adapter("keras"), keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])


def _jax() -> tuple[Adapter, Any]:
    jnp = pytest.importorskip("jax.numpy")
    return get_adapter("jax"), {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}


MODELS = {
    "torch-zero-copy": _torch_module(True),
    "torch-per-tensor": _torch_module(False),
    "torch-dict": _torch_dict,
    "keras": _keras,
    "jax": _jax,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_adapters_add_on_the_range_only_and_read_it(name: str) -> None:
    adapter, state = MODELS[name]()
    size = adapter.layout(state).size
    rng = np.random.default_rng(3)
    narrow = name == "torch-dict"  # its float16 tensor holds float16 values only
    for offset, stop in [(0, size), (1, size - 2), (size // 3, size // 3 + 5), (size - 1, size)]:
        local = rng.standard_normal(size).astype(np.float32)
        if narrow:
            local = local.astype(np.float16).astype(np.float32)
        state = adapter.from_flat(state, local)
        out = np.full(stop - offset, np.nan, np.float32)
        assert adapter.read_span(state, out, offset) is out
        np.testing.assert_array_equal(out, local[offset:stop])
        lead = rng.standard_normal(stop - offset).astype(np.float32)
        state = adapter.add_scaled(state, lead, 0.25, offset=offset)
        after = adapter.to_flat(state)
        np.testing.assert_array_equal(after[:offset], local[:offset])
        np.testing.assert_array_equal(after[stop:], local[stop:])
        want = local[offset:stop] + np.float32(0.25) * lead
        tolerance = 1e-2 if narrow else 1e-6
        np.testing.assert_allclose(after[offset:stop], want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", list(MODELS))
def test_adapters_add_finite_values_into_finite_ones(name: str) -> None:
    adapter, state = MODELS[name]()
    size = adapter.layout(state).size
    local = np.full(size, 3e38, np.float32)
    local[::2] = -3e38
    if name == "torch-dict":
        local[24:31] = 6e4  # the float16 tensor: near its own maximum
    state = adapter.from_flat(state, local)
    lead = np.where(local > 0, MAX, -MAX).astype(np.float32)
    state = adapter.add_scaled(state, lead[1:], 1.0, offset=1)
    after = adapter.to_flat(state)
    assert np.isfinite(after).all(), after
    assert after[0] == local[0]


@pytest.mark.parametrize("name", ["torch-zero-copy", "jax"])
def test_adapters_refuse_a_bad_range_and_write_nothing(name: str) -> None:
    adapter, state = MODELS[name]()
    size = adapter.layout(state).size
    local = np.arange(size, dtype=np.float32)
    state = adapter.from_flat(state, local)
    for values, offset in [
        (np.ones(3, np.float32), size - 2),
        (np.ones(3, np.float32), -1),
        (np.ones(3, np.float64), 0),
        (np.ones((3, 1), np.float32), 0),
    ]:
        with pytest.raises(AdapterError):
            adapter.add_scaled(state, values, 0.5, offset=offset)  # type: ignore[arg-type]
    with pytest.raises(AdapterError):
        adapter.add_scaled(state, np.ones(3, np.float32), 1.5)
    with pytest.raises(AdapterError, match="writable"):
        frozen = np.empty(3, np.float32)
        frozen.flags.writeable = False
        adapter.read_span(state, frozen, 0)
    np.testing.assert_array_equal(adapter.to_flat(state), local)
