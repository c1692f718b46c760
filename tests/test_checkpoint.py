"""Checkpoint and resume (dpwa_core.checkpoint) with real nodes and real frameworks.

A save then a load into a fresh model and optimizer gives back the same bits; the file is a
plain safetensors file; the write is atomic; and every damaged or hostile file is refused with
a CheckpointError that leaves the model, the optimizer and the node as they were.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dpwa_core
from dpwa_core import checkpoint
from dpwa_core.checkpoint import MAX_HEADER, CheckpointError

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import save as st_save  # noqa: E402

Cluster = Callable[..., dict[str, Any]]


OPTIMIZERS: dict[str, Callable[[Any], Any]] = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def _model(seed: int) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(gossip: Any, model: Any, optimizer: Any, steps: int, seed: int) -> None:
    """Real steps: forward, backward, optimizer step (if any), then gossip.step."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        gossip.step(loss.item(), samples=16)


@pytest.fixture
def config(make_cluster: Cluster) -> dict[str, Any]:
    return make_cluster(2)  # w2 never starts; start: own, so nothing waits for it


@pytest.fixture
def trained(config: dict[str, Any]) -> Iterator[Any]:
    """w1 after 5 real steps, model only."""
    model = _model(0)
    with dpwa_core.connect(model, config, "w1") as gossip:
        _train(gossip, model, None, 5, seed=1)
        yield gossip


def _flat(gossip: Any) -> np.ndarray:
    return gossip.adapter.to_flat(gossip.state).copy()


def _opt_state(optimizer: Any) -> dict[str, Any]:
    return copy.deepcopy(optimizer.state_dict()) if optimizer is not None else {}


