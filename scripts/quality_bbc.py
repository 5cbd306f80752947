"""BBC News topic classification fine-tuned from pretrained all-MiniLM-L6-v2, fp vs binary vs TBN.

The TBN variants load through ``from_pretrained(..., quantization_config=TBNConfig(p))`` and
fine-tune with Trainer (quantization-aware training); all variants share data, budget and seed.

    .venv/bin/python scripts/quality_bbc.py                          # full budget, writes docs/
    .venv/bin/python scripts/quality_bbc.py --quick --out /tmp/q     # CI smoke run
"""

from __future__ import annotations

import time

import torch
from results import Task, measure, publish, quality_parser
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_tbn import TBNConfig, pack_model
from hf_tbn.demos.bbc import bbc_news, split
from hf_tbn.demos.models import minilm_dir
from hf_tbn.demos.train import accuracy, predict, tokenize

FACTORS = [None, 1, 2, 4, 8, 16]
QUICK_FACTORS = [None, 4]


def main() -> None:
    parser = quality_parser(__doc__)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per article")
    args = parser.parse_args()
    budget = {"epochs": 0.05 if args.quick else args.epochs, "batch_size": 16,
              "max_length": 32 if args.quick else args.max_length,
              "lr": args.lr, "scheduler": "linear, 10% warm-up", "seed": args.seed, "test_fraction": 0.2}

    texts, labels = bbc_news()
    train_idx, test_idx = split(len(texts), budget["test_fraction"], args.seed)
    if args.quick:
        train_idx, test_idx = train_idx[:64], test_idx[:32]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())

    def encode(idx: list[int]) -> Encoded:
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=budget["max_length"])
        return Encoded({k: list(v) for k, v in enc.items()}, [labels[i] for i in idx])

    train, test = encode(train_idx), encode(test_idx)
    collate = DataCollatorWithPadding(tokenizer)
    budget.update(train_articles=len(train), test_articles=len(test))

    rows = []
    for p in QUICK_FACTORS if args.quick else FACTORS:
        torch.manual_seed(args.seed)  # the same classification head for every variant
        extra = {} if p is None else {"quantization_config": TBNConfig(compression_factor=p)}
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=5, **extra)
        targs = TrainingArguments(
            output_dir=str(args.out / "trainer-tmp"), num_train_epochs=budget["epochs"],
            per_device_train_batch_size=budget["batch_size"], learning_rate=args.lr, warmup_steps=0.1,
            lr_scheduler_type="linear", save_strategy="no", report_to="none", use_cpu=True, seed=args.seed,
            data_seed=args.seed, logging_strategy="no", disable_tqdm=True,
        )
        start = time.time()
        Trainer(model=model, args=targs, train_dataset=train, data_collator=collate).train()
        seconds = time.time() - start
        if p is not None:
            pack_model(model)
        acc = accuracy(predict(model, test, collate), test)
        rows.append(measure(p, model, {"test accuracy %": 100 * acc}, seconds))
        print(f"bbc {rows[-1].variant}: accuracy {100 * acc:.2f}%  bits/weight {rows[-1].bits_converted:.3f}  "
              f"{seconds:.0f}s", flush=True)
    publish(Task("bbc", "BBC News, all-MiniLM-L6-v2 fine-tuned (Trainer)", "test accuracy %", True, budget, rows,
                 notes="Converted: every encoder Linear (all above min_compress_size = 64,000 weights); "
                       "embeddings, LayerNorms and the classification head stay full precision."), args.out)


if __name__ == "__main__":
    main()
