"""LoRA (peft) on TBN layers: packed (QLoRA-style) and latent, through Trainer, save and reload."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from hf_tbn import TBNConfig, TBNLoraLinear, pack_model, tbn_layers


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def llama_data(n: int = 16, length: int = 24) -> ListDataset:
    """Two random token sequences, repeated: a language a tiny model can learn in a few steps."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, length), generator=g).repeat(n // 2, 1)
    return ListDataset([{"input_ids": x, "labels": x} for x in ids])


def minilm_data(tokenizer: AutoTokenizer) -> ListDataset:
    texts = ["the match ended in a late goal", "shares fell after the earnings report",
             "the striker signed a new contract", "the central bank raised interest rates"] * 4
    labels = [0, 1, 0, 1] * 4
    enc = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return ListDataset([{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                         "labels": torch.tensor(labels[i])} for i in range(len(texts))])


def packed_base(cls: type[PreTrainedModel], fp_dir: Path, tmp: Path, config: TBNConfig) -> Path:
    """Quantize ``fp_dir`` on load, pack, save: the folder a user would download from the Hub."""
    model = cls.from_pretrained(fp_dir, quantization_config=config)
    pack_model(model).save_pretrained(tmp / "packed")
    return tmp / "packed"


def train(model: torch.nn.Module, data: ListDataset, out: Path, steps: int, lr: float) -> list[float]:
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             lr_scheduler_type="constant", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the base model, names without peft's wrapping."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unwrap = {".base_layer": "", ".original_module": ""}
    return {functools.reduce(lambda name, kv: name.replace(*kv), unwrap.items(), k): v.detach().clone()
            for k, v in state.items() if "lora_" not in k and "modules_to_save" not in k}


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def check_lora_on_packed(cls: type[PreTrainedModel], fp_dir: Path, tmp: Path, data: ListDataset,
                         lora: LoraConfig, config: TBNConfig, steps: int, lr: float) -> None:
    folder = packed_base(cls, fp_dir, tmp, config)
    base = cls.from_pretrained(folder)
    assert all(layer.form == "packed" for _, layer in tbn_layers(base))
    before = frozen_state(base)

    model = get_peft_model(base, lora)
    wrapped = [m for m in model.modules() if isinstance(m, TBNLoraLinear)]
    assert wrapped, "no TBN layer got a LoRA adapter"
    losses = train(model, data, tmp / "run", steps, lr)
    assert losses[-1] < 0.9 * losses[0], losses

    after = frozen_state(model.get_base_model())
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"training changed non-adapter state: {changed}"

    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    expected = logits(model, batch)
    model.save_pretrained(tmp / "adapter")
    reloaded = PeftModel.from_pretrained(cls.from_pretrained(folder), tmp / "adapter")
    assert torch.equal(logits(reloaded, batch), expected)


def test_peft_imported_after_hf_tbn_gets_the_tbn_layers(tmp_path: Path) -> None:
    # import hf_tbn does not import peft (about 200 MB); peft learns TBN layers when it is imported
    check = ("import sys, torch, hf_tbn; assert 'peft' not in sys.modules; "
             "from peft import LoraConfig, get_peft_model; "
             "assert LoraConfig(r=2)._custom_modules is None; "  # no config of any peft user is changed
             "model = hf_tbn.convert_model(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), "
             "hf_tbn.TBNConfig(min_compress_size=0)); "
             "peft = get_peft_model(model, LoraConfig(r=2, target_modules=['0'])); "
             "assert isinstance(peft.base_model.model[0], hf_tbn.TBNLoraLinear); print('ok')")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_lora_on_packed_tiny_llama(tiny_llama_dir: Path, tmp_path: Path) -> None:
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    check_lora_on_packed(LlamaForCausalLM, tiny_llama_dir, tmp_path, llama_data(), lora,
                         TBNConfig(compression_factor=4, min_compress_size=0), steps=30, lr=3e-2)


def test_lora_on_packed_minilm(minilm_dir: Path, tmp_path: Path) -> None:
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                      task_type="SEQ_CLS")
    data = minilm_data(AutoTokenizer.from_pretrained(minilm_dir))
    check_lora_on_packed(AutoModelForSequenceClassification, minilm_dir, tmp_path, data, lora,
                         TBNConfig(compression_factor=4), steps=12, lr=5e-3)


def test_lora_with_latent_weights_training_together(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=TBNConfig(min_compress_size=0))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    latent = {name: layer.weight for name, layer in tbn_layers(base)}
    for weight in latent.values():
        weight.requires_grad_(True)
    before = {name: w.detach().clone() for name, w in latent.items()}
    losses = train(model, llama_data(), tmp_path, steps=10, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[n], w) for n, w in latent.items())
    assert all(not torch.equal(m.lora_B["default"].weight, torch.zeros_like(m.lora_B["default"].weight))
               for m in model.modules() if isinstance(m, TBNLoraLinear))


def test_merge_is_refused_naming_the_layers(tiny_llama_dir: Path) -> None:
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=TBNConfig(min_compress_size=0))
    model = get_peft_model(pack_model(base), LoraConfig(r=4, target_modules=["q_proj"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    refusal = r"cannot merge LoRA adapters into TBN layers \(model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=refusal):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="model.layers.1.self_attn.q_proj"):
        model.merge_adapter()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing half-merged


def test_merge_into_the_dequantized_base(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = packed_base(LlamaForCausalLM, tiny_llama_dir, tmp_path, TBNConfig(min_compress_size=0))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(folder), lora)
    batch = {"input_ids": torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))}
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    dense = LlamaForCausalLM.from_pretrained(folder).dequantize()
    merged = PeftModel.from_pretrained(dense, tmp_path / "adapter").merge_and_unload()
    assert not list(tbn_layers(merged))
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-5, atol=1e-5)


def test_lora_target_that_is_not_there(tiny_llama_dir: Path) -> None:
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=TBNConfig(min_compress_size=0))
    with pytest.raises(ValueError, match="qkv_proj"):
        get_peft_model(pack_model(base), LoraConfig(r=4, target_modules=["qkv_proj"]))


def test_lora_variant_is_refused(tiny_llama_dir: Path) -> None:
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=TBNConfig(min_compress_size=0))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: DoraLinearVariant needs a dense base"):
        get_peft_model(pack_model(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
