"""Shared check for the Hugging Face tests: quantize on load, save/reload both forms, dequantize."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hf_tbn import TBNConfig, pack_model, tbn_layers
from hf_tbn.checkpoint import model_keyed, read_header
from hf_tbn.convert import logical_weight, relative_name
from hf_tbn.tiling import packed_nbytes

Forward = Callable[[PreTrainedModel], torch.Tensor]


@torch.no_grad()
def outputs(model: PreTrainedModel, forward: Forward) -> torch.Tensor:
    model.eval()
    return forward(model)


def saved_tensors(folder: Path, model: PreTrainedModel) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of each saved tensor, keyed by ``model``'s names (transformers may save other names)."""
    return model_keyed(model, read_header([folder / "model.safetensors"]))


def packed_layer_bytes(model: PreTrainedModel) -> int:
    """What 1/p bits per weight predicts for the converted layers: tile bytes + fp32 scales."""
    return sum(packed_nbytes(math.ceil(layer.numel / layer.compression_factor)) + 4 * layer.compression_factor
               for _, layer in tbn_layers(model))


def roundtrip(cls: type[PreTrainedModel], fp_dir: Path, tmp: Path, forward: Forward, config: TBNConfig,
              **load_kwargs: object) -> PreTrainedModel:
    """Run the whole product path on one model folder and assert every promise on the way.

    Returns the packed model reloaded from disk.
    """
    dense = cls.from_pretrained(fp_dir, **load_kwargs)
    latent = cls.from_pretrained(fp_dir, quantization_config=config, **load_kwargs)
    layers = dict(tbn_layers(latent))
    assert layers, "nothing was converted"
    expected_plan = {relative_name(latent, n): m.compression_factor for n, m in layers.items()}
    assert latent.config.quantization_config.converted_layers == expected_plan  # named relative to the base model
    for name, layer in layers.items():  # the latent weight is the checkpoint weight, as the (p, out/p, in) view
        assert layer.form == "latent" and layer.weight.requires_grad and layer.weight.shape == layer.latent_shape
        expected = logical_weight(dense.get_submodule(name))
        torch.testing.assert_close(layer.weight.view(expected.shape), expected, rtol=0, atol=0)
    y_latent = outputs(latent, forward)

    latent.save_pretrained(tmp / "latent")
    reloaded = cls.from_pretrained(tmp / "latent")
    assert torch.equal(outputs(reloaded, forward), y_latent)

    pack_model(reloaded)
    assert reloaded.config.quantization_config.form == "packed"
    y_packed = outputs(reloaded, forward)
    tol = {"rtol": 1e-4, "atol": 1e-3} if y_latent.dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    torch.testing.assert_close(y_packed, y_latent, **tol)
    reloaded.save_pretrained(tmp / "packed")
    saved = saved_tensors(tmp / "packed", reloaded)
    stored = 0
    for name, layer in layers.items():  # the tile is stored under "weight", a shape no dense layer takes
        assert f"{name}.tile" not in saved
        tile_shape, tile_dtype = saved[f"{name}.weight"]
        assert tile_dtype == "U8" and tile_shape == (packed_nbytes(layer.numel // layer.compression_factor),)
        assert saved[f"{name}.alpha"][0] == (layer.compression_factor,)
        stored += tile_shape[0] + 4 * layer.compression_factor
    assert stored == packed_layer_bytes(latent)

    packed = cls.from_pretrained(tmp / "packed")
    assert all(layer.form == "packed" for _, layer in tbn_layers(packed))
    assert torch.equal(outputs(packed, forward), y_packed), "packed reload is not bit-identical"

    plain = cls.from_pretrained(tmp / "packed").dequantize()
    assert not list(tbn_layers(plain)) and getattr(plain.config, "quantization_config", None) is None
    torch.testing.assert_close(outputs(plain, forward), y_packed, **tol)
    plain.save_pretrained(tmp / "dequantized")
    again = cls.from_pretrained(tmp / "dequantized")
    assert not list(tbn_layers(again))
    torch.testing.assert_close(outputs(again, forward), y_packed, **tol)
    return packed
