"""TBN layers in both forms: agreement with the reference, packed == latent, storage, allocations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import reference_tbn
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from hf_tbn import TBNConfig, TBNConv1d, TBNConv2d, TBNLinear, convert_model, tiling
from hf_tbn.convert import tbn_from_dense

FACTORS = [1, 2, 4, 8, 16]
MODES = ["per_tile", "per_layer"]
LAYOUTS = list(tiling.TILE_LAYOUTS)


def dense_layers(p: int, seed: int, layout: str = "output") -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """One dense module of every convertible kind (the dimension ``layout`` splits divisible by p) and an input."""
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, 4, (1,), generator=g))
    torch.manual_seed(seed)
    if layout == "input":  # grouped convolutions are not tiled along their inputs
        return {
            "linear": (nn.Linear(p * k * 3, 19), torch.randn(5, p * k * 3)),
            "conv1d_gpt2": (Conv1D(13, p * k * 2), torch.randn(2, 3, p * k * 2)),
            "conv1d": (nn.Conv1d(p * k, 6, 3, stride=2, padding=1, dilation=2), torch.randn(2, p * k, 17)),
            "conv2d": (nn.Conv2d(p * k * 2, 4, 3, stride=(2, 1), padding=1), torch.randn(2, p * k * 2, 9, 8)),
        }
    return {
        "linear": (nn.Linear(19, p * k * 3), torch.randn(5, 19)),
        "conv1d_gpt2": (Conv1D(p * k * 2, 13), torch.randn(2, 3, 13)),
        "conv1d": (nn.Conv1d(6, p * k, 3, stride=2, padding=1, dilation=2), torch.randn(2, 6, 17)),
        "conv2d": (nn.Conv2d(4, p * k * 2, 3, stride=(2, 1), padding=1), torch.randn(2, 4, 9, 8)),
        "conv2d_groups": (nn.Conv2d(8, 8 * p, (3, 2), padding=(1, 0), groups=2), torch.randn(2, 8, 7, 6)),
    }


def logical(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().T if isinstance(module, Conv1D) else module.weight.detach()


def dense_forward(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The dense module's own forward with ``weight`` (logical orientation) swapped in."""
    with torch.no_grad():
        module.weight.copy_(weight.T if isinstance(module, Conv1D) else weight)
    return module(x)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", FACTORS)
@pytest.mark.parametrize("mode", MODES)
def test_layers_match_reference(p: int, mode: str, layout: str) -> None:
    for kind, (dense, x) in dense_layers(p, seed=p, layout=layout).items():
        ref_t, ref_alpha, ref_w = reference_tbn(logical(dense), p, mode, layout)
        layer = tbn_from_dense(dense, p, mode, kind, tile_layout=layout)
        assert layer.compression_factor == p
        assert torch.equal(layer.tile_values(), ref_t), kind
        assert torch.equal(layer.alpha_values(), ref_alpha), kind
        assert torch.equal(layer.effective_weight().detach(), ref_w), kind
        expected = dense_forward(dense, ref_w, x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)

        layer.pack()
        assert torch.equal(tiling.unpack_bits(layer.tile, layer.tile_length), ref_t), kind
        assert torch.equal(layer.alpha, ref_alpha), kind
        assert torch.equal(layer.effective_weight(), ref_w), kind


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [1, 4, 16])
@pytest.mark.parametrize("mode", MODES)
def test_latent_gradient_matches_reference(p: int, mode: str, layout: str) -> None:
    for kind, (dense, x) in dense_layers(p, seed=10 + p, layout=layout).items():
        layer = tbn_from_dense(dense, p, mode, kind, tile_layout=layout)
        grad_out = torch.randn_like(layer(x))
        (layer(x) * grad_out).sum().backward()

        w = logical(dense).clone().requires_grad_()
        (dense_forward_with_grad(dense, reference_tbn(w, p, mode, layout)[2], x) * grad_out).sum().backward()
        # the latent weight holds the p copies (p, *tile_shape): put each back in place
        grad = torch.cat(list(layer.weight.grad), dim=0 if layout == "output" else 1)
        torch.testing.assert_close(grad, w.grad, rtol=1e-4, atol=1e-6)


