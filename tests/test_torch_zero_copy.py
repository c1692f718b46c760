"""Zero-copy PyTorch models: parameters as views into one flat float32 tensor.

``dpwa_torch.flatten_`` (called by ``connect()`` for CPU modules) re-points every float32
parameter and buffer to a strided view of one flat tensor in the canonical layout. These tests
check that the flat tensor is the model, that nothing about training changes, and that a model
whose tensors are moved afterwards falls back to the per-tensor copies with the right numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import dpwa_torch  # noqa: E402
from dpwa_torch import TorchAdapter  # noqa: E402

import dpwa_core  # noqa: E402
from dpwa_core.adapters import get_adapter  # noqa: E402
from dpwa_core.errors import AdapterError  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def adapter() -> TorchAdapter:
    found = get_adapter("torch")
    assert isinstance(found, TorchAdapter)
    return found


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 5),
    )


def convnet(seed: int = 0) -> nn.Module:
    """Convolutions without BatchNorm: a bias before a BatchNorm gets a gradient of ~0 that
    Adam blows up to rounding noise, which no comparison of two layouts survives."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


class TiedLM(nn.Module):
    """An embedding reused as the output projection (the same Parameter object)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embed(tokens)))


def tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]


def inside(tensor: torch.Tensor, flat: torch.Tensor) -> bool:
    start = flat.data_ptr()
    return start <= tensor.data_ptr() < start + 4 * flat.numel()


def random_flat(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(size).astype(np.float32)


# --- the flat tensor is the model ---------------------------------------------------------------


@pytest.mark.parametrize("build", [mlp, cnn, TiedLM])
def test_flat_tensor_is_the_canonical_vector_and_the_model_views_it(
    adapter: TorchAdapter, build: Callable[[], nn.Module]
) -> None:
    model = build()
    copied = adapter.to_flat(model)  # the per-tensor copy path, before flattening
    shapes = {name: (t.shape, t.requires_grad) for name, t in model.named_parameters()}
    flat = dpwa_torch.flatten_(model)
    assert flat.dtype == torch.float32 and flat.dim() == 1 and flat.device.type == "cpu"
    np.testing.assert_array_equal(flat.numpy(), copied)
    np.testing.assert_array_equal(adapter.to_flat(model), copied)
    assert {n: (t.shape, t.requires_grad) for n, t in model.named_parameters()} == shapes
    for tensor in tensors(model):
        assert inside(tensor, flat)
    # Writing the flat tensor writes the model, through the strided views.
    flat.mul_(2)
    np.testing.assert_array_equal(adapter.to_flat(model), 2 * copied)
    assert dpwa_torch.flat_buffer(model) is flat
    assert dpwa_torch.flatten_(model) is flat  # again: the same tensor


def test_linear_and_conv_weights_are_strided_views_of_canonical_slices() -> None:
    model = cnn()
    conv, linear = model[0], model[5]
    conv_weight, linear_weight = conv.weight.detach().clone(), linear.weight.detach().clone()
    flat = dpwa_torch.flatten_(model)
    assert not linear.weight.is_contiguous()
    assert linear.weight.t().is_contiguous()  # (in, out) in memory
    assert conv.weight.permute(2, 3, 1, 0).is_contiguous()  # HWIO in memory
    assert conv.weight.data_ptr() == flat.data_ptr()  # the first tensor in the buffer
    assert torch.equal(conv.weight, conv_weight) and torch.equal(linear.weight, linear_weight)


def test_outputs_are_unchanged_by_flattening() -> None:
    x = torch.randn(4, 3, 8, 8)
    plain, flat = cnn(), cnn()
    dpwa_torch.flatten_(flat)
    plain.eval()
    flat.eval()
    with torch.no_grad():
        torch.testing.assert_close(flat(x), plain(x), rtol=1e-6, atol=1e-6)


def test_tied_parameter_is_one_slice_and_stays_tied(adapter: TorchAdapter) -> None:
    model = TiedLM()
    flat = dpwa_torch.flatten_(model)
    assert model.head.weight is model.embed.weight
    assert flat.numel() == adapter.layout(model).size == 10 * 4 + 4 * 4 + 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    np.testing.assert_array_equal(flat[:40].numpy(), model.embed.weight.detach().reshape(-1))


def test_weights_tied_through_data_stay_tied(adapter: TorchAdapter) -> None:
    model = mlp()
    other = nn.Linear(6, 16)
    other.weight.data = model[0].weight.data  # two Parameter objects, one memory
    model.add_module("alias", other)
    size = adapter.layout(model).size
    flat = dpwa_torch.flatten_(model)
    assert flat.numel() == size
    assert other.weight.data_ptr() == model[0].weight.data_ptr()
    assert inside(other.weight, flat)
    flat.zero_()
    assert not other.weight.detach().any()


def test_batchnorm_running_stats_are_updated_through_the_views(adapter: TorchAdapter) -> None:
    model = cnn()
    flat = dpwa_torch.flatten_(model)
    before = flat.clone()
    model.train()
    model(torch.randn(8, 3, 8, 8) + 3)
    bn = model[1]
    assert inside(bn.running_mean, flat) and inside(bn.running_var, flat)
    assert not torch.equal(flat, before)
    np.testing.assert_array_equal(adapter.to_flat(model), flat.numpy())
    assert bn.running_mean.abs().sum() > 0


# --- training is unchanged ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
        lambda params: torch.optim.Adam(params, lr=1e-2),
    ],
    ids=["sgd-momentum", "adam"],
)
@pytest.mark.parametrize("build", [mlp, convnet])
def test_training_matches_the_unflattened_model(
    adapter: TorchAdapter,
    build: Callable[[], nn.Module],
    make_optimizer: Callable[[Any], Any],
) -> None:
    """Same steps, same data: equal to float32 rounding (matmuls over transposed memory may
    take another BLAS path, so bitwise equality is not promised)."""
    plain, viewed = build(), build()
    plain_opt = make_optimizer(plain.parameters())
    viewed_opt = make_optimizer(viewed.parameters())  # made before flattening, on purpose
    dpwa_torch.flatten_(viewed)
    torch.manual_seed(1)
    if build is mlp:
        batches = [(torch.randn(16, 6), torch.randn(16, 3)) for _ in range(5)]
    else:
        batches = [(torch.randn(8, 3, 8, 8), torch.randn(8, 5)) for _ in range(5)]
    for x, y in batches:
        for model, optimizer in ((plain, plain_opt), (viewed, viewed_opt)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    np.testing.assert_allclose(adapter.to_flat(viewed), adapter.to_flat(plain), rtol=0, atol=1e-6)
    assert dpwa_torch.flat_buffer(viewed) is not None  # the optimizer kept the views


# --- to_flat, from_flat and interpolate on the flat tensor --------------------------------------


def test_from_flat_and_interpolate_match_the_copy_path_bitwise(adapter: TorchAdapter) -> None:
    viewed, plain = cnn(), cnn()
    dpwa_torch.flatten_(viewed)
    peer = random_flat(adapter.layout(plain).size)
    for factor in (0.0, 0.3, 0.5, 0.8, 1.0):
        adapter.interpolate(viewed, peer, factor)
        adapter.interpolate(plain, peer, factor)
        np.testing.assert_array_equal(adapter.to_flat(viewed), adapter.to_flat(plain))
    values = random_flat(peer.size, seed=5)
    adapter.from_flat(viewed, values)
    np.testing.assert_array_equal(adapter.to_flat(viewed), values)
    # A read-only, strided vector (as received) is accepted too.
    doubled = np.repeat(values, 2)[::2]
    doubled.flags.writeable = False
    adapter.from_flat(viewed, doubled)
    np.testing.assert_array_equal(adapter.to_flat(viewed), values)


def test_bad_vectors_leave_the_flattened_model_unchanged(adapter: TorchAdapter) -> None:
    model = mlp()
    flat = dpwa_torch.flatten_(model)
    before = flat.clone()
    size = flat.numel()
    for bad in (np.zeros(size + 1, np.float32), np.zeros(size, np.float64), [0.0] * size):
        with pytest.raises(AdapterError):
            adapter.from_flat(model, bad)  # type: ignore[arg-type]
        with pytest.raises(AdapterError):
            adapter.interpolate(model, bad, 0.5)  # type: ignore[arg-type]
    with pytest.raises(AdapterError, match="factor"):
        adapter.interpolate(model, random_flat(size), 1.5)
    with pytest.raises(AdapterError):
        adapter.to_flat(model, out=np.zeros(size - 1, np.float32))
    assert torch.equal(flat, before)


def test_other_float_dtypes_are_mirrored(adapter: TorchAdapter) -> None:
    model = mlp()
    model.register_buffer("scale", torch.linspace(0, 1, 5, dtype=torch.float64))
    copied = adapter.to_flat(model)
    flat = dpwa_torch.flatten_(model)
    assert model.scale.dtype == torch.float64 and not inside(model.scale, flat)
    np.testing.assert_array_equal(adapter.to_flat(model), copied)
    model.scale.fill_(2.0)  # changed behind the flat tensor's back: to_flat still sees it
    assert (adapter.to_flat(model)[:5] == 2.0).all()  # the root module's buffer comes first
    values = random_flat(copied.size)
    adapter.from_flat(model, values)
    np.testing.assert_array_equal(model.scale.numpy(), values[:5].astype(np.float64))
    adapter.interpolate(model, np.zeros_like(values), 0.5)
    np.testing.assert_array_equal(adapter.to_flat(model), values * np.float32(0.5))


# --- when the views break ------------------------------------------------------------------------


def _reference(model: nn.Module) -> np.ndarray:
    """The canonical vector, spelled out for mlp()."""
    parts = [
        model[0].weight.detach().t(),
        model[0].bias.detach(),
        model[2].weight.detach().t(),
        model[2].bias.detach(),
    ]
    return torch.cat([p.to(torch.float32).reshape(-1) for p in parts]).numpy()


@pytest.mark.parametrize(
    "move",
    [
        lambda model: model.double(),
        lambda model: setattr(model[0].weight, "data", model[0].weight.data.clone()),
        lambda model: model.load_state_dict(
            {k: v.clone() + 1 for k, v in model.state_dict().items()}, assign=True
        ),
        lambda model: model.share_memory(),
    ],
    ids=["double", "data-replaced", "load-assign", "share-memory"],
)
def test_moved_parameters_fall_back_to_copies(
    adapter: TorchAdapter, move: Callable[[nn.Module], object], caplog: pytest.LogCaptureFixture
) -> None:
    model = mlp()
    flat = dpwa_torch.flatten_(model)
    move(model)
    flat.fill_(123.0)  # the old buffer must not be what gets sent
    with caplog.at_level(logging.WARNING, logger="dpwa.torch"):
        np.testing.assert_array_equal(adapter.to_flat(model), _reference(model))
        np.testing.assert_array_equal(adapter.to_flat(model), _reference(model))
    assert len([r for r in caplog.records if "flatten_" in r.getMessage()]) == 1
    assert dpwa_torch.flat_buffer(model) is None
    values = random_flat(flat.numel())
    adapter.from_flat(model, values)
    np.testing.assert_array_equal(_reference(model), values)
    adapter.interpolate(model, np.zeros_like(values), 1.0)
    assert not _reference(model).any()
    # Flattening again restores the fast path.
    if next(model.parameters()).dtype == torch.float32:
        again = dpwa_torch.flatten_(model)
        assert again is not flat and dpwa_torch.flat_buffer(model) is again


def test_in_place_load_state_dict_keeps_the_views(adapter: TorchAdapter) -> None:
    model = mlp()
    flat = dpwa_torch.flatten_(model)
    model.load_state_dict(mlp(seed=3).state_dict())
    assert dpwa_torch.flat_buffer(model) is flat
    np.testing.assert_array_equal(flat.numpy(), _reference(model))


def test_partly_overlapping_tensors_are_not_flattened(adapter: TorchAdapter) -> None:
    model = nn.Module()
    base = torch.zeros(10)
    model.register_buffer("whole", base)
    model.register_buffer("part", base[2:6])
    assert "share memory" in (dpwa_torch._flat.why_not(model) or "")
    with pytest.raises(AdapterError, match="share memory"):
        dpwa_torch.flatten_(model)
    assert adapter.prepare(model) is model
    assert dpwa_torch.flat_buffer(model) is None
    assert model.part.data_ptr() == base.data_ptr() + 8


def test_what_is_not_flattened(adapter: TorchAdapter) -> None:
    half = mlp().half()
    with pytest.raises(AdapterError, match="float32"):
        dpwa_torch.flatten_(half)
    assert adapter.prepare(half) is half and dpwa_torch.flat_buffer(half) is None
    state = mlp().state_dict()
    assert adapter.prepare(state) is state  # a dict is left alone
    model = mlp()
    assert adapter.prepare(model, zero_copy=False) is model
    assert dpwa_torch.flat_buffer(model) is None
    with pytest.raises(AdapterError, match="torch.nn.Module"):
        dpwa_torch.flatten_(state)  # type: ignore[arg-type]


@cuda
def test_cuda_modules_keep_the_copy_path(adapter: TorchAdapter) -> None:
    model = mlp().cuda()
    assert "cuda" in (dpwa_torch._flat.why_not(model) or "")
    assert adapter.prepare(model) is model and dpwa_torch.flat_buffer(model) is None
    values = random_flat(adapter.layout(model).size)
    adapter.from_flat(model, values)
    np.testing.assert_array_equal(adapter.to_flat(model), values)
    # Flattened on the CPU, then moved to the GPU: the copy path takes over.
    moved = mlp()
    dpwa_torch.flatten_(moved)
    moved.cuda()
    adapter.from_flat(moved, values)
    np.testing.assert_array_equal(adapter.to_flat(moved), values)
    assert dpwa_torch.flat_buffer(moved) is None


# --- gossip between two real nodes --------------------------------------------------------------


def test_two_zero_copy_nodes_average_over_loopback(
    adapter: TorchAdapter, make_cluster: Callable[..., dict[str, Any]]
) -> None:
    # Models from different random weights are ~1.4x their norm apart, which robust.clip's
    # warm-up shortens; this test is about the zero-copy blend itself.
    config = make_cluster(2, timeout_ms=5000, robust={"clip": False})
    trainer, peer, plain = mlp(0), mlp(1), mlp(0)
    start, theirs = adapter.to_flat(trainer), adapter.to_flat(peer)
    with (
        dpwa_core.connect(trainer, config, "w1") as gossip,
        dpwa_core.connect(peer, config, "w2") as other,
        dpwa_core.connect(plain, make_cluster(1), "w1", zero_copy=False) as alone,
    ):
        flat = dpwa_torch.flat_buffer(trainer)
        assert flat is not None and dpwa_torch.flat_buffer(peer) is not None
        assert dpwa_torch.flat_buffer(plain) is None
        assert alone.state is plain
        assert gossip.node.wait_for_peers(timeout=30) == 1
        other.update_send(1.0)
        for _ in range(50):  # the peer's server may need a moment to start answering
            gossip.update_send(1.0)
            assert gossip.update_wait(1.0) is trainer
            if gossip.last is not None:
                break
        assert gossip.last is not None and gossip.last.peer == "w2"
    expected = torch.from_numpy(start).lerp_(torch.from_numpy(theirs), 0.5).numpy()
    np.testing.assert_array_equal(adapter.to_flat(trainer), expected)
    assert dpwa_torch.flat_buffer(trainer) is flat
