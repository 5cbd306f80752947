"""Fine-tune of a TBN model, run by tests/test_distributed.py under ``accelerate launch``.

    python ddp_worker.py MODEL_DIR OUT_DIR {qat,lora,fsdp2} PER_DEVICE_BATCH STEPS

``qat`` and ``lora`` train with Trainer (DDP when launched as several processes). ``fsdp2`` is QAT with the
model sharded by ``torch.distributed.fsdp.fully_shard`` and a plain AdamW loop: on CPU, accelerate 1.x runs
``--use_fsdp`` as plain DDP (no FSDP plugin for its MULTI_CPU type), so Trainer cannot shard here.
Each process writes ``OUT_DIR/rank{N}.pt``: its trainable tensors after training and, for QAT,
the packed tiles and alphas of every TBN layer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FSDPModule, fully_shard
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


def train_fully_sharded(model: LlamaForCausalLM, out_dir: str, batch: int, steps: int) -> tuple[int, int]:
    """QAT under FSDP2 (each decoder layer and the root sharded) on the global batches Trainer's sequential
    sampler would give; one process trains the same loop unsharded. Sharded, packing a layer must be refused
    (``OUT_DIR/refused{N}.pt``: the message). Returns (rank, world size)."""
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    data, optimizer = TokenData(), torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        start = (step * world + rank) * batch
        ids = torch.stack([data[i % len(data)]["input_ids"] for i in range(start, start + batch)])
        model(input_ids=ids, labels=ids).loss.backward()  # FSDP2 averages the gradients over the processes
        optimizer.step()
        optimizer.zero_grad()
    if dist.is_initialized():
        try:
            next(layer for _, layer in tbn_layers(model)).pack()
        except ValueError as e:  # a shard cannot be packed
            torch.save(str(e), Path(out_dir) / f"refused{rank}.pt")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()  # whole parameters (not DTensor shards) to pack and report
    return rank, world


def main(model_dir: str, out_dir: str, mode: str, batch: int, steps: int) -> None:
    model = LlamaForCausalLM.from_pretrained(model_dir, quantization_config=TBNConfig(min_compress_size=0))
    if mode == "fsdp2":
        rank, world = train_fully_sharded(model, out_dir, batch, steps)
    else:
        if mode == "lora":
            torch.manual_seed(0)
            model = get_peft_model(pack_model(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        args = TrainingArguments(
            output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-2,
            train_sampling_strategy="sequential", save_strategy="no", report_to=[], use_cpu=True, seed=0,
            disable_tqdm=True, logging_steps=1, ddp_find_unused_parameters=False,
        )
        Trainer(model=model, args=args, train_dataset=TokenData()).train()
        rank, world = args.process_index, args.world_size
    result = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if mode != "lora":
        for name, layer in tbn_layers(pack_model(model)):
            result[f"{name}.tile"], result[f"{name}.alpha"] = layer.tile.clone(), layer.alpha.clone()
    result["world_size"] = torch.tensor(world)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
