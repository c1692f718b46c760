"""The PyTorch adapter, on real torch models.

Shapes are dpwa's canonical ones (docs/LAYOUT.md): a Linear weight packs as ``(in, out)``, a
Conv2d weight as HWIO, everything else as torch stores it.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from dpwa_torch import TorchAdapter  # noqa: E402

from dpwa_core.adapters import detect_adapter, get_adapter  # noqa: E402
from dpwa_core.errors import AdapterError  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def adapter() -> TorchAdapter:
    found = get_adapter("torch")
    assert isinstance(found, TorchAdapter)
    return found


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


CONV_BN_SHAPES = (
    (3, 3, 3, 4),  # conv weight, HWIO (torch stores OIHW)
    (4,),  # conv bias
    (4,),  # bn weight
    (4,),  # bn bias
    (4,),  # bn running_mean
    (4,),  # bn running_var  (num_batches_tracked is an integer: left out)
    (4, 2),  # linear weight, (in, out) (torch stores (out, in))
    (2,),  # linear bias
)


class TiedLM(nn.Module):
    """An embedding whose matrix is reused as the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embed(tokens)))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def canonical(model: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    """A state_dict entry in the canonical layout, spelled out per layer type."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr == "weight" and isinstance(owner, nn.Linear):
        return value.t()
    if attr == "weight" and isinstance(owner, nn.Conv1d):
        return value.permute(2, 1, 0)
    if attr == "weight" and isinstance(owner, nn.Conv2d):
        return value.permute(2, 3, 1, 0)
    return value


def reference_flat(model: nn.Module) -> np.ndarray:
    """What the buffer must hold, built independently of the adapter."""
    parts, seen = [], set()
    for key, value in model.state_dict(keep_vars=True).items():
        if value.is_floating_point() and id(value) not in seen:
            seen.add(id(value))
            value = canonical(model, key, value.detach())
            parts.append(value.to("cpu", torch.float64).contiguous().reshape(-1).numpy())
    return np.concatenate(parts).astype(np.float32)


def random_flat(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(size).astype(np.float32)


# --- layout: what goes into the buffer, in which order -------------------------------------


def test_mlp_layout_and_values(adapter: TorchAdapter) -> None:
    model = mlp()
    assert adapter.layout(model).shapes == ((5, 8), (8,), (8, 3), (3,))
    flat = adapter.to_flat(model)
    assert flat.dtype == np.float32 and flat.ndim == 1 and flat.flags.c_contiguous
    np.testing.assert_array_equal(flat, reference_flat(model))
    # (in, out): the first 8 numbers are the weights from input 0 to each of the 8 outputs.
    np.testing.assert_array_equal(flat[:8], model[0].weight.detach().numpy()[:, 0])
    np.testing.assert_array_equal(flat[:40], model[0].weight.detach().numpy().T.ravel())


def test_conv_batchnorm_layout_includes_running_stats(adapter: TorchAdapter) -> None:
    model = conv_bn()
    model(torch.randn(2, 3, 5, 5))  # training mode: moves the running statistics
    assert adapter.layout(model).shapes == CONV_BN_SHAPES
    flat = adapter.to_flat(model)
    bn = model[1]
    np.testing.assert_array_equal(flat[120:124], bn.running_mean.numpy())
    np.testing.assert_array_equal(flat[124:128], bn.running_var.numpy())
    flat[120:128] = np.arange(8, dtype=np.float32)
    adapter.from_flat(model, flat)
    np.testing.assert_array_equal(bn.running_mean.numpy(), [0, 1, 2, 3])
    np.testing.assert_array_equal(bn.running_var.numpy(), [4, 5, 6, 7])
    assert bn.num_batches_tracked.item() == 1


def test_tied_weights_are_stored_once(adapter: TorchAdapter) -> None:
    model = TiedLM()
    assert adapter.layout(model).shapes == ((10, 4), (4, 4), (4,))
    flat = random_flat(adapter.layout(model).size)
    adapter.from_flat(model, flat)
    expected = torch.from_numpy(flat[:40].reshape(10, 4))
    assert torch.equal(model.embed.weight, expected)
    assert model.head.weight is model.embed.weight


def test_module_used_twice_is_stored_once(adapter: TorchAdapter) -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert adapter.layout(model).shapes == ((3, 3), (3,))
    # Empty tensors have no memory to compare, so identity must catch the repeat.
    holder = nn.Module()
    holder.empty = nn.Parameter(torch.empty(0, 2))
    assert adapter.layout(nn.Sequential(holder, holder)).shapes == ((0, 2),)


def test_weights_tied_through_data_are_stored_once(adapter: TorchAdapter) -> None:
    first, second = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    second.weight.data = first.weight.data  # two Parameter objects, one storage
    assert adapter.layout(nn.Sequential(first, second)).shapes == ((3, 3),)


def test_conv_weights_are_hwio_and_write_back(adapter: TorchAdapter) -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, (4, 5)), nn.Conv1d(3, 6, 2))
    assert adapter.layout(model).shapes == ((4, 5, 2, 3), (3,), (2, 3, 6), (6,))
    flat = adapter.to_flat(model)
    weight = model[0].weight.detach().numpy()
    np.testing.assert_array_equal(flat[:120].reshape(4, 5, 2, 3), weight.transpose(2, 3, 1, 0))
    new = random_flat(flat.size)
    adapter.from_flat(model, new)
    np.testing.assert_array_equal(
        model[0].weight.detach().numpy(), new[:120].reshape(4, 5, 2, 3).transpose(3, 2, 0, 1)
    )
    assert model[0].weight.is_contiguous()  # written in place, torch's own strides kept
    np.testing.assert_array_equal(adapter.to_flat(model), new)


def test_transposed_convolutions_keep_torch_shapes(adapter: TorchAdapter) -> None:
    model = nn.ConvTranspose2d(2, 3, 4)
    assert adapter.layout(model).shapes == ((2, 3, 4, 4), (3,))


def test_embedding_layout(adapter: TorchAdapter) -> None:
    model = nn.Embedding(7, 3)
    assert adapter.layout(model).shapes == ((7, 3),)
    np.testing.assert_array_equal(adapter.to_flat(model), model.weight.detach().numpy().ravel())


def test_order_is_creation_order_not_name_order(adapter: TorchAdapter) -> None:
    model = nn.Sequential()
    for index in range(1, 13):
        model.add_module(f"layer{index}", nn.Linear(index, index + 1))
    expected = []
    for index in range(1, 13):
        expected += [(index, index + 1), (index + 1,)]
    assert adapter.layout(model).shapes == tuple(expected)
    assert sorted(model.state_dict()) != list(model.state_dict())  # the names sort differently

    class ZetaFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.zeta = nn.Linear(2, 3, bias=False)
            self.alpha = nn.Linear(3, 4, bias=False)

    assert adapter.layout(ZetaFirst()).shapes == ((2, 3), (3, 4))


def test_scalar_and_non_contiguous_parameters(adapter: TorchAdapter) -> None:
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(2.5))
    model.transposed = nn.Parameter(torch.randn(3, 4).t())  # a strided view, shape (4, 3)
    assert not model.transposed.is_contiguous()
    assert adapter.layout(model).shapes == ((), (4, 3))
    np.testing.assert_array_equal(adapter.to_flat(model), reference_flat(model))
    flat = random_flat(13)
    adapter.from_flat(model, flat)
    assert model.scale.item() == flat[0]
    np.testing.assert_array_equal(model.transposed.detach().numpy(), flat[1:].reshape(4, 3))


def test_meta_tensors_are_rejected(adapter: TorchAdapter) -> None:
    with pytest.raises(AdapterError, match="meta device"):
        adapter.to_flat(nn.Linear(2, 2, device="meta"))


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [mlp, conv_bn, TiedLM, lambda: nn.Embedding(7, 3)])
def test_round_trip_sets_exactly_the_given_values(
    adapter: TorchAdapter, build: Callable[[], nn.Module]
) -> None:
    model = build()
    size = adapter.layout(model).size
    flat = adapter.to_flat(model)
    assert flat.size == size
    new = flat * 2 + random_flat(size)
    assert adapter.from_flat(model, new) is model
    np.testing.assert_array_equal(adapter.to_flat(model), new)
    np.testing.assert_array_equal(reference_flat(model), new)


def test_out_buffer_is_filled_in_place(adapter: TorchAdapter) -> None:
    model = conv_bn()
    out = np.full(adapter.layout(model).size, np.nan, dtype=np.float32)
    result = adapter.to_flat(model, out=out)
    assert result is out
    np.testing.assert_array_equal(out, reference_flat(model))
    # A view into a bigger buffer (e.g. a wire frame after its header) works too.
    frame = np.zeros(out.size + 4, dtype=np.float32)
    view = frame[4:]
    assert np.shares_memory(adapter.to_flat(model, out=view), frame)
    np.testing.assert_array_equal(frame[4:], out)


def test_bad_out_buffers_are_rejected(adapter: TorchAdapter) -> None:
    model = mlp()
    size = adapter.layout(model).size
    for out in (
        np.zeros(size + 1, np.float32),
        np.zeros(size, np.float64),
        np.zeros((1, size), np.float32),
        np.zeros(2 * size, np.float32)[::2],
        np.frombuffer(bytes(4 * size), np.float32),
    ):
        with pytest.raises(AdapterError):
            adapter.to_flat(model, out=out)


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # about one unit in the last place of each dtype (float64 models hand back float32 values)
    [(torch.float16, 1e-3), (torch.bfloat16, 8e-3), (torch.float64, 1e-7)],
)
def test_other_float_dtypes_round_trip(
    adapter: TorchAdapter, dtype: torch.dtype, rtol: float
) -> None:
    model = conv_bn().to(dtype)
    flat = adapter.to_flat(model)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, reference_flat(model))
    new = random_flat(flat.size)
    adapter.from_flat(model, new)
    assert all(p.dtype == dtype for p in model.parameters())
    if dtype == torch.float64:
        np.testing.assert_array_equal(adapter.to_flat(model), new)
    else:
        np.testing.assert_allclose(adapter.to_flat(model), new, rtol=rtol, atol=1e-6)
    new = adapter.to_flat(model)
    peer = random_flat(flat.size, seed=2)
    adapter.interpolate(model, peer, 0.25)
    assert all(p.dtype == dtype for p in model.parameters())
    expected = 0.75 * new.astype(np.float64) + 0.25 * peer
    np.testing.assert_allclose(adapter.to_flat(model), expected, rtol=rtol, atol=rtol)


def test_copying_weights_reproduces_outputs(adapter: TorchAdapter) -> None:
    source, target = conv_bn(), conv_bn()
    source(torch.randn(8, 3, 5, 5))  # non-trivial running statistics
    source.eval()
    target.eval()
    inputs = torch.randn(4, 3, 5, 5)
    assert not torch.equal(source(inputs), target(inputs))
    adapter.from_flat(target, adapter.to_flat(source))
    with torch.no_grad():
        assert torch.equal(source(inputs), target(inputs))

    lm_source, lm_target = TiedLM(), TiedLM()
    tokens = torch.tensor([[1, 2, 9]])
    adapter.from_flat(lm_target, adapter.to_flat(lm_source))
    with torch.no_grad():
        assert torch.equal(lm_source(tokens), lm_target(tokens))


def test_parameters_keep_requires_grad_and_train_afterwards(adapter: TorchAdapter) -> None:
    model = mlp()
    adapter.from_flat(model, random_flat(adapter.layout(model).size))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# --- validation: nothing is written when the input is wrong ------------------------------------


def _bad_flats(size: int) -> list[object]:
    return [
        np.zeros(size - 1, np.float32),
        np.zeros(size + 1, np.float32),
        np.zeros(size, np.float64),
        np.zeros(size, ">f4"),
        np.zeros((1, size), np.float32),
        np.zeros((size, 1), np.float32),
        [0.0] * size,
    ]


def test_bad_flat_raises_and_leaves_model_unchanged(adapter: TorchAdapter) -> None:
    model = conv_bn()
    before = snapshot(model)
    for flat in _bad_flats(adapter.layout(model).size):
        with pytest.raises(AdapterError):
            adapter.from_flat(model, flat)  # type: ignore[arg-type]
        assert_unchanged(model, before)


def test_bad_peer_or_factor_raises_and_leaves_model_unchanged(adapter: TorchAdapter) -> None:
    model = conv_bn()
    before = snapshot(model)
    size = adapter.layout(model).size
    for peer in _bad_flats(size):
        with pytest.raises(AdapterError):
            adapter.interpolate(model, peer, 0.5)  # type: ignore[arg-type]
        assert_unchanged(model, before)
    for factor in (float("nan"), -0.5, 1.5):
        with pytest.raises(AdapterError, match="factor"):
            adapter.interpolate(model, random_flat(size), factor)
        assert_unchanged(model, before)


def test_error_message_says_what_is_wrong(adapter: TorchAdapter) -> None:
    model = mlp()
    with pytest.raises(AdapterError, match=r"flat has 10 elements but the model has 75"):
        adapter.from_flat(model, np.zeros(10, np.float32))
    with pytest.raises(AdapterError, match=r"dtype float32, got float64"):
        adapter.from_flat(model, np.zeros(75))
    with pytest.raises(AdapterError, match=r"1-D, got shape \(1, 75\)"):
        adapter.from_flat(model, np.zeros((1, 75), np.float32))


# --- interpolate -------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.0, 0.25, 1.0])
def test_interpolate_matches_numpy(adapter: TorchAdapter, factor: float) -> None:
    model = conv_bn()
    model(torch.randn(2, 3, 5, 5))
    local = adapter.to_flat(model)
    peer = random_flat(local.size, seed=3)
    expected = ((1 - factor) * local.astype(np.float64) + factor * peer).astype(np.float32)
    assert adapter.interpolate(model, peer, factor) is model
    result = adapter.to_flat(model)
    if factor in (0.0, 1.0):
        np.testing.assert_array_equal(result, local if factor == 0.0 else peer)
    else:
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)
    assert model[1].num_batches_tracked.item() == 1


def test_interpolate_accepts_a_read_only_peer_without_warnings(adapter: TorchAdapter) -> None:
    model = TiedLM()
    local = adapter.to_flat(model)
    peer = np.frombuffer(random_flat(local.size).tobytes(), dtype=np.float32)
    assert not peer.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.interpolate(model, peer, 0.5)
        np.testing.assert_allclose(adapter.to_flat(model), 0.5 * local + 0.5 * peer, rtol=1e-6)
        adapter.from_flat(model, peer)
    np.testing.assert_array_equal(adapter.to_flat(model), peer)


def test_non_contiguous_flat_is_accepted(adapter: TorchAdapter) -> None:
    model = mlp()
    size = adapter.layout(model).size
    strided = random_flat(2 * size)[::2]
    adapter.from_flat(model, strided)
    np.testing.assert_array_equal(adapter.to_flat(model), strided)


# --- the per-model cache -----------------------------------------------------------------------


def test_plan_is_reused_while_the_model_is_unchanged(adapter: TorchAdapter) -> None:
    model = mlp()
    assert adapter.layout(model) is adapter.layout(model)


def test_replaced_parameter_is_picked_up(adapter: TorchAdapter) -> None:
    model = mlp()
    adapter.to_flat(model)
    model[0].weight = nn.Parameter(torch.full((8, 5), 7.0))
    np.testing.assert_array_equal(adapter.to_flat(model)[:40], np.full(40, 7.0, np.float32))
    flat = random_flat(adapter.layout(model).size)
    adapter.from_flat(model, flat)
    np.testing.assert_array_equal(model[0].weight.detach().numpy().T.ravel(), flat[:40])


def test_replaced_layer_changes_the_layout(adapter: TorchAdapter) -> None:
    model = mlp()
    assert adapter.layout(model).size == 75
    model[2] = nn.Linear(8, 5)
    assert adapter.layout(model).shapes == ((5, 8), (8,), (8, 5), (5,))
    model[0].weight.data = torch.zeros(8, 6)
    assert adapter.layout(model).shapes[0] == (6, 8)


def test_cache_does_not_keep_models_alive(adapter: TorchAdapter) -> None:
    model = mlp()
    adapter.to_flat(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


# --- state_dict input --------------------------------------------------------------------------


def test_state_dict_is_packed_with_its_own_shapes(adapter: TorchAdapter) -> None:
    # A dict does not say which tensor is a Linear or Conv weight: shapes are taken as they are.
    model = conv_bn()
    state = model.state_dict()
    assert adapter.handles(state)
    assert adapter.layout(state).shapes == tuple(
        tuple(v.shape) for v in state.values() if v.is_floating_point()
    )
    assert adapter.layout(state).size == adapter.layout(model).size
    native = np.concatenate([v.numpy().ravel() for v in state.values() if v.is_floating_point()])
    np.testing.assert_array_equal(adapter.to_flat(state), native)
    flat = random_flat(adapter.layout(model).size)
    assert adapter.from_flat(state, flat) is state
    np.testing.assert_array_equal(model[0].weight.detach().numpy().ravel(), flat[:108])
    # Shares the model's memory: the module sees the values, in its canonical order.
    np.testing.assert_array_equal(adapter.to_flat(state), flat)


def test_handles_only_torch_objects(adapter: TorchAdapter) -> None:
    assert adapter.handles(nn.ReLU())
    assert not adapter.handles({})
    assert not adapter.handles({"a": 1.0})
    assert not adapter.handles(torch.zeros(3))
    assert not adapter.handles([1.0])


def test_handles_refuses_modules_that_are_keras_layers(adapter: TorchAdapter) -> None:
    # On Keras's torch backend every keras.Layer is a torch.nn.Module; the real case runs in
    # tests/test_keras_backends.py, this one checks the rule on the class hierarchy.
    keras_layer = type("Layer", (nn.Module,), {"__module__": "keras.src.layers.layer"})
    subclass = type("MyModel", (keras_layer,), {"__module__": "my_project.models"})
    assert not adapter.handles(keras_layer())
    assert not adapter.handles(subclass())
    assert adapter.handles(type("Net", (nn.Module,), {"__module__": "kerasnet"})())
    with pytest.raises(AdapterError, match="torch.nn.Module"):
        adapter.layout({"a": 1.0})


# --- registry ----------------------------------------------------------------------------------


def test_all_names_give_the_same_instance() -> None:
    adapter = get_adapter("torch")
    assert isinstance(adapter, TorchAdapter)
    assert get_adapter("PT") is adapter
    assert get_adapter("pytorch") is adapter
    assert get_adapter(" Torch ") is adapter


def test_detect_picks_torch_for_modules() -> None:
    adapter = get_adapter("torch")
    assert detect_adapter(mlp()) is adapter
    assert detect_adapter(TiedLM()) is adapter
    assert detect_adapter(nn.Linear(2, 2).state_dict()) is adapter


def test_detect_on_plain_object_names_torch_as_tried() -> None:
    with pytest.raises(AdapterError) as info:
        detect_adapter(object())
    message = str(info.value)
    assert "'builtins.object'" in message
    assert "pt/pytorch/torch (dpwa_torch:TorchAdapter)" in message.split("Tried:")[1]
    assert 'framework="..."' in message


def test_dict_that_is_not_a_state_dict_is_not_detected_as_torch() -> None:
    detect_adapter({"w": torch.zeros(2)})  # caches the adapter for the dict type
    with pytest.raises(AdapterError):
        detect_adapter({"w": 1.0})


# --- CUDA --------------------------------------------------------------------------------------


@cuda
def test_cuda_round_trip(adapter: TorchAdapter) -> None:
    model = conv_bn().cuda()
    flat = adapter.to_flat(model)
    np.testing.assert_array_equal(flat, reference_flat(model))
    new = random_flat(flat.size)
    assert adapter.from_flat(model, new) is model
    assert all(p.is_cuda for p in model.parameters())
    np.testing.assert_array_equal(adapter.to_flat(model), new)


@cuda
def test_cuda_half_interpolate(adapter: TorchAdapter) -> None:
    model = mlp().cuda().half()
    local = adapter.to_flat(model)
    peer = random_flat(local.size)
    adapter.interpolate(model, peer, 0.25)
    assert all(p.is_cuda and p.dtype == torch.float16 for p in model.parameters())
    np.testing.assert_allclose(
        adapter.to_flat(model), 0.75 * local + 0.25 * peer, rtol=4e-3, atol=1e-3
    )


@cuda
def test_cuda_outputs_match_after_copy(adapter: TorchAdapter) -> None:
    source, target = conv_bn().cuda().eval(), conv_bn().cuda().eval()
    adapter.from_flat(target, adapter.to_flat(source))
    inputs = torch.randn(2, 3, 5, 5, device="cuda")
    with torch.no_grad():
        # cuDNN may pick different kernels per call; equal weights agree to rounding.
        torch.testing.assert_close(source(inputs), target(inputs))
