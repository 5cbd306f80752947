"""Trainer fine-tune of a TBN model, run by tests/test_distributed.py under ``accelerate launch``.

    python ddp_worker.py MODEL_DIR OUT_DIR {qat,lora} PER_DEVICE_BATCH STEPS

Each process writes ``OUT_DIR/rank{N}.pt``: its trainable tensors after training and, for QAT,
the packed tiles and alphas of every TBN layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from hf_tbn import TBNConfig, pack_model, tbn_layers
from hf_tbn.qat import end_process_group


class TokenData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 96, (32, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _whole(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def main(model_dir: str, out_dir: str, mode: str, batch: int, steps: int) -> None:
    model = LlamaForCausalLM.from_pretrained(model_dir, quantization_config=TBNConfig(min_compress_size=0))
    if mode == "lora":
        torch.manual_seed(0)
        model = get_peft_model(pack_model(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-2,
        train_sampling_strategy="sequential", save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, logging_steps=1, ddp_find_unused_parameters=False,
    )
    Trainer(model=model, args=args, train_dataset=TokenData()).train()
    # FSDP2 leaves DTensor shards: gather them so every rank reports whole tensors.
    result = {n: _whole(p) for n, p in model.named_parameters() if p.requires_grad}
    if mode == "qat":
        for name, layer in tbn_layers(pack_model(model)):
            result[f"{name}.tile"], result[f"{name}.alpha"] = _whole(layer.tile), _whole(layer.alpha)
    result["world_size"] = torch.tensor(args.world_size)
    torch.save(result, Path(out_dir) / f"rank{args.process_index}.pt")
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