def dense_forward_with_grad(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``module``'s functional forward with a differentiable weight in logical orientation."""
    if isinstance(module, Conv1D):
        return torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), weight.T).view(*x.shape[:-1], -1)
    return torch.func.functional_call(module, {"weight": weight}, (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", FACTORS)
@pytest.mark.parametrize("mode", MODES)
def test_packed_forward_equals_latent(p: int, mode: str, layout: str) -> None:
    for kind, (dense, x) in dense_layers(p, seed=20 + p, layout=layout).items():
        layer = tbn_from_dense(dense, p, mode, kind, tile_layout=layout)
        with torch.no_grad():
            latent = layer(x)
            packed = layer.pack()(x)
        rel = (packed - latent).norm() / latent.norm()
        assert rel < 1e-5, (kind, rel.item())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", FACTORS)
def test_pack_latent_pack_reproduces_bits(p: int, layout: str) -> None:
    for kind, (dense, _) in dense_layers(p, seed=30 + p, layout=layout).items():
        layer = tbn_from_dense(dense, p, "per_tile", kind, tile_layout=layout).pack()
        tile, alpha = layer.tile.clone(), layer.alpha.clone()
        layer.to_latent()
        assert layer.form == "latent" and layer.weight.requires_grad
        layer.pack()
        assert torch.equal(layer.tile, tile), kind
        # mean(|W_hat_i|) averages L copies of alpha_i: equal up to float summation rounding
        torch.testing.assert_close(layer.alpha, alpha, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [1, 2, 4, 8, 16])
def test_packed_state_holds_only_tile_scales_bias(p: int) -> None:
    layer = TBNLinear(512, 64 * p, compression_factor=p).pack()
    state = layer.state_dict()
    assert set(state) == {"tile", "alpha", "bias"}
    n = 512 * 64 * p
    assert state["tile"].dtype == torch.uint8 and state["tile"].numel() == math.ceil(n / p / 8)
    assert state["alpha"].numel() == p
    assert layer.storage_bytes() == n // p // 8 + 4 * p
    assert layer.bits_per_weight() == pytest.approx(1 / p + 32 * p / n, rel=1e-12)


def test_bits_per_weight_counts_padding_bytes() -> None:
    layer = TBNConv2d(3, 4, 3, compression_factor=4).pack()  # N = 108, L = 27 bits -> 4 bytes
    assert layer.tile.numel() == 4
    assert layer.bits_per_weight() == (4 * 8 + 4 * 32) / 108


class AllocationRecorder(TorchDispatchMode):
    """Records the element count of every tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize(
    "layer, x",
    [
        (TBNLinear(256, 512, compression_factor=4), torch.randn(2, 256)),
        (TBNConv2d(32, 64, 3, padding=1, compression_factor=8), torch.randn(1, 32, 5, 5)),
        (TBNConv1d(32, 64, 5, compression_factor=2), torch.randn(1, 32, 20)),
        (TBNLinear(256, 512, compression_factor=4, tile_layout="input"), torch.randn(2, 256)),
        (TBNConv2d(32, 64, 3, padding=1, compression_factor=8, tile_layout="input"), torch.randn(1, 32, 5, 5)),
    ],
)
def test_packed_forward_never_builds_dense_weight(layer: nn.Module, x: torch.Tensor) -> None:
    layer.pack()
    recorder = AllocationRecorder()
    with torch.no_grad(), recorder:
        y = layer(x)
    assert recorder.sizes, "the recorder saw no op"
    n = layer.numel
    assert y.numel() < n  # the check below is only meaningful if outputs are smaller than N
    too_big = [(op, size) for op, size in recorder.sizes if size >= n]
    assert not too_big, f"packed forward allocated tensors of >= N={n} elements: {too_big}"


def test_latent_layers_train_with_autograd() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 8))
    convert_model(model, TBNConfig(compression_factor=4, min_compress_size=0))
    x, target = torch.randn(16, 3, 6, 6), torch.randint(0, 8, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4", None])
def test_bad_factor_names_layer_and_value(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"my\.layer: compression_factor must be a positive int, got {bad!r}"):
        TBNLinear(8, 8, compression_factor=bad, name="my.layer")


def test_factor_must_divide_the_dimension_the_layout_splits() -> None:
    with pytest.raises(ValueError, match="enc.fc: compression_factor 4 does not divide the output dimension 6"):
        TBNLinear(8, 6, compression_factor=4, name="enc.fc")
    with pytest.raises(ValueError, match="enc.fc: compression_factor 4 does not divide the input dimension 6"):
        TBNLinear(6, 8, compression_factor=4, name="enc.fc", tile_layout="input")
    with pytest.raises(ValueError, match="dw: tile_layout='input' does not tile grouped convolutions"):
        TBNConv2d(8, 8, 3, groups=8, compression_factor=2, name="dw", tile_layout="input")
    with pytest.raises(ValueError, match="fc: tile_layout must be one of .* got 'rows'"):
        TBNLinear(8, 8, compression_factor=2, name="fc", tile_layout="rows")


def test_input_layout_applies_the_tile_once_to_the_alpha_weighted_input_blocks() -> None:
    """``W_hat x = T (sum_i alpha_i x_i)``: the packed forward's identity, written out for a Linear."""
    layer = TBNLinear(12, 5, compression_factor=3, tile_layout="input").pack()
    x = torch.randn(4, 12)
    t = tiling.unpack_bits(layer.tile, 20).view(5, 4)  # the tile as an (out, in/p) weight
    combined = sum(a * block for a, block in zip(layer.alpha, x.split(4, dim=1), strict=True))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), combined @ t.T + layer.bias, rtol=1e-5, atol=1e-6)