def _same_opt_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal optimizer state dicts, tensors compared bit for bit and dtype for dtype."""
    if a.keys() != b.keys() or a.get("param_groups") != b.get("param_groups"):
        return False
    sa, sb = a.get("state", {}), b.get("state", {})
    if sa.keys() != sb.keys():
        return False
    for key in sa:
        if sa[key].keys() != sb[key].keys():
            return False
        for name, va in sa[key].items():
            vb = sb[key][name]
            if torch.is_tensor(va):
                if not torch.is_tensor(vb) or va.dtype != vb.dtype or not torch.equal(va, vb):
                    return False
            elif va != vb:
                return False
    return True


class Unchanged:
    """Snapshot of everything a failed load must leave as it was."""

    def __init__(self, gossip: Any) -> None:
        self.gossip = gossip
        self.state = gossip.state
        self.model = _flat(gossip)
        self.optimizer = gossip.optimizer
        self.opt_state = _opt_state(gossip.optimizer)
        self.clock, self.loss = gossip.node.clock, gossip.node.loss

    def check(self) -> None:
        g = self.gossip
        assert g.state is self.state
        assert np.array_equal(_flat(g), self.model)
        assert g.optimizer is self.optimizer
        assert _same_opt_state(_opt_state(g.optimizer), self.opt_state)
        assert (g.node.clock, g.node.loss) == (self.clock, self.loss)


# --- crafting files ------------------------------------------------------------------------


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any], payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + payload


def _with_metadata(data: bytes, **changes: str | None) -> bytes:
    header, payload = _split(data)
    meta = header["__metadata__"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return _join(header, payload)


def _resave(data: bytes, **tensors: np.ndarray | None) -> bytes:
    """The same metadata over other tensors (None drops one), written by safetensors itself."""
    header, payload = _split(data)
    arrays = safetensors.numpy.load(data)
    for name, value in tensors.items():
        if value is None:
            arrays.pop(name, None)
        else:
            arrays[name] = value
    return bytes(st_save(arrays, metadata=header["__metadata__"]))


def _nan_model(data: bytes) -> bytes:
    model = safetensors.numpy.load(data)["model"].copy()
    model[3] = np.nan
    return _resave(data, model=model)


def _inf_model(data: bytes) -> bytes:
    model = safetensors.numpy.load(data)["model"].copy()
    model[-1] = -np.inf
    return _resave(data, model=model)


def _raw_header(data: bytes, header_bytes: bytes) -> bytes:
    _, payload = _split(data)
    return len(header_bytes).to_bytes(8, "little") + header_bytes + payload


def _overlapping_offsets(data: bytes) -> bytes:
    header, payload = _split(data)
    header["model"]["data_offsets"] = [4, 4 + 4 * header["model"]["shape"][0]]
    return _join(header, payload)


def _no_metadata(data: bytes) -> bytes:
    header, payload = _split(data)
    del header["__metadata__"]
    return _join(header, payload)


def _non_string_metadata(data: bytes) -> bytes:
    header, payload = _split(data)
    header["__metadata__"]["clock"] = 12.0
    return _join(header, payload)


HOSTILE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda d: b"", "too short"),
    "4 bytes": (lambda d: d[:4], "too short"),
    "truncated header": (lambda d: d[:40], "truncated"),
    "truncated tensor": (lambda d: d[:-10], "truncated or damaged"),
    "one byte more": (lambda d: d + b"\0", "truncated or damaged"),
    "header length 2**62": (lambda d: (2**62).to_bytes(8, "little") + d[8:], "more than 1048576"),
    "header over 1 MiB": (
        lambda d: (MAX_HEADER + 8).to_bytes(8, "little") + d[8:],
        "more than 1048576",
    ),
    "header not json": (lambda d: _raw_header(d, b"{not json" + b" " * 7), "not valid JSON"),
    "header a list": (lambda d: _raw_header(d, b"[1, 2, 3]       "), "not a JSON object"),
    "header not utf-8": (lambda d: _raw_header(d, b"\xff\xfe" + b" " * 6), "not valid JSON"),
    "no metadata": (_no_metadata, "no dpwa metadata"),
    "wrong format": (lambda d: _with_metadata(d, format="someone.else"), "not a dpwa checkpoint"),
    "no format": (lambda d: _with_metadata(d, format=None), "not a dpwa checkpoint"),
    "version 2": (lambda d: _with_metadata(d, version="2"), "version '2'"),
    "missing node": (lambda d: _with_metadata(d, node=None), "lacks node"),
    "empty node": (lambda d: _with_metadata(d, node=""), "must not be empty"),
    "missing clock": (lambda d: _with_metadata(d, clock=None), "lacks clock"),
    "clock not a number": (
        lambda d: _with_metadata(d, clock="twelve"),
        "clock is 'twelve', not a number",
    ),
    "clock nan": (lambda d: _with_metadata(d, clock="nan"), "clock is nan"),
    "clock inf": (lambda d: _with_metadata(d, clock="inf"), "clock is inf"),
    "clock negative": (lambda d: _with_metadata(d, clock="-1.0"), "must be >= 0"),
    "loss not a number": (lambda d: _with_metadata(d, loss="0x1p-3q"), "loss is .*not a number"),
    "loss inf": (lambda d: _with_metadata(d, loss="-inf"), "loss is -inf"),
    "metadata not a string": (_non_string_metadata, "'clock' must be a string"),
    "metadata too long": (
        lambda d: _with_metadata(d, framework="x" * 5000),
        "'framework' must be a string",
    ),
    "model size not a count": (lambda d: _with_metadata(d, model_size="-15"), "expected a count"),
    "model size not ascii": (
        lambda d: _with_metadata(d, model_size="\uff18\uff13"),
        "expected a count",
    ),
    "model hash not hex": (
        lambda d: _with_metadata(d, model_shape_hash="zz" * 8),
        "expected a count",
    ),
    "other model hash": (
        lambda d: _with_metadata(d, model_shape_hash="0123456789abcdef"),
        "another model",
    ),
    "NaN in the model": (_nan_model, "model has 1 values that are NaN"),
    "Inf in the model": (_inf_model, "model has 1 values that are NaN"),
    "model float64": (
        lambda d: _resave(d, model=safetensors.numpy.load(d)["model"].astype(np.float64)),
        "F64, not float32",
    ),
    "model 2-D": (
        lambda d: _resave(d, model=safetensors.numpy.load(d)["model"].reshape(1, -1)),
        "shape \\[1, 83\\]",
    ),
    "model shorter": (
        lambda d: _resave(d, model=safetensors.numpy.load(d)["model"][:-1].copy()),
        "shape \\[82\\]",
    ),
    "missing model tensor": (
        lambda d: _resave(d, model=None, other=np.zeros(3, np.float32)),
        "tensors \\['other'\\]",
    ),
    "extra tensor": (
        lambda d: _resave(d, extra=np.zeros(3, np.float32)),
        "tensors \\['extra', 'model'\\]",
    ),
    "overlapping offsets": (_overlapping_offsets, "not a valid safetensors file"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_damaged_or_hostile_file_is_refused_and_changes_nothing(
    trained: Any, tmp_path: Path, name: str
) -> None:
    good = checkpoint.save(trained, tmp_path / "w1.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(HOSTILE[name][0](good))
    _train(trained, trained.state, None, 1, seed=7)  # the node moves on from the saved state
    unchanged = Unchanged(trained)
    with pytest.raises(CheckpointError, match=HOSTILE[name][1]) as info:
        checkpoint.load(trained, bad)
    assert str(info.value).startswith(str(bad))
    unchanged.check()
    checkpoint.load(trained, tmp_path / "w1.safetensors")  # the good file still loads


def test_missing_file_and_folder_are_refused(trained: Any, tmp_path: Path) -> None:
    unchanged = Unchanged(trained)
    for path in (tmp_path / "absent.safetensors", tmp_path):
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            checkpoint.load(trained, path)
    unchanged.check()


def test_model_round_trip_is_bit_identical_with_clock_and_loss(
    trained: Any, config: dict[str, Any], tmp_path: Path
) -> None:
    path = checkpoint.save(trained, str(tmp_path / "w1.safetensors"))
    assert isinstance(path, Path) and path.exists()
    saved, clock, loss = _flat(trained), trained.node.clock, trained.node.loss
    assert clock == 80 and math.isfinite(loss)
    assert [p.name for p in tmp_path.iterdir()] == ["w1.safetensors"]  # no temp file left
    trained.close()
    fresh = _model(99)
    with dpwa_core.connect(fresh, config, "w1") as resumed:
        assert not np.array_equal(_flat(resumed), saved)
        info = checkpoint.load(resumed, path)
        assert np.array_equal(_flat(resumed), saved)
        assert resumed.state is fresh  # PyTorch: written in place
        assert (resumed.node.clock, resumed.node.loss) == (clock, loss)
        assert info.node == "w1" and info.clock == clock and info.loss == loss
        assert info.framework == "torch" and info.path == path
        assert not info.has_optimizer and not info.optimizer_loaded
        assert "tensors" in info.model
        _train(resumed, fresh, None, 1, seed=3)  # training goes on from there
        assert resumed.node.clock == clock + 16


def test_the_file_is_plain_safetensors(trained: Any, tmp_path: Path) -> None:
    path = checkpoint.save(trained, tmp_path / "w1.safetensors")
    with safetensors.safe_open(str(path), framework="np") as f:
        assert list(f.keys()) == ["model"]
        meta = f.metadata()
        model = f.get_tensor("model")
    assert model.dtype == np.float32 and np.array_equal(model, _flat(trained))
    assert meta["format"] == checkpoint.FORMAT and meta["version"] == str(checkpoint.VERSION)
    assert meta["node"] == "w1" and meta["framework"] == "torch"
    assert float(meta["clock"]) == trained.node.clock
    assert float(meta["loss"]) == trained.node.loss
    layout = trained.adapter.layout(trained.state)
    assert int(meta["model_size"]) == layout.size
    assert int(meta["model_shape_hash"], 16) == layout.shape_hash
    assert "optimizer_kind" not in meta
    if os.name == "posix":
        assert path.stat().st_mode & 0o077 == 0  # the owner's only
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len < 4096  # far below MAX_HEADER


def test_another_nodes_checkpoint_needs_name_check_false(
    trained: Any, config: dict[str, Any], tmp_path: Path
) -> None:
    path = checkpoint.save(trained, tmp_path / "w1.safetensors")
    saved = _flat(trained)
    with dpwa_core.connect(_model(5), config, "w2") as other:
        unchanged = Unchanged(other)
        with pytest.raises(CheckpointError, match="'w1'.*'w2'.*name_check=False"):
            checkpoint.load(other, path)
        unchanged.check()
        info = checkpoint.load(other, path, name_check=False)
        assert info.node == "w1" and np.array_equal(_flat(other), saved)


def test_another_model_is_refused_naming_both_layouts(
    trained: Any, config: dict[str, Any], tmp_path: Path
) -> None:
    path = checkpoint.save(trained, tmp_path / "w1.safetensors")
    trained.close()
    wider = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    with dpwa_core.connect(wider, config, "w1") as other:
        unchanged = Unchanged(other)
        with pytest.raises(CheckpointError, match=r"another model.*83 elements.*93 elements"):
            checkpoint.load(other, path)
        unchanged.check()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    trained: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = checkpoint.save(trained, tmp_path / "w1.safetensors")
    old = path.read_bytes()
    _train(trained, trained.state, None, 2, seed=4)

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CheckpointError, match="No space left"):
        checkpoint.save(trained, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["w1.safetensors"]

    def interrupted_fsync(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(trained, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["w1.safetensors"]
    with pytest.raises(CheckpointError, match="cannot write"):
        checkpoint.save(trained, tmp_path / "no-such-folder" / "w1.safetensors")
    checkpoint.save(trained, path)
    assert path.read_bytes() != old


def test_a_diverged_model_is_not_saved_over_a_good_checkpoint(trained: Any, tmp_path: Path) -> None:
    path = checkpoint.save(trained, tmp_path / "w1.safetensors")
    old = path.read_bytes()
    with torch.no_grad():
        next(trained.state.parameters())[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        checkpoint.save(trained, path)
    assert path.read_bytes() == old
    with torch.no_grad():
        next(trained.state.parameters())[0, 0] = 0.0
    trained.node.loss = float("inf")
    with pytest.raises(CheckpointError, match="loss"):
        checkpoint.save(trained, path)
    assert path.read_bytes() == old


# --- optimizer state -------------------------------------------------------------------------


def _trained_with(config: dict[str, Any], kind: str, seed: int, steps: int) -> tuple[Any, Any]:
    model = _model(seed)
    optimizer = OPTIMIZERS[kind](model.parameters())
    gossip = dpwa_core.connect(model, config, "w1", optimizer=optimizer)
    _train(gossip, model, optimizer, steps, seed=seed + 1)
    return gossip, optimizer


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_model_and_optimizer_round_trip_bit_identical(
    config: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    gossip, optimizer = _trained_with(config, kind, seed=0, steps=6)
    with gossip:
        path = checkpoint.save(gossip, tmp_path / "w1.safetensors")
        model, state = _flat(gossip), _opt_state(optimizer)
        clock, loss = gossip.node.clock, gossip.node.loss
    with safetensors.safe_open(str(path), framework="np") as f:
        assert sorted(f.keys()) == ["model", "optimizer"]
        assert f.metadata()["optimizer_kind"]
    # A fresh model and optimizer, one step on them (torch builds optimizer state lazily).
    resumed, fresh_opt = _trained_with(config, kind, seed=50, steps=1)
    with resumed:
        assert not _same_opt_state(_opt_state(fresh_opt), state)
        info = checkpoint.load(resumed, path)
        assert info.has_optimizer and info.optimizer_loaded and info.optimizer
        assert resumed.optimizer is fresh_opt  # torch: written in place
        assert np.array_equal(_flat(resumed), model)
        assert _same_opt_state(_opt_state(fresh_opt), state)
        assert (resumed.node.clock, resumed.node.loss) == (clock, loss)


def test_another_optimizer_is_refused_naming_both(config: dict[str, Any], tmp_path: Path) -> None:
    gossip, _ = _trained_with(config, "sgd-momentum", seed=0, steps=2)
    with gossip:
        path = checkpoint.save(gossip, tmp_path / "w1.safetensors")
    other, _ = _trained_with(config, "adam", seed=1, steps=1)
    with other:
        unchanged = Unchanged(other)
        with pytest.raises(CheckpointError, match=r"another optimizer.*SGD.*Adam"):
            checkpoint.load(other, path)
        unchanged.check()


def test_hostile_optimizer_tensor_is_refused(config: dict[str, Any], tmp_path: Path) -> None:
    gossip, _ = _trained_with(config, "adam", seed=0, steps=2)
    with gossip:
        good = checkpoint.save(gossip, tmp_path / "w1.safetensors").read_bytes()
        opt = safetensors.numpy.load(good)["optimizer"].copy()
        bad_values = opt.copy()
        bad_values[0] = np.inf
        cases = {
            "NaN or infinite": _resave(good, optimizer=bad_values),
            r"shape \[\d+\], expected": _resave(good, optimizer=opt[:-1].copy()),
            r"expected \['model', 'optimizer'\]": _resave(good, optimizer=None),
            "another optimizer": _with_metadata(good, optimizer_shape_hash="0123456789abcdef"),
            "lacks optimizer_size": _with_metadata(good, optimizer_size=None),
        }
        _train(gossip, gossip.state, gossip.optimizer, 1, seed=9)
        unchanged = Unchanged(gossip)
        for i, (pattern, data) in enumerate(cases.items()):
            bad = tmp_path / f"bad{i}.safetensors"
            bad.write_bytes(data)
            with pytest.raises(CheckpointError, match=pattern):
                checkpoint.load(gossip, bad)
            unchanged.check()


def test_a_node_without_optimizer_loads_only_the_model(
    config: dict[str, Any], tmp_path: Path
) -> None:
    gossip, _ = _trained_with(config, "adam", seed=0, steps=2)
    with gossip:
        path = checkpoint.save(gossip, tmp_path / "w1.safetensors")
        model = _flat(gossip)
    with dpwa_core.connect(_model(3), config, "w1") as plain:
        info = checkpoint.load(plain, path)
        assert info.has_optimizer and not info.optimizer_loaded
        assert plain.optimizer is None and np.array_equal(_flat(plain), model)


# --- Keras and JAX ---------------------------------------------------------------------------


def _keras_mlp(keras: Any) -> Any:
    layers = keras.layers
    return keras.Sequential(
        [keras.Input((6,)), layers.Dense(8, activation="tanh"), layers.Dense(3)]
    )


def test_a_torch_checkpoints_model_loads_into_keras(
    trained: Any, config: dict[str, Any], tmp_path: Path
) -> None:
    """The model layout is canonical, so the model crosses frameworks (optimizer state cannot)."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    path = checkpoint.save(trained, tmp_path / "w1.safetensors")
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    with torch.no_grad():
        expected = trained.state(torch.from_numpy(x)).numpy()
    trained.close()
    model = _keras_mlp(keras)
    with dpwa_core.connect(model, config, "w1", framework="keras") as other:
        info = checkpoint.load(other, path)
        assert info.framework == "torch"
        assert (other.node.clock, other.node.loss) == (info.clock, info.loss)
        np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-5)


