"""convert_model / pack_model on plain torch modules: the factor rule, overrides, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hf_tbn import TBNConfig, TBNConv2d, TBNLinear, convert_model, pack_model, tbn_layers, to_latent_model


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1),  # 648 weights
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24 * 16, 300),  # 115,200 weights
        nn.ReLU(),
        nn.Linear(300, 10),  # 3,000 weights
    )


def test_convert_sequential_with_the_factor_rule() -> None:
    model = small_net()
    config = TBNConfig(compression_factor=8, min_compress_size=1000)
    reduced = r"1 layer\(s\) get a smaller factor than compression_factor=8.*: 4 \(width 300\) -> p=6\."
    with pytest.warns(UserWarning, match=reduced):
        convert_model(model, config)
    assert isinstance(model[0], TBNConv2d) and isinstance(model[4], TBNLinear) and isinstance(model[6], TBNLinear)
    assert isinstance(model[1], nn.BatchNorm2d)
    # conv: 648 < 1000 -> binary; fc1: 8 divides 300? no -> largest divisor <= 8 is 6; fc2, the output layer: 1
    assert config.converted_layers == {"0": 1, "4": 6, "6": 1}
    assert {name: layer.compression_factor for name, layer in tbn_layers(model)} == config.converted_layers


def test_a_factor_every_width_takes_converts_without_a_warning() -> None:
    config = TBNConfig(compression_factor=4, min_compress_size=1000)  # 300 outputs: 4 divides them; the conv is binary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_model(small_net(), config)
    assert config.converted_layers == {"0": 1, "4": 4, "6": 1}


def test_conversion_starts_from_the_dense_weights() -> None:
    model = small_net()
    dense_fc = model[4].weight.detach().clone()
    convert_model(model, TBNConfig(min_compress_size=0))
    assert torch.equal(model[4].weight.view(dense_fc.shape), dense_fc)  # held as the tiled view (p, out/p, in)


def test_overrides_and_modules_to_not_convert() -> None:
    model = small_net()
    config = TBNConfig(
        compression_factor=4, min_compress_size=0, layer_compression_factors={"4": 2, r"[06]": 1},
        modules_to_not_convert=["6"],
    )
    convert_model(model, config)
    assert config.converted_layers == {"0": 1, "4": 2}
    assert isinstance(model[6], nn.Linear) and not isinstance(model[6], TBNLinear)


def test_saved_plan_is_rebuilt_exactly() -> None:
    config = TBNConfig(compression_factor=8, min_compress_size=1000)
    convert_model(small_net(), config)
    replay = TBNConfig.from_dict(config.to_dict())
    model = convert_model(small_net(), replay)
    assert {name: layer.compression_factor for name, layer in tbn_layers(model)} == config.converted_layers


def test_pack_and_back_keeps_outputs() -> None:
    model = convert_model(small_net(), TBNConfig(compression_factor=4, min_compress_size=0)).eval()
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        latent = model(x)
        packed = pack_model(model)(x)
        assert all(layer.form == "packed" for _, layer in tbn_layers(model))
        again = to_latent_model(model)(x)
    torch.testing.assert_close(packed, latent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, latent, rtol=1e-5, atol=1e-6)


def test_pattern_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"layer_compression_factors pattern 'decoder.fc' matches no convertible"):
        convert_model(small_net(), TBNConfig(layer_compression_factors={"decoder.fc": 2}))


def test_override_must_divide_output_dim() -> None:
    with pytest.raises(ValueError, match="6: compression_factor 4 does not divide the output dimension 10"):
        convert_model(small_net(), TBNConfig(layer_compression_factors={"6": 4}))


def test_conflicting_overrides_are_an_error() -> None:
    with pytest.raises(ValueError, match="4: layer_compression_factors patterns"):
        convert_model(small_net(), TBNConfig(layer_compression_factors={"4": 2, r"\d": 4}))


def test_tied_weights_are_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 10, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="1: weight is shared with another module"):
        convert_model(model, TBNConfig(min_compress_size=0))
    convert_model(model, TBNConfig(min_compress_size=0, modules_to_not_convert=["1"]))


def test_integer_and_empty_weights_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match="0: weight must be floating point, got torch.int64"):
        convert_model(model, TBNConfig(min_compress_size=0))
    empty = nn.Module()
    empty.body = nn.Sequential(nn.Linear(0, 4))
    with pytest.raises(ValueError, match=r"body.0: weight is empty, shape \(4, 0\)"):
        convert_model(empty, TBNConfig(min_compress_size=0))


def test_unsupported_padding_mode_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="0: padding_mode 'reflect' is not supported"):
        convert_model(model, TBNConfig(min_compress_size=0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compression_factor": 0}, "compression_factor must be a positive int, got 0"),
        ({"compression_factor": 2.5}, "compression_factor must be a positive int, got 2.5"),
        ({"min_compress_size": -1}, "min_compress_size must be a non-negative int, got -1"),
        ({"alpha_mode": "mean"}, "alpha_mode must be one of .* got 'mean'"),
        ({"form": "dense"}, "form must be one of .* got 'dense'"),
        ({"backend": "cuda"}, "backend must be one of .* got 'cuda'"),
        ({"layer_compression_factors": {"fc": -1}}, r"layer_compression_factors\['fc'\] must be a positive int"),
        ({"bits": 2}, r"unknown keys \['bits'\]"),
    ],
)
def test_invalid_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TBNConfig(**kwargs)
