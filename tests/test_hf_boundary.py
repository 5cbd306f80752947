"""No silent wrong results at the Hugging Face boundary: loading without hf_tbn, across model classes,
tampered checkpoints, bad config input, Trainer resume, the packed layer's missing weight."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import hf_tbn
from hf_tbn import TBNConfig, TBNLinear, convert_model, pack_model, tbn_layers
from hf_tbn.checkpoint import NEEDS_HF_TBN

QUERY = "bert.encoder.layer.0.attention.self.query"
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT classifier: full precision, latent TBN, packed TBN; and its packed base model."""
    root = tmp_path_factory.mktemp("boundary")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(root / "fp")
    config = TBNConfig(min_compress_size=0)
    model = BertForSequenceClassification.from_pretrained(root / "fp", quantization_config=config)
    model.save_pretrained(root / "latent")
    pack_model(model).save_pretrained(root / "packed")
    base = BertModel.from_pretrained(root / "fp", quantization_config=TBNConfig(min_compress_size=0))
    pack_model(base).save_pretrained(root / "packed_base")
    return {name: root / name for name in ("fp", "latent", "packed", "packed_base")}


def tampered(src: Path, dst: Path, tensors: dict[str, torch.Tensor | None] = (), config: dict | None = None) -> Path:
    """A copy of ``src`` with checkpoint tensors replaced (None: removed) and quantization_config keys changed."""
    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    for key, value in dict(tensors).items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        data = json.loads((dst / "config.json").read_text())
        data["quantization_config"].update(config)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


# -- 1. a process that never imports hf_tbn ------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["latent", "packed"])
def test_without_hf_tbn_both_forms_are_refused(folders: dict[str, Path], form: str, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from transformers import BertForSequenceClassification\n"
        "try:\n"
        f"    BertForSequenceClassification.from_pretrained({str(folders[form])!r})\n"
        "except Exception as err:\n"
        "    print('REFUSED', type(err).__name__, err)\n"
        "assert 'hf_tbn' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "REFUSED RuntimeError" in result.stdout, result.stdout + result.stderr
    assert f"{QUERY}.weight" in result.stderr and "MISMATCH" in result.stderr  # a shape no dense layer takes
    assert NEEDS_HF_TBN in result.stderr  # the load report names what to do


def test_marker_is_not_reported_with_hf_tbn(folders: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    BertForSequenceClassification.from_pretrained(folders["packed"])
    assert NEEDS_HF_TBN not in caplog.text


# -- 2. names relative to the base model -----------------------------------------------------------------------------
def test_layer_names_are_relative_to_the_base_model(folders: dict[str, Path]) -> None:
    saved = json.loads((folders["packed"] / "config.json").read_text())["quantization_config"]["converted_layers"]
    assert "encoder.layer.0.attention.self.query" in saved and not any(n.startswith("bert.") for n in saved)


@torch.no_grad()
def test_base_model_from_a_packed_classifier_and_back(folders: dict[str, Path]) -> None:
    classifier = BertForSequenceClassification.from_pretrained(folders["packed"])
    base = AutoModel.from_pretrained(folders["packed"])
    assert isinstance(base, BertModel) and all(layer.form == "packed" for _, layer in tbn_layers(base))
    assert torch.equal(base(input_ids=IDS).last_hidden_state, classifier.bert(input_ids=IDS).last_hidden_state)

    packed_base = BertModel.from_pretrained(folders["packed_base"])
    new_head = BertForSequenceClassification.from_pretrained(folders["packed_base"], num_labels=3)
    assert isinstance(new_head.bert.encoder.layer[0].attention.self.query, TBNLinear)
    assert type(new_head.classifier) is torch.nn.Linear  # the new head is not in the plan: dense, trainable
    assert torch.equal(new_head.bert(input_ids=IDS).last_hidden_state, packed_base(input_ids=IDS).last_hidden_state)


# -- 4. tampered packed checkpoints ----------------------------------------------------------------------------------
def test_missing_bias_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    bad = tampered(folders["packed"], tmp_path / "bad", {f"{QUERY}.bias": None})
    with pytest.raises(ValueError, match=rf"checkpoint has no '{QUERY.removeprefix('bert.')}.bias'|no '{QUERY}.bias'"):
        BertForSequenceClassification.from_pretrained(bad)


def test_layer_left_out_of_the_plan_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    saved = json.loads((folders["packed"] / "config.json").read_text())["quantization_config"]["converted_layers"]
    plan = {k: v for k, v in saved.items() if k != "encoder.layer.0.attention.self.query"}
    bad = tampered(folders["packed"], tmp_path / "bad", config={"converted_layers": plan})
    with pytest.raises(ValueError, match=rf"'{QUERY}.alpha': TBN tensors for 'encoder.layer.0.attention.self.query'"):
        BertForSequenceClassification.from_pretrained(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_alpha_is_refused(folders: dict[str, Path], tmp_path: Path, value: float) -> None:
    bad = tampered(folders["packed"], tmp_path / "bad", {f"{QUERY}.alpha": torch.tensor([1.0, value, 1.0, 1.0])})
    with pytest.raises(ValueError, match=rf"'{QUERY}.alpha': alphas must be finite"):
        BertForSequenceClassification.from_pretrained(bad)


# -- 5. config and pattern input -------------------------------------------------------------------------------------
def small() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"modules_to_not_convert": "classifier"}, r"must be a list of module-name patterns, got the string 'classifier'"),
    ({"converted_layers": ["0", "2"]}, r"converted_layers must be a dict of module name -> compression factor, got li"),
    ({"layer_compression_factors": [("0", 2)]}, r"layer_compression_factors must be a dict"),
    ({"alpha_param": "weight"}, r"alpha_param must be one of \('latent', 'tensor', 'scalars'\), got 'weight'"),
])
def test_config_input_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TBNConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"modules_to_not_convert": ["decoder"]}, r"modules_to_not_convert pattern 'decoder' matches no convertible layer"),
    ({"modules_to_not_convert": ["fc[("]}, r"pattern 'fc\[\(' is not a valid regular expression"),
    ({"layer_compression_factors": {"(": 2}}, r"pattern '\(' is not a valid regular expression"),
])
def test_patterns_that_cannot_match_are_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_model(small(), TBNConfig(min_compress_size=0, **kwargs))


