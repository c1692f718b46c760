"""The lead of a staleness-corrected pull is made as the answer lands, then clipped and corrected.

The puller turns each received chunk into ``peer - reference`` and sums its squares
(:func:`dpwa_core.delta.subtract_squared`); clipping (:meth:`Clipper.clip_lead`) and drift
correction (``DriftCorrection.apply(squares=...)``) use that sum instead of passes of their own.
These tests check that each step gives what the separate passes gave, and, with real nodes and
sockets, that a pull over TCP (float32 and int8) and from shared memory hands out that lead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dpwa_core import Node
from dpwa_core.delta import subtract_inplace, subtract_squared
from dpwa_core.drift import DriftCorrection
from dpwa_core.robust import Clipper, RobustSettings

Cluster = Callable[..., dict[str, Any]]
_F32_MAX = float(np.finfo(np.float32).max)
finite = st.floats(-_F32_MAX, _F32_MAX, width=32, allow_nan=False)
small = st.floats(-100, 100, width=32)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 300))
def test_subtract_squared_matches_subtract_inplace(data: st.DataObject, size: int) -> None:
    """The difference rounded to float32 and clamped to its range; the true squares."""
    out = data.draw(arrays(np.float32, size, elements=finite))
    other = data.draw(arrays(np.float32, size, elements=finite))
    wide = out.astype(np.float64) - other.astype(np.float64)
    expected = np.clip(wide, -_F32_MAX, _F32_MAX).astype(np.float32)
    truth = float(np.sum(wide**2))
    got = out.copy()
    squares = subtract_squared(got, other, np.empty(size, np.float32))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(subtract_inplace(out.copy(), other), expected)
    assert math.isclose(squares, truth, rel_tol=1e-4, abs_tol=1e-30)


def test_subtract_squared_across_blocks_and_nan() -> None:
    """Blocks of 64 Ki: one overflowing block is summed in float64, the others in float32."""
    size = 3 * 65536 + 7
    out = np.full(size, 2.0, np.float32)
    other = np.ones(size, np.float32)
    out[70000], other[70000] = 3e38, -3e38  # overflows float32 in the second block
    squares = subtract_squared(out, other, np.empty(65536, np.float32))
    assert out[70000] == np.float32(_F32_MAX) and np.all(np.delete(out, 70000) == 1.0)
    assert math.isclose(squares, (size - 1) + 6e38**2, rel_tol=1e-6)
    with_nan = np.ones(10, np.float32)
    with_nan[3] = np.nan
    scratch = np.empty(10, np.float32)
    assert math.isnan(subtract_squared(with_nan, np.zeros(10, np.float32), scratch))
    with pytest.raises(ValueError, match="shapes"):
        subtract_squared(np.ones(10, np.float32), np.ones(9, np.float32), scratch)
    with pytest.raises(ValueError, match="scratch"):
        subtract_squared(np.ones(10, np.float32), np.ones(10, np.float32), scratch[:5])


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 200), st.integers(1, 24))
def test_clip_lead_matches_clip(data: st.DataObject, size: int, pulls: int) -> None:
    """A sequence of pulls clipped as leads gives the radii, counts and vectors of clip()."""
    scale = data.draw(st.sampled_from([1.0, 2.0]))
    settings_ = RobustSettings(clip_window=4)
    whole, leads = Clipper(settings_, size), Clipper(settings_, size)
    for _ in range(pulls):
        local = data.draw(arrays(np.float32, size, elements=small))
        peer = data.draw(arrays(np.float32, size, elements=small))
        name = data.draw(st.sampled_from(["a", "b", "c"]))
        clipped = peer.copy()
        was = whole.clip(clipped, local, name, scale)
        expected = subtract_inplace(clipped, local)
        lead = peer.copy()
        squares = subtract_squared(lead, local, np.empty(size, np.float32))
        after = leads.clip_lead(lead, squares, name, local, scale)
        assert (leads.clipped, leads.radius, leads.distance) == (
            whole.clipped,
            pytest.approx(whole.radius, rel=1e-5),
            pytest.approx(whole.distance, rel=1e-5),
        )
        bound = 1e-4 * (1.0 + float(np.abs(peer - local).max()))
        np.testing.assert_allclose(lead, expected, rtol=1e-4, atol=bound)
        assert math.isclose(after, float(np.dot(lead, lead)), rel_tol=1e-3, abs_tol=1e-6)
        assert was == (after < squares)


def test_clip_lead_leaves_a_nan_lead_alone() -> None:
    clipper = Clipper(RobustSettings(), 4)
    lead = np.array([1.0, np.nan, 2.0, 3.0], np.float32)
    assert math.isnan(clipper.clip_lead(lead, math.nan, "a", np.zeros(4, np.float32)))
    assert clipper.clipped == 0 and lead[0] == 1.0 and clipper.distance is None


@pytest.mark.parametrize("offset", [0, 3])
def test_drift_with_known_squares_matches_measuring_them(offset: int) -> None:
    """apply(squares=...) changes what is measured, not what is learned or added."""
    rng = np.random.default_rng(1)
    size = 20
    measured, told = DriftCorrection(size, 0.5), DriftCorrection(size, 0.5)
    for _ in range(5):
        lead = rng.normal(size=size - offset if offset else size).astype(np.float32)
        a, b = lead.copy(), lead.copy()
        measured.apply(a, 0.5, 3, offset=offset)
        told.apply(b, 0.5, 3, offset=offset, squares=float(np.dot(lead, lead)))
        np.testing.assert_allclose(a, b, rtol=1e-6)
        np.testing.assert_allclose(measured.c, told.c, rtol=1e-6)
        assert told.last_norm == pytest.approx(measured.last_norm, rel=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"transport": "tcp", "wire_dtype": "float32"},
        {"transport": "tcp", "wire_dtype": "int8"},
        {"transport": "auto"},  # both nodes on this host: a shared-memory copy
    ],
    ids=["tcp-float32", "tcp-int8", "shm"],
)
def test_a_pull_hands_out_its_clipped_lead(make_cluster: Cluster, options: dict) -> None:
    """Real nodes: the lead handed out is ``peer - model at the request``, its squares summed
    as it landed, clipped to the warm-up radius ``||model||`` (half of it here)."""
    config = make_cluster(2, drift_correction=0, **options)
    size = 70_000  # more than one receive and one decode chunk
    with Node(config, "w1") as a, Node(config, "w2") as b:
        pa, pb = np.ones(size, np.float32), np.full(size, 3.0, np.float32)
        b.publish(pb, 1.0)
        a.publish(pa, 1.0)
        assert a.start_pull(current=pa)
        result = a.collect(1.0, wait=True, lead=True)
        assert result is not None and result.lead and result.peer == "w2"
        puller = a._puller
        assert puller is not None
        tolerance = 0.02 if options.get("wire_dtype") == "int8" else 0.0
        assert puller.lead_squares == pytest.approx(4.0 * size, rel=tolerance)
        np.testing.assert_allclose(result.params, 1.0, rtol=1e-5 + tolerance)  # 2 halved
        assert a.stats()["peers"]["w2"]["clipped"] == 1
        assert a.stats()["pulls_shm"] == (1 if options["transport"] == "auto" else 0)