def test_keras_model_and_optimizer_round_trip(config: dict[str, Any], tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)

    def trained_keras(seed: int, steps: int) -> tuple[Any, Any]:
        keras.utils.set_random_seed(seed)
        model = _keras_mlp(keras)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        gossip = dpwa_core.connect(model, config, "w1", optimizer=model.optimizer)
        for _ in range(steps):
            x = rng.standard_normal((16, 6)).astype(np.float32)
            loss = model.train_on_batch(x, x[:, :3])
            gossip.step(float(np.asarray(loss).ravel()[0]), samples=16)
        return gossip, model

    gossip, model = trained_keras(0, 4)
    with gossip:
        path = checkpoint.save(gossip, tmp_path / "w1.safetensors")
        weights = [np.array(w) for w in model.get_weights()]
        opt_vars = [v.numpy() for v in model.optimizer.variables]
        clock, loss = gossip.node.clock, gossip.node.loss
    resumed, fresh = trained_keras(7, 1)  # Keras builds its optimizer's variables lazily too
    with resumed:
        info = checkpoint.load(resumed, path)
        assert info.optimizer_loaded and resumed.optimizer is fresh.optimizer
        for a, b in zip(fresh.get_weights(), weights, strict=True):
            assert np.array_equal(np.asarray(a), b)
        for a, b in zip([v.numpy() for v in fresh.optimizer.variables], opt_vars, strict=True):
            assert np.asarray(a).dtype == b.dtype and np.array_equal(np.asarray(a), b)
        assert (resumed.node.clock, resumed.node.loss) == (clock, loss)