def test_packed_tile_length_mismatch_names_layer_and_shapes() -> None:
    layer = TBNLinear(16, 8, compression_factor=2, name="block.fc").pack()
    state = layer.state_dict()
    state["tile"] = torch.zeros(5, dtype=torch.uint8)  # L = 64 bits needs 8 bytes
    with pytest.raises(ValueError, match=r"tile: checkpoint has \(5,\).*block\.fc.*needs \(8,\)"):
        layer.load_state_dict(state)
    state = layer.state_dict()
    state["alpha"] = torch.ones(4)
    with pytest.raises(ValueError, match=r"alpha: checkpoint has \(4,\).*needs \(2,\)"):
        layer.load_state_dict(state)
    state = layer.state_dict()
    state["tile"] = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="torch.int32.*torch.uint8"):
        layer.load_state_dict(state)


def test_dense_module_dequantizes() -> None:
    layer = TBNConv2d(4, 8, 3, padding=1, groups=2, compression_factor=2).pack()
    dense = layer.dense_module()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)


def literal_w_hat(w: torch.Tensor, p: int, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha_i * t`` with ``t = sign(sum of the p copies)`` and the identity straight-through estimator."""
    view = w.reshape(p, -1)
    t = torch.where(view.detach().sum(dim=0) > 0, 1.0, -1.0)
    return (alpha.unsqueeze(1) * (t + (view - view.detach()))).reshape(w.shape)


@pytest.mark.parametrize("param", ["latent", "tensor", "scalars"])
@pytest.mark.parametrize("p", [1, 4])
def test_alpha_param_forward_and_gradients_match_the_formula(param: str, p: int) -> None:
    torch.manual_seed(p)
    layer = TBNLinear(12, 8, compression_factor=p, alpha_param=param)
    x = torch.randn(5, 12)
    w = layer.weight.detach().clone().requires_grad_()
    if param == "latent":
        alpha = w.reshape(p, -1).abs().mean(dim=1)
        sources = {"weight": w}
    elif param == "tensor":  # the authors' default: mean |A_i| of a separate trainable tensor
        a = layer.alpha_weight.detach().clone().requires_grad_()
        alpha = a.reshape(p, -1).abs().mean(dim=1)
        sources = {"weight": w, "alpha_weight": a}
    else:
        alpha = layer.alpha.detach().clone().requires_grad_()
        sources = {"weight": w, "alpha": alpha}
    expected = F.linear(x, literal_w_hat(w, p, alpha).reshape(8, 12), layer.bias.detach())
    grad_out = torch.randn_like(expected)
    (expected * grad_out).sum().backward()
    y = layer(x)
    (y * grad_out).sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    for name, ref in sources.items():
        torch.testing.assert_close(getattr(layer, name).grad, ref.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("param", ["latent", "tensor", "scalars"])
def test_alpha_param_state_round_trips_and_packs(param: str) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    layer = tbn_from_dense(dense, 4, "per_tile", "fc", param)
    expected = {"latent": {"weight"}, "tensor": {"weight", "alpha_weight"}, "scalars": {"weight", "alpha"}}[param]
    assert set(layer.state_dict()) == expected | {"bias"}
    torch.testing.assert_close(layer.alpha_values(), tiling.alpha(dense.weight.detach(), 4))  # starts from the weight
    again = TBNLinear(16, 8, compression_factor=4, alpha_param=param)
    again.load_state_dict(layer.state_dict())
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(again(x), layer(x))
        latent = layer(x)
        packed = layer.pack()(x)
        torch.testing.assert_close(packed, latent, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.to_latent()(x), packed, rtol=1e-6, atol=1e-7)  # alphas: mean of L equal values


def test_latent_eval_reuses_w_hat_until_the_weights_change(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = TBNLinear(32, 16, compression_factor=4)
    calls = []
    original = tiling.tiled_weight
    monkeypatch.setattr(tiling, "tiled_weight", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(2, 32)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first) and len(calls) == 1  # evaluation: built once
        layer.weight.add_(0.5)  # an optimizer step changes the weight in place
        assert not torch.equal(layer(x), first) and len(calls) == 2
    layer(x).sum().backward()  # training: rebuilt on every forward, with its gradient
    assert len(calls) == 3 and layer.weight.grad is not None


def test_packed_layer_refuses_an_input_of_the_wrong_width() -> None:
    linear = TBNLinear(784, 128, compression_factor=4, name="fc1").pack()
    with pytest.raises(ValueError, match="fc1: input has 28 features or channels, the layer takes 784"):
        linear(torch.randn(2, 28))
    conv = TBNConv2d(8, 16, 3, groups=2, compression_factor=4, name="conv").pack()
    assert conv(torch.randn(1, 8, 5, 5)).shape == (1, 16, 3, 3)
    with pytest.raises(ValueError, match="conv: input has 4 features or channels, the layer takes 8"):
        conv(torch.randn(1, 4, 5, 5))
