"""The quantizer's registration, config round trip and its refusals of bad configs and bad checkpoints."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

import hf_tbn
from hf_tbn import TBNConfig, TBNHfQuantizer, pack_model, tbn_layers, tiling
from hf_tbn.quantizer import register

LAYER = "transformer.h.0.mlp.c_fc"  # Conv1D 32 -> 128: weight (128, 32), p = 4, tile 1024 bits = 128 bytes


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantizer")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16)).save_pretrained(
        root / "fp")
    model = GPT2LMHeadModel.from_pretrained(root / "fp", quantization_config=TBNConfig(min_compress_size=0))
    model.save_pretrained(root / "latent")
    pack_model(model).save_pretrained(root / "packed")
    return {"fp": root / "fp", "latent": root / "latent", "packed": root / "packed"}


def tampered(src: Path, dst: Path, change: dict[str, torch.Tensor | None]) -> Path:
    """A copy of ``src`` with some checkpoint tensors replaced (or removed with ``None``)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    for key, value in change.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_registration_is_idempotent_and_config_round_trips() -> None:
    register()
    register()
    assert AUTO_QUANTIZER_MAPPING["tbn"] is TBNHfQuantizer
    config = TBNConfig(compression_factor=8, layer_compression_factors={"c_fc": 2}, modules_to_not_convert=["wte"])
    data = json.loads(config.to_json_string())
    again = AutoQuantizationConfig.from_dict(data)
    assert isinstance(again, TBNConfig) and again.to_dict() == config.to_dict()
    assert "tile_layout" not in data  # the default layout leaves config.json as older hf_tbn reads it
    data = json.loads(TBNConfig(tile_layout="input").to_json_string())
    assert AutoQuantizationConfig.from_dict(data).tile_layout == "input"


@pytest.mark.parametrize(("change", "message"), [
    ({"compression_factor": 0}, "compression_factor must be a positive int, got 0"),
    ({"form": "dense"}, "form must be one of"),
    ({"alpha_mode": "mean"}, "alpha_mode must be one of"),
    ({"tile_layout": "rows"}, "tile_layout must be one of .*, got 'rows'"),
    ({"backend": "cuda"}, "backend must be one of"),
    ({"min_compress_size": -1}, "min_compress_size"),
    ({"bogus_key": 1}, "unknown keys \\['bogus_key'\\]"),
    ({"converted_layers": {LAYER: 3}}, f"{LAYER}: compression_factor 3 does not divide the output dimension 128"),
    ({"converted_layers": {"transformer.h.9.mlp.c_fc": 4}}, "converted_layers names 'transformer.h.9.mlp.c_fc'"),
])
def test_bad_saved_config_is_refused(folders: dict[str, Path], tmp_path: Path, change: dict, message: str) -> None:
    folder = shutil.copytree(folders["packed"], tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        GPT2LMHeadModel.from_pretrained(folder)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("weight", torch.zeros(127, dtype=torch.uint8), r"c_fc.weight' has \(127,\) U8, the layer needs \(128,\) U8"),
    ("weight", torch.zeros(128, dtype=torch.int8), r"has \(128,\) I8, the layer needs \(128,\) U8 \(the packed tile\)"),
    ("alpha", torch.ones(2), r"'transformer.h.0.mlp.c_fc.alpha' has \(2,\) F32, the layer needs \(4,\)"),
    ("alpha", None, r"checkpoint has no 'transformer.h.0.mlp.c_fc.alpha'"),
])
def test_packed_checkpoint_disagreeing_with_the_layer(folders: dict[str, Path], tmp_path: Path, key: str,
                                                      value: torch.Tensor | None, message: str) -> None:
    folder = tampered(folders["packed"], tmp_path / "bad", {f"{LAYER}.{key}": value})
    with pytest.raises(ValueError, match=rf"{LAYER} \(weight \(128, 32\), p=4\): .*{message}"):
        GPT2LMHeadModel.from_pretrained(folder)


def test_latent_checkpoint_with_wrong_weight_shape(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tampered(folders["latent"], tmp_path / "bad", {f"{LAYER}.weight": torch.zeros(32, 128)})
    with pytest.raises(ValueError, match=r"c_fc.weight' has \(32, 128\) F32, the layer needs \(4, 32, 32\)"):
        GPT2LMHeadModel.from_pretrained(folder)


def test_full_precision_checkpoint_with_wrong_shape_on_quantize(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tampered(folders["fp"], tmp_path / "bad", {f"{LAYER}.weight": torch.zeros(32, 64)})
    with pytest.raises(ValueError, match=r"has \(32, 64\) F32, the layer needs \(32, 128\)"):  # Conv1D: (in, out)
        GPT2LMHeadModel.from_pretrained(folder, quantization_config=TBNConfig(min_compress_size=0))


def test_packed_tensors_need_the_tbn_config(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(folders["packed"], tmp_path / "noconfig")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="TBN tensors but config.json has no TBN quantization_config"):
        GPT2LMHeadModel.from_pretrained(folder, quantization_config=TBNConfig(min_compress_size=0))


@pytest.mark.parametrize("cut", [1, 200, 5000])
def test_truncated_safetensors_is_an_error(folders: dict[str, Path], tmp_path: Path, cut: int) -> None:
    folder = shutil.copytree(folders["packed"], tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-cut])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        GPT2LMHeadModel.from_pretrained(folder)


def test_disk_offload_is_refused(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="offloaded to disk"):
        GPT2LMHeadModel.from_pretrained(folders["packed"], device_map={"transformer": "cpu", "lm_head": "disk"})


def test_packed_checkpoint_loads_back_in_latent_form(folders: dict[str, Path], tmp_path: Path) -> None:
    packed = GPT2LMHeadModel.from_pretrained(folders["packed"])
    latent = hf_tbn.to_latent_model(GPT2LMHeadModel.from_pretrained(folders["packed"]))
    assert latent.hf_quantizer.is_qat_trainable
    with pytest.raises(ValueError, match=r"packed form .* hf_tbn.to_latent_model\(model\)"):
        Trainer(model=packed, args=TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True))
    for (name, a), (_, b) in zip(tbn_layers(packed), tbn_layers(latent), strict=True):
        assert b.form == "latent" and torch.equal(a.tile, copy.deepcopy(b).pack().tile), name
    latent.save_pretrained(tmp_path / "latent")
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "latent").config.quantization_config.form == "latent"


