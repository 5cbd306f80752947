"""Gradient checkpointing and torch.compile with TBN layers in both forms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from hf_tbn import TBNConfig, pack_model


def load(folder: Path, form: str) -> torch.nn.Module:
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=TBNConfig(min_compress_size=0))
    if form == "packed":
        torch.manual_seed(0)  # the same adapter initialisation on every load
        model = get_peft_model(pack_model(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                             init_lora_weights=False))  # B != 0: real grads
    return model


def gradients(model: torch.nn.Module, checkpointing: bool) -> dict[str, torch.Tensor]:
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("form", ["latent", "packed"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir: Path, form: str) -> None:
    plain = gradients(load(tiny_llama_dir, form), checkpointing=False)
    checkpointed = gradients(load(tiny_llama_dir, form), checkpointing=True)
    assert plain, "no trainable parameters"
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_torch_compile_of_packed_forward(tiny_llama_dir: Path) -> None:
    model = pack_model(LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=TBNConfig(
        min_compress_size=0))).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=False)(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
