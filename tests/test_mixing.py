"""benchmarks/mixing.py: the scheme spelling, and each scheme's mixing, checked by hand."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
mixing = pytest.importorskip("mixing")


@pytest.fixture
def spec(tmp_path: Path) -> dict:
    """A race spec over 1200 random images in mnist_5k's format (1000 test, 100 per node)."""
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (1200, 784)), rng.integers(0, 10, (1200, 1))], 1)
    path = tmp_path / "tiny.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return {
        "data_path": str(path),
        "world": 2,
        "skew": False,
        "seed": 0,
        "lr": 0.05,
        "batch_size": 8,
        "hidden": [6],
    }


def test_scheme_spelling_round_trips_and_refuses_nonsense() -> None:
    for text in ("localsgd:16", "pair:2", "pair:4:mom", "pair:3:mom:f0.7", "expo:2:drift"):
        assert str(mixing.Scheme.parse(text)) == text
    assert mixing.Scheme.parse("pair:2:f0.7").factor == 0.7
    for bad in (
        "pair",
        "pair:x",
        "pair:0",
        "ring:2",
        "localsgd:4:mom",
        "pair:2:f2",
        "pair:2:fz",
        "localsgd:4:drift",
    ):
        with pytest.raises(ValueError, match="scheme"):
            mixing.Scheme.parse(bad)


def test_localsgd_makes_every_model_the_average_every_period(spec: dict) -> None:
    cluster = mixing.Cluster(spec, mixing.Scheme.parse("localsgd:2"), seed=0)
    cluster.step()
    assert not torch.equal(cluster.flat(0), cluster.flat(1))  # different shards, one step apart
    cluster.step()
    assert torch.equal(cluster.flat(0), cluster.flat(1))
    assert cluster.blends == [1, 1]


def _set(cluster: mixing.Cluster, rank: int, value: float) -> None:
    n = cluster.flat(rank).numel()
    mixing.vector_to_parameters(torch.full((n,), value), cluster.models[rank].parameters())


def test_pair_blends_the_lead_read_when_the_pull_was_asked(spec: dict) -> None:
    cluster = mixing.Cluster(spec, mixing.Scheme.parse("pair:1:mom:f0.25"), seed=0)
    for rank, (param, mom) in enumerate([(1.0, 10.0), (3.0, 30.0)]):
        _set(cluster, rank, param)
        n = cluster.flat(rank).numel()
        mixing.set_momentum(cluster.models[rank], cluster.optimizers[rank], torch.full((n,), mom))
    cluster._gossip()  # asks: node 0 reads (own 1, peer 3), node 1 reads (own 3, peer 1)
    assert cluster.blends == [0, 0]
    _set(cluster, 0, 2.0)  # both trained on before the pulls land
    _set(cluster, 1, 5.0)
    cluster.steps = 1
    cluster._gossip()
    assert cluster.blends == [1, 1]
    assert torch.allclose(cluster.flat(0), torch.tensor(2.0 + 0.25 * (3.0 - 1.0)))
    assert torch.allclose(cluster.flat(1), torch.tensor(5.0 + 0.25 * (1.0 - 3.0)))
    m0 = mixing.momentum_of(cluster.models[0], cluster.optimizers[0])
    assert torch.allclose(m0, torch.tensor(0.75 * 10.0 + 0.25 * 30.0))


def test_run_reports_its_figures(spec: dict) -> None:
    result = mixing.run(spec, mixing.Scheme.parse("pair:2"), steps=8, seed=0, target=1.5)
    assert result["steps_to_target"] is None and result["steps_held"] is None  # never reached
    assert [s for s, _ in result["curve"]] == [0, 4, 8]
    assert result["blends_per_node"] == 3  # asked after steps 1, 3, 5, 7; landed at 3, 5, 7


def test_expo_asks_the_exponential_graphs_peer_each_round(spec: dict) -> None:
    from dpwa_core.peers import exponential_hop

    cluster = mixing.Cluster({**spec, "world": 4}, mixing.Scheme.parse("expo:1"), seed=0)
    for round_ in range(4):
        assert cluster.rounds == [round_] * 4
        asked = [cluster.peer_of(rank) for rank in range(4)]
        assert asked == [exponential_hop(rank, 4, round_) for rank in range(4)]
        cluster.rounds = [r + 1 for r in cluster.rounds]


def test_drift_clips_and_corrects_the_lead_as_a_node_does(spec: dict) -> None:
    cluster = mixing.Cluster(spec, mixing.Scheme.parse("pair:1:drift"), seed=0)
    n = cluster.flat(0).numel()
    lead = np.full(n, 2.0, np.float32)
    cluster.steps = 3  # three steps since the last blend (at step 0)
    cluster._correct(0, lead, np.zeros(n, np.float32))
    drift = cluster.drifts[0]
    assert drift.blends == 1
    # c was 0, so this blend adds nothing yet and learns rate * f * lead / steps per step.
    assert np.allclose(lead, 2.0)
    assert np.allclose(drift.c, 0.2 * 0.5 * 2.0 / 3)
