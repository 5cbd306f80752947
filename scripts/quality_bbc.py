"""BBC News topic classification fine-tuned from pretrained all-MiniLM-L6-v2, fp vs binary vs TBN.

The TBN variants load through ``from_pretrained(..., quantization_config=TBNConfig(p))`` and
fine-tune with Trainer (quantization-aware training); all variants share data, budget and seeds.
A variant is ``fp`` or ``P`` (TBN with p = P), optionally followed by ``+warmup`` (the dense-to-
tiled warm-up of hf_tbn.qat) and ``+distill`` (DistillationTrainer, teacher: the fp variant
fine-tuned with the same seed, so ``fp`` must come first; with ``--teacher-epochs E`` a separate fp
model fine-tuned E epochs with the same seed, scored as its own row). ``--validation`` scores on a
validation split taken from the training articles (for choosing settings; the test articles are
not used at all), otherwise on the test split.

    .venv/bin/python scripts/quality_bbc.py                          # full budget, writes docs/
    .venv/bin/python scripts/quality_bbc.py --validation --variants fp,8,8+warmup --seeds 1
    .venv/bin/python scripts/quality_bbc.py --variants 4+warmup+distill --teacher-epochs 6 --seeds 0,1,2
    .venv/bin/python scripts/quality_bbc.py --quick --out /tmp/q     # CI smoke run
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from results import (
    Task,
    add_lr_option,
    add_variant_options,
    budget_rates,
    checkpoint_bytes,
    layer_options,
    measure,
    over_seeds,
    publish,
    quality_parser,
    seeds_of,
    train_variant,
    trainer_output_dir,
    variant_plan,
    variant_rates,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from hf_tbn import TBNConfig, pack_model
from hf_tbn.demos.bbc import bbc_news, split
from hf_tbn.demos.models import minilm_dir
from hf_tbn.demos.train import accuracy, label_config, predict, tokenize
from hf_tbn.embeddings import DEFAULT_GROUP_SIZE, compress_dense_modules

if TYPE_CHECKING:
    from datasets import Dataset

    from hf_tbn.distill import DistillConfig

VARIANTS = "fp,1,2,4,8,16,4+warmup,8+warmup,16+warmup"
QUICK_VARIANTS = "fp,4+warmup+distill"
VALIDATION_FRACTION = 0.15


def main() -> None:
    parser = quality_parser(__doc__, several_seeds=True)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--teacher-epochs", type=float,
                        help="the +distill teacher: a separate fp model fine-tuned this long (default: the fp row)")
    add_lr_option(parser, "5e-4")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per article")
    parser.add_argument("--embedding-group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help="int4 group size of the compressed-embedding scores")
    add_variant_options(parser, VARIANTS)
    args = parser.parse_args()
    plan = variant_plan(args, VARIANTS, QUICK_VARIANTS, fp_teacher=args.teacher_epochs is None)
    own_teacher = args.teacher_epochs is not None and plan.distills
    variants, distill, seeds = plan.names, plan.distill, seeds_of(args)
    rates = variant_rates(parser, args.lr, variants + (["fp"] if own_teacher else []))  # the teacher is fp
    split_name = "validation" if args.validation else "test"
    metric = f"{split_name} accuracy %"
    budget = {"epochs": 0.05 if args.quick else args.epochs, "batch_size": 16,
              "max_length": 32 if args.quick else args.max_length, "lr": budget_rates(rates),
              "scheduler": "linear, 10% warm-up", "seeds": seeds, "test_fraction": 0.2,
              "warmup": args.warmup, **layer_options(args), "int4 embedding group": args.embedding_group_size,
              "distill": vars(distill) if plan.distills else None,
              **({"teacher_epochs": args.teacher_epochs} if own_teacher else {})}
    if args.validation:
        budget["validation_fraction_of_train"] = VALIDATION_FRACTION

    data = bbc_news()
    names = data.features["label"].names
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    collate = DataCollatorWithPadding(tokenizer)
    teacher_row = f"fp, {args.teacher_epochs:g} epochs (teacher)" if own_teacher else ""
    results: dict[str, list] = {**({teacher_row: []} if own_teacher else {}), **{v: [] for v in variants}}
    for seed in seeds:
        train_idx, test_idx = split(len(data), budget["test_fraction"], seed)
        if args.validation:
            n_val = round(VALIDATION_FRACTION * len(train_idx))
            test_idx, train_idx = train_idx[:n_val], train_idx[n_val:]
        if args.quick:
            train_idx, test_idx = train_idx[:64], test_idx[:32]
        train, scored = (tokenize(data.select(idx), tokenizer, budget["max_length"], "text", "label", names)
                         for idx in (train_idx, test_idx))
        budget.update(train_articles=len(train), scored_articles=len(scored))
        teacher = None
        if own_teacher:
            teacher_epochs = 0.05 if args.quick else args.teacher_epochs
            teacher, seconds = fine_tune(args, budget, (None, False, False), rates["fp"],
                                         teacher_epochs, seed, train, names, collate, distill, None)
            acc = 100 * accuracy(predict(teacher, scored, collate), scored["labels"])
            results[teacher_row].append(measure(teacher_row, teacher, {metric: acc}, seconds))
            print(f"bbc teacher seed {seed}: {split_name} accuracy {acc:.2f}%  {seconds:.0f}s", flush=True)
        for variant, (p, warmup, use_teacher) in zip(variants, plan.parsed, strict=True):
            model, seconds = fine_tune(args, budget, (p, warmup, use_teacher), rates[variant], budget["epochs"], seed,
                                       train, names, collate, distill, teacher)
            if p is None and not own_teacher:
                teacher = model
            elif p is not None:
                pack_model(model)
            acc = 100 * accuracy(predict(model, scored, collate), scored["labels"])
            metrics = {metric: acc}
            if p is not None:
                metrics.update(compressed_embedding_metrics(model, scored, collate, split_name,
                                                            args.embedding_group_size))
            results[variant].append(measure(f"p={variant}" if p is not None else None, model, metrics, seconds))
            print(f"bbc {variant} seed {seed}: {split_name} accuracy {acc:.2f}%  "
                  f"bits/weight {results[variant][-1].bits_converted:.3f}  {seconds:.0f}s", flush=True)
            last = seed == seeds[-1] and variant == variants[-1]
            publish_rows(args.validation, metric, budget, [over_seeds(r, metric, True) for r in results.values() if r],
                         args.out, last)


def fine_tune(args: argparse.Namespace, budget: dict, variant: tuple[int | None, bool, bool], lr: float,
              epochs: float, seed: int, train: Dataset, names: list[str], collate: DataCollatorWithPadding,
              distill: DistillConfig, teacher: torch.nn.Module | None) -> tuple[torch.nn.Module, float]:
    """MiniLM with a head for ``names`` fine-tuned as ``variant`` (results.parse_variant) at ``lr`` for ``epochs``;
    returns (model, training seconds)."""
    p = variant[0]
    torch.manual_seed(seed)  # the same classification head for every variant
    tbn = TBNConfig(compression_factor=p, **layer_options(args)) if p is not None else None
    extra = {} if tbn is None else {"quantization_config": tbn}
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), **label_config(names), **extra)
    targs = TrainingArguments(
        output_dir=trainer_output_dir(), num_train_epochs=epochs, per_device_train_batch_size=budget["batch_size"],
        learning_rate=lr, warmup_steps=0.1, lr_scheduler_type="linear", save_strategy="no", report_to="none",
        use_cpu=True, seed=seed, data_seed=seed, logging_strategy="no", disable_tqdm=True,
    )
    seconds = train_variant(variant, args.warmup, distill, teacher, model=model, args=targs, train_dataset=train,
                            data_collator=collate)
    return model, seconds


def compressed_embedding_metrics(model: torch.nn.Module, scored, collate, split_name: str,
                                 group_size: int) -> dict[str, float]:
    """Accuracy and checkpoint size of the trained packed model with its embeddings and head compressed
    afterwards (``hf_tbn.embeddings``, as ``TBNConfig.embedding_format`` stores them), for int8 and int4
    (groups of ``group_size``)."""
    metrics = {}
    for fmt in ("int8", "int4"):
        compressed = copy.deepcopy(model)
        compress_dense_modules(compressed, fmt, group_size)
        metrics[f"{split_name} accuracy % ({fmt} embeddings)"] = 100 * accuracy(
            predict(compressed, scored, collate), scored["labels"])
        metrics[f"checkpoint KB ({fmt} embeddings)"] = checkpoint_bytes(compressed) / 1024
    return metrics


def publish_rows(validation: bool, metric: str, budget: dict, rows: list, out: Path, show: bool) -> None:
    """Store the rows measured so far (results appear as they come; a stopped run keeps them)."""
    title = "BBC News, all-MiniLM-L6-v2 fine-tuned (Trainer)" + (": validation split" if validation else "")
    publish(Task("bbc-validation" if validation else "bbc", title, metric, True, budget, rows,
                 notes="Converted: every encoder Linear (all above min_compress_size = 64,000 weights); "
                       "embeddings, LayerNorms and the classification head stay full precision. +warmup: "
                       "hf_tbn.qat.QuantizationWarmup; +distill: hf_tbn.distill.DistillationTrainer, teacher = "
                       "the fp row's model fine-tuned with the same seed (docs/distillation.md)."), out, show)


if __name__ == "__main__":
    main()
