"""Trainer fine-tunes the latent form (QAT); a resumed run ends bit-identical to an uninterrupted one, with each
alpha parametrization's own state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import Tokens
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hf_tbn import TBNConfig, pack_model, tbn_layers, to_latent_model
from hf_tbn.layers import ALPHA_PARAMS

STEPS = 8


@pytest.fixture
def tbn_folder(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A latent TBN Llama quantized on load from a random dense one (``alpha_param``: the indirect parameter)."""
    alpha_param = getattr(request, "param", "latent")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    config = TBNConfig(min_compress_size=0, alpha_param=alpha_param)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    model.save_pretrained(tmp_path / "tbn")
    return tmp_path / "tbn"


def trainer(model: LlamaForCausalLM, out: Path) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-2, warmup_steps=2,
        lr_scheduler_type="linear", save_strategy="steps", save_steps=STEPS // 2, logging_steps=1, seed=0,
        data_seed=0, use_cpu=True, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=Tokens(64, 12, 64))


@torch.no_grad()
def loss_on(model: LlamaForCausalLM, data: Tokens) -> float:
    model.eval()
    return float(model(input_ids=data.ids, labels=data.ids).loss)


def latent_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tbn_folder", ALPHA_PARAMS, indirect=True)
def test_qat_lowers_loss_and_resume_is_bit_identical(tbn_folder: Path, tmp_path: Path) -> None:
    data = Tokens(64, 12, 64)
    model = LlamaForCausalLM.from_pretrained(tbn_folder)
    assert model.hf_quantizer.is_qat_trainable
    before = loss_on(model, data)
    full = trainer(model, tmp_path / "full")
    full.train()
    assert loss_on(model, data) < 0.9 * before
    assert all(layer.form == "latent" and layer.weight.requires_grad for _, layer in tbn_layers(model))

    checkpoint = tmp_path / "full" / f"checkpoint-{STEPS // 2}"
    layer = "model.layers.0.mlp.up_proj"
    alpha_keys = {f"{layer}.{key}" for key in model.get_submodule(layer)._state_keys()} - {f"{layer}.weight"}
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:  # a Trainer checkpoint is the latent form
        assert f"{layer}.weight" in f.keys() and f"{layer}.tile" not in f.keys() and alpha_keys <= set(f.keys())

    resumed_model = LlamaForCausalLM.from_pretrained(tbn_folder)
    resumed = trainer(resumed_model, tmp_path / "full")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final, again = latent_state(model), latent_state(resumed_model)
    assert final.keys() == again.keys()
    for key in final:
        assert torch.equal(final[key], again[key]), f"{key} differs after resume"
    losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert losses[-STEPS // 2:] == resumed_losses[-STEPS // 2:]


def test_packed_model_is_refused_then_trains_after_to_latent(tbn_folder: Path, tmp_path: Path) -> None:
    model = pack_model(LlamaForCausalLM.from_pretrained(tbn_folder))
    with pytest.raises(ValueError, match=r"packed form .* call hf_tbn.to_latent_model\(model\)"):
        trainer(model, tmp_path / "refused")
    to_latent_model(model)
    assert model.config.quantization_config.form == "latent"
    trainer(model, tmp_path / "latent").train()