def test_output_layer_stays_p1_and_an_explicit_factor_warns() -> None:
    config = TBNConfig(compression_factor=4, min_compress_size=0)
    convert_model(small(), config)
    assert config.converted_layers == {"0": 4, "2": 1}  # the output layer's logits stay independent
    with pytest.warns(UserWarning, match=r"2: the output layer tiled with p=2 makes its outputs 2 scaled copies"):
        convert_model(small(), TBNConfig(min_compress_size=0, layer_compression_factors={"2": 2}))


def test_a_factor_the_widths_do_not_take_warns_once_naming_the_layers(folders: dict[str, Path]) -> None:
    with pytest.warns(UserWarning) as record:
        model = BertForSequenceClassification.from_pretrained(
            folders["fp"], quantization_config=TBNConfig(compression_factor=3, min_compress_size=0))
    reduced = [str(w.message) for w in record if "smaller factor" in str(w.message)]
    assert len(reduced) == 1  # planned once, not again when the plan is applied
    assert reduced[0].startswith("7 layer(s) get a smaller factor than compression_factor=3, ")
    assert f"{QUERY} (width 32) -> p=2" in reduced[0]
    assert set(model.config.quantization_config.converted_layers.values()) == {2}  # the classifier stays dense


# -- 6. Trainer resume -----------------------------------------------------------------------------------------------
class Repeat(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(12) % 128
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("tamper", ["missing", "packed"])
def test_trainer_resume_refuses_a_checkpoint_without_the_latent_weight(tiny_llama_dir: Path, tmp_path: Path,
                                                                       tamper: str) -> None:
    config = TBNConfig(min_compress_size=0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True)
    Trainer(model=LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config), args=args,
            train_dataset=Repeat()).train()
    checkpoint = tmp_path / "run" / "checkpoint-1" / "model.safetensors"
    state = load_file(str(checkpoint))
    key = "model.layers.0.mlp.up_proj"
    if tamper == "missing":
        del state[f"{key}.weight"]
    else:  # what a packed checkpoint holds for the layer
        layer = pack_model(LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config))
        state[f"{key}.weight"] = layer.get_submodule(key).tile
        state[f"{key}.alpha"] = layer.get_submodule(key).alpha
    save_file(state, str(checkpoint), metadata={"format": "pt"})
    args.max_steps = 3
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    message = rf"{key}\.weight: missing from the state dict" if tamper == "missing" else rf"{key}\.(weight|alpha)"
    with pytest.raises(ValueError, match=message):
        Trainer(model=model, args=args, train_dataset=Repeat()).train(resume_from_checkpoint=str(checkpoint.parent))


def test_state_dict_of_only_adapter_keys_passes() -> None:
    """peft loads adapter weights with load_state_dict(strict=False): a TBN layer with no key of its own is fine."""
    model = convert_model(small(), TBNConfig(min_compress_size=0))
    result = model.load_state_dict({}, strict=False)
    assert "0.weight" in result.missing_keys


# -- the packed layer's weight ---------------------------------------------------------------------------------------
def test_packed_layer_has_no_weight_but_dtype_and_device() -> None:
    layer = TBNLinear(16, 8, compression_factor=2, name="enc.fc", dtype=torch.bfloat16).pack()
    with pytest.raises(AttributeError, match=r"enc.fc: a packed TBN layer has no dense 'weight'.*effective_weight"):
        layer.weight  # noqa: B018
    assert layer.dtype == torch.bfloat16 and layer.device == torch.device("cpu")
    assert not hasattr(layer, "weight")


def test_gpt2_reload_initialises_around_packed_layers(tmp_path: Path) -> None:
    """GPT-2's _init_weights reaches into child weights while transformers initialises a loaded model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16)).save_pretrained(
        tmp_path / "fp")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "fp", quantization_config=TBNConfig(min_compress_size=0))
    pack_model(model).save_pretrained(tmp_path / "packed")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "packed")
    with pytest.raises(AttributeError, match="no dense 'weight'"):
        again.transformer.h[0].attn.c_proj.weight  # noqa: B018
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_backend_is_not_saved_and_version_is(folders: dict[str, Path]) -> None:
    saved = json.loads((folders["packed"] / "config.json").read_text())["quantization_config"]
    assert "backend" not in saved and saved["hf_tbn_version"] == hf_tbn.__version__
    model = hf_tbn.set_backend(BertForSequenceClassification.from_pretrained(folders["packed"]), "torch")
    assert {layer.backend for _, layer in tbn_layers(model)} == {"torch"}


def test_version_in_safetensors_metadata_and_hub_tags_on_the_model(folders: dict[str, Path]) -> None:
    from safetensors import safe_open

    with safe_open(str(folders["packed"] / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["hf_tbn_version"] == hf_tbn.__version__ and metadata["hf_tbn_format"] == "2"
    model = BertForSequenceClassification.from_pretrained(folders["packed"])
    assert set(hf_tbn.hub.TAGS) <= set(model.model_tags)  # a plain model.push_to_hub carries them
    assert not BertForSequenceClassification.from_pretrained(folders["fp"]).model_tags