@pytest.mark.parametrize("alpha_param", ["tensor", "scalars"])
def test_quantize_on_load_starts_the_alpha_source_from_the_checkpoint(folders: dict[str, Path], tmp_path: Path,
                                                                      alpha_param: str) -> None:
    """A dense checkpoint has no alpha state: the quantize-on-load op derives it from each pretrained weight, so the
    model computes what the default ``alpha_param`` does and nothing is reported missing; a latent save keeps it."""
    config = TBNConfig(min_compress_size=0, alpha_param=alpha_param)
    model, info = GPT2LMHeadModel.from_pretrained(folders["fp"], quantization_config=config, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    plain = GPT2LMHeadModel.from_pretrained(folders["fp"], quantization_config=TBNConfig(min_compress_size=0))
    layer, default = model.get_submodule(LAYER), plain.get_submodule(LAYER)
    source = layer.alpha_weight if alpha_param == "tensor" else layer.alpha
    expected = layer.weight if alpha_param == "tensor" else tiling.alpha(layer.weight, 4)
    assert source.requires_grad and torch.equal(source, expected)
    assert torch.equal(layer.effective_weight(), default.effective_weight())
    ids = torch.arange(12).view(2, 6)
    assert torch.equal(model(ids).logits, plain(ids).logits)
    with torch.no_grad():
        source.mul_(1.5)  # no longer derivable from the weight: the reload must read it
    model.save_pretrained(tmp_path / "latent")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "latent").get_submodule(LAYER)
    assert torch.equal(getattr(again, "alpha_weight" if alpha_param == "tensor" else "alpha"), source)


def test_input_layout_quantizes_on_load_and_round_trips_packed(folders: dict[str, Path], tmp_path: Path) -> None:
    """``tile_layout="input"`` from a dense checkpoint: each latent copy is a block of the pretrained weight's input
    columns (the GPT-2 Conv1D transposed first); a packed save records the layout and reloads to the same logits;
    relabelled as the output layout, a latent folder is refused by its shape, a packed one by its recorded layout."""
    config = TBNConfig(min_compress_size=0, tile_layout="input")
    model = GPT2LMHeadModel.from_pretrained(folders["fp"], quantization_config=config)
    dense = GPT2LMHeadModel.from_pretrained(folders["fp"]).get_submodule(LAYER).weight.detach().t()  # (128, 32)
    layer = model.get_submodule(LAYER)
    assert layer.tile_layout == "input" and layer.weight.shape == (4, 128, 8)
    for i in range(4):
        assert torch.equal(layer.weight[i], dense[:, 8 * i : 8 * i + 8])
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "latent")
    pack_model(model).save_pretrained(tmp_path / "packed")
    saved = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert saved["tile_layout"] == "input"
    for folder in ("latent", "packed"):
        again = GPT2LMHeadModel.from_pretrained(tmp_path / folder)
        assert again.get_submodule(LAYER).tile_layout == "input", folder
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits, expected, rtol=1e-5, atol=1e-5, msg=folder)
    by_record = r"model.safetensors: written with tile_layout 'input', but config.json's .* says 'output'"
    by_shape = r"c_attn.*'transformer.h.0.attn.c_attn.weight' has \(4, 96, 8\).*needs \(4, 24, 32\)"
    for folder, record, refusal in (("latent", True, by_record), ("packed", True, by_record),
                                    ("latent", False, by_shape)):  # a file from before the layout was recorded
        relabelled = tmp_path / f"relabelled-{folder}-{record}"
        shutil.copytree(tmp_path / folder, relabelled)
        output_layout = json.loads((relabelled / "config.json").read_text())
        del output_layout["quantization_config"]["tile_layout"]  # what an output-layout save writes
        (relabelled / "config.json").write_text(json.dumps(output_layout))
        if not record:
            save_file(load_file(relabelled / "model.safetensors"), relabelled / "model.safetensors", {"format": "pt"})
        with pytest.raises(ValueError, match=refusal):
            GPT2LMHeadModel.from_pretrained(relabelled)
