"""Causal language modelling: SmolLM2-135M on the Debian ``fortunes`` text, fp vs binary vs TBN.

Held-out perplexity of the pretrained full-precision model, of each TBN variant right after
conversion (no training) and after quantization-aware fine-tuning with Trainer; the
full-precision model gets the same fine-tuning budget. Fortunes are shuffled with the seed and
5% are held out; both splits are cut into blocks of ``block`` tokens.

    .venv/bin/python scripts/quality_lm.py                         # full budget, writes docs/
    .venv/bin/python scripts/quality_lm.py --quick --out /tmp/q    # CI smoke run
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
from results import Task, measure, publish, quality_parser
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments

from hf_tbn import TBNConfig, pack_model
from hf_tbn.demos.models import smollm2_dir

FORTUNES = Path("/usr/share/games/fortunes")
FACTORS = [None, 1, 2, 4, 8]


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def fortunes(tokenizer: AutoTokenizer, block: int, seed: int) -> tuple[Blocks, Blocks]:
    """Train and held-out token blocks from every fortune file (``%``-separated texts)."""
    files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix)
    if not files:
        raise FileNotFoundError(f"no fortune files under {FORTUNES}: install the Debian package fortunes")
    texts = [t.strip() for p in files for t in p.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    texts = [t for t in texts if t]
    random.Random(seed).shuffle(texts)
    n_test = len(texts) // 20

    def blocks(part: list[str]) -> Blocks:
        ids = torch.tensor(tokenizer("\n\n".join(part))["input_ids"])
        return Blocks(ids[: len(ids) // block * block].view(-1, block))

    return blocks(texts[n_test:]), blocks(texts[:n_test])


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, data: Blocks, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch):
        ids = data.ids[start : start + batch]
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.numel() - ids.shape[0]  # predicted tokens
        total, count = total + float(loss) * n, count + n
    return math.exp(total / count)


def main() -> None:
    parser = quality_parser(__doc__)
    parser.add_argument("--cache", type=Path, default=Path("outputs/smollm2"), help="plain HF copy of SmolLM2")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4, help="blocks of 128 tokens per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-blocks", type=int, default=64)
    args = parser.parse_args()
    model_dir = smollm2_dir(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    block = 32 if args.quick else 128
    train, test = fortunes(tokenizer, block, args.seed)
    test = Blocks(test.ids[: 4 if args.quick else args.eval_blocks])
    steps = 2 if args.quick else args.steps
    budget = {"steps": steps, "batch_size": args.batch, "block_tokens": block, "lr": args.lr, "scheduler": "cosine",
              "optimizer": "AdamW", "seed": args.seed, "train_blocks": len(train), "eval_tokens": test.ids.numel()}
    rows = []
    for p in [None, 4] if args.quick else FACTORS:
        extra = {} if p is None else {"quantization_config": TBNConfig(compression_factor=p)}
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra)
        before = perplexity(model, test)
        targs = TrainingArguments(
            output_dir=str(args.out / "trainer-tmp"), max_steps=steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, save_strategy="no",
            report_to="none", use_cpu=True, seed=args.seed, data_seed=args.seed, logging_steps=10,
            disable_tqdm=True,
        )
        start = time.time()
        Trainer(model=model, args=targs, train_dataset=train).train()
        seconds = time.time() - start
        if p is not None:
            pack_model(model)
        after = perplexity(model, test)
        rows.append(measure(p, model, {"perplexity after fine-tuning": after, "perplexity before": before}, seconds))
        print(f"lm {rows[-1].variant}: ppl before {before:.1f} after {after:.1f} "
              f"bits/weight {rows[-1].bits_converted:.3f} {seconds:.0f}s", flush=True)
        del model
    publish(Task("lm", "SmolLM2-135M on fortunes: held-out perplexity", "perplexity after fine-tuning", False,
                 budget, rows, notes="'before' is the model as loaded (for TBN: right after conversion, no "
                 "training). Converted: every decoder Linear; the tied embeddings / lm_head stay full precision."),
            args.out)


if __name__ == "__main__":
    main()