def test_jax_params_and_optax_state_round_trip(config: dict[str, Any], tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    tx = optax.adam(0.01)

    def loss_fn(params: Any, x: Any) -> Any:
        return jnp.mean((jnp.tanh(x @ params["kernel"] + params["bias"]) - 0.5) ** 2)

    def trained_jax(seed: int, steps: int) -> tuple[Any, Any]:
        key = jax.random.PRNGKey(seed)
        params = {"kernel": jax.random.normal(key, (6, 3)), "bias": jnp.zeros(3)}
        opt_state = tx.init(params)
        gossip = dpwa_core.connect(params, config, "w1", framework="jax", optimizer=opt_state)
        for i in range(steps):
            x = jax.random.normal(jax.random.PRNGKey(100 + i), (16, 6))
            loss, grads = jax.value_and_grad(loss_fn)(gossip.state, x)
            updates, opt_state = tx.update(grads, gossip.optimizer, gossip.state)
            params = optax.apply_updates(gossip.state, updates)
            gossip.step(float(loss), params, samples=16, optimizer=opt_state)
        return gossip, tx

    def leaves(tree: Any) -> list[np.ndarray]:
        return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]

    gossip, _ = trained_jax(0, 4)
    with gossip:
        path = checkpoint.save(gossip, tmp_path / "w1.safetensors")
        params, opt_state = leaves(gossip.state), leaves(gossip.optimizer)
        clock, loss = gossip.node.clock, gossip.node.loss
    resumed, _ = trained_jax(5, 0)  # optax state exists from init: no step needed
    with resumed:
        info = checkpoint.load(resumed, path)
        assert info.optimizer_loaded and info.framework == "jax"
        for a, b in zip(leaves(resumed.state), params, strict=True):
            assert np.array_equal(a, b)
        for a, b in zip(leaves(resumed.optimizer), opt_state, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        assert (resumed.node.clock, resumed.node.loss) == (clock, loss)


def test_an_optimizer_write_refused_after_the_model_puts_the_model_back(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checks only the adapter can make (Keras's integer counters) come after the model's write."""
    gossip, _ = _trained_with(config, "adam", seed=0, steps=2)
    with gossip:
        path = checkpoint.save(gossip, tmp_path / "w1.safetensors")
        _train(gossip, gossip.state, gossip.optimizer, 2, seed=9)
        unchanged = Unchanged(gossip)

        def refuse(optimizer: Any, state: Any, flat: np.ndarray) -> Any:
            assert not np.array_equal(_flat(gossip), unchanged.model)  # the model was written
            raise dpwa_core.AdapterError("a counter is not a whole number")

        monkeypatch.setattr(gossip.adapter, "optimizer_from_flat", refuse)
        with pytest.raises(CheckpointError, match="optimizer state was refused.*whole number"):
            checkpoint.load(gossip, path)
        unchanged.check()


def test_an_optimizer_without_state_yet_is_refused_on_save_and_load(
    config: dict[str, Any], tmp_path: Path
) -> None:
    gossip, _ = _trained_with(config, "adam", seed=0, steps=2)
    with gossip:
        path = checkpoint.save(gossip, tmp_path / "w1.safetensors")
    model = _model(1)
    optimizer = OPTIMIZERS["adam"](model.parameters())  # no step taken: no state yet
    with dpwa_core.connect(model, config, "w1", optimizer=optimizer) as fresh:
        unchanged = Unchanged(fresh)
        with pytest.raises(CheckpointError, match="optimizer layout.*nothing was loaded"):
            checkpoint.load(fresh, path)
        unchanged.check()
        with pytest.raises(CheckpointError, match="cannot save the optimizer's state"):
            checkpoint.save(fresh, tmp_path / "early.safetensors")
        assert not (tmp_path / "early.safetensors").exists()


def test_torch_optimizer_state_does_not_load_into_keras(
    config: dict[str, Any], tmp_path: Path
) -> None:
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    gossip, _ = _trained_with(config, "adam", seed=0, steps=2)
    with gossip:
        path = checkpoint.save(gossip, tmp_path / "w1.safetensors")
    model = _keras_mlp(keras)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x = np.zeros((4, 6), np.float32)
    model.train_on_batch(x, x[:, :3])
    with dpwa_core.connect(model, config, "w1", optimizer=model.optimizer) as other:
        weights, clock = _flat(other), other.node.clock
        opt_vars = [v.numpy() for v in model.optimizer.variables]
        with pytest.raises(CheckpointError, match=r"another optimizer.*torch.*keras"):
            checkpoint.load(other, path)
        assert other.state is model and other.optimizer is model.optimizer
        assert np.array_equal(_flat(other), weights) and other.node.clock == clock
        for a, b in zip([v.numpy() for v in model.optimizer.variables], opt_vars, strict=True):
            assert np.array_equal(a, b)
