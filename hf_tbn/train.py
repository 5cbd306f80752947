"""QAT fine-tuning of a TBN model on a local dataset (CSV or JSON lines) with Trainer (``hf-tbn train``)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from .config import TBNConfig
from .convert import to_latent_model

TASKS = ("classification", "causal-lm")


@dataclass(frozen=True)
class TrainBudget:
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 5e-4
    max_length: int = 128
    seed: int = 0


def read_records(path: Path) -> list[dict]:
    """Rows of a ``.csv`` (header line) or ``.jsonl`` file."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix in (".jsonl", ".json"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    raise ValueError(f"{path}: data must be a .csv or .jsonl file")


def column(records: list[dict], name: str, path: Path) -> list:
    missing = [i for i, r in enumerate(records) if name not in r]
    if missing or not records:
        raise ValueError(f"{path}: column {name!r} missing (rows {missing[:5]}{'...' if len(missing) > 5 else ''})")
    return [r[name] for r in records]


class Rows(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def load_model(src: Path, task: str, config: TBNConfig, labels: list[str] | None) -> PreTrainedModel:
    """A TBN folder as saved, or a full-precision folder quantized on load with ``config``; latent form."""
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
             "label2id": {name: i for i, name in enumerate(labels)}} if labels else {}
    if json.loads((src / "config.json").read_text()).get("quantization_config") is None:
        return cls.from_pretrained(src, quantization_config=config, **extra)
    model = to_latent_model(cls.from_pretrained(src))
    if labels and model.config.num_labels != len(labels):
        raise ValueError(f"{src}: the model has {model.config.num_labels} labels, the data {len(labels)}: {labels}")
    return model


def train(src: Path, data: Path, out: Path, task: str, config: TBNConfig, budget: TrainBudget,
          text_column: str = "text", label_column: str = "label") -> PreTrainedModel:
    """Fine-tune (QAT) and return the trained latent model; Trainer's progress bar shows the run."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    records = read_records(data)
    texts = [str(t) for t in column(records, text_column, data)]
    tokenizer = AutoTokenizer.from_pretrained(src)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts, truncation=True, max_length=budget.max_length)
    if task == "classification":
        raw = [str(y) for y in column(records, label_column, data)]
        names = sorted(set(raw))
        items = [{"input_ids": ids, "attention_mask": m, "labels": names.index(y)}
                 for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], raw, strict=True)]
        collate = DataCollatorWithPadding(tokenizer)
    else:
        names = None
        items = [{"input_ids": ids, "attention_mask": m}
                 for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    model = load_model(src, task, config, names)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=budget.steps, per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate, warmup_steps=budget.steps // 10, logging_steps=max(budget.steps // 10, 1),
        save_strategy="no", report_to="none", seed=budget.seed, data_seed=budget.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    Trainer(model=model, args=args, train_dataset=Rows(items), data_collator=collate).train()
    tokenizer.save_pretrained(out)
    return model
