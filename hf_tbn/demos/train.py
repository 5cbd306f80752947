"""QAT fine-tuning with Trainer: the data, model and Trainer setup shared by ``hf-tbn train`` and the demo.

Data goes through ``datasets`` (one text column, plus a label column for classification);
models are TBN folders, or full-precision folders quantized on load; training is the latent
form (docs/huggingface.md, "Train (quantization-aware training)").
"""

from __future__ import annotations

import copy
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from datasets import ClassLabel, Dataset, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import SaveStrategy

from hf_tbn import TBNConfig, to_latent_model
from hf_tbn.distill import OPTION_FIELDS, DistillationTrainer, DistillConfig
from hf_tbn.qat import TBNTrainer

Task = Literal["classification", "causal-lm"]
TASKS: tuple[str, ...] = get_args(Task)

# TrainingArguments defaults for QAT that differ from transformers' own: the latent weights
# need a larger learning rate than full-precision fine-tuning (docs/quality.md).
QAT_DEFAULTS: dict[str, Any] = {"learning_rate": 5e-4, "warmup_steps": 0.1, "lr_scheduler_type": "linear"}
# Where --teacher_fine_tune's teacher is saved, inside the checkpoints folder (TrainingArguments.output_dir),
# and where it is fine-tuned until then (an interrupted fine-tune leaves only this).
TEACHER_FOLDER = "teacher"
TEACHER_STAGING = f"{TEACHER_FOLDER}.partial"
# Tokens per example of `hf-tbn train` without --max_length or --block_size.
MAX_LENGTH = 128
# load_dataset builder of each data file suffix.
BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TrainArguments:
    """``hf-tbn train``'s own options; transformers' ``TrainingArguments`` come beside them."""

    task: Task = field(
        default="classification", metadata={"help": "sequence classification (text, label) or causal LM (text)"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    label_column: str = field(default="label", metadata={"help": "column holding the class (classification)"})
    validation_file: str | None = field(default=None, metadata={"help": "evaluation data (default: split DATA)"})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "share of DATA held out for evaluation without --validation_file (0: none)"})
    max_length: int | None = field(default=None, metadata={
        "help": f"tokens per example, longer texts are truncated; unset: {MAX_LENGTH}"})
    block_size: int | None = field(default=None, metadata={
        "help": "causal-lm, instead of --max_length: concatenate the texts, each ended by EOS, and train on blocks "
                "of this many tokens, as transformers' run_clm does"})
    pack: bool = field(default=False, metadata={"help": "save the packed form instead of the latent form"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in --output_dir"})
    warmup: float | None = field(default=None, metadata={
        "help": "fraction of the steps that blend from the dense to the tiled weight (hf_tbn.warmup, 0: none); "
                "unset: the model's TBNConfig.warmup ('auto': 0.3, none for causal LMs)"})
    distill: bool = field(default=False, metadata={
        "help": "add distillation from a full-precision teacher to the loss (docs/distillation.md)"})
    teacher: str | None = field(default=None, metadata={
        "help": "--distill's teacher, a full-precision folder or Hub id; unset: SRC before conversion "
                "(a TBN SRC or a new classification head needs one, or --teacher_fine_tune)"})
    teacher_fine_tune: bool = field(default=False, metadata={
        "help": "--distill: first fine-tune SRC in full precision on DATA with the same budget and distil from "
                f"it (BitDistill's first stage); saved as OUTPUT_DIR/{TEACHER_FOLDER}, reused by --resume"})
    teacher_learning_rate: float | None = field(default=None, metadata={
        "help": "--teacher_fine_tune: its learning rate (unset: --learning_rate)"})
    # DistillConfig's fields, with its defaults (hidden_layers keeps its own: every layer).
    kl_weight: float = field(default=DistillConfig.kl_weight, metadata={"help": "--distill: final KL weight"})
    temperature: float = field(default=DistillConfig.temperature, metadata={"help": "--distill: KL temperature"})
    task_weight: float = field(default=DistillConfig.task_weight, metadata={
        "help": "--distill: weight of the task loss (0: distillation only)"})
    kl_start: float = field(default=DistillConfig.kl_start, metadata={
        "help": "--distill: fraction of training before the KL term starts"})
    kl_ramp: float = field(default=DistillConfig.kl_ramp, metadata={
        "help": "--distill: fraction of training over which the KL weight then rises to --kl_weight"})
    hidden_weight: float = field(default=DistillConfig.hidden_weight, metadata={
        "help": "--distill: weight of the hidden-state term (0: off)"})
    skip_teacher_mistakes: bool = field(default=DistillConfig.skip_teacher_mistakes, metadata={
        "help": "--distill, classification: leave out of the KL the examples the teacher gets wrong"})


def distill_config(args: TrainArguments) -> DistillConfig | None:
    """The distillation settings of ``args.distill``; None without it, when its options must keep their defaults."""
    given = {name: getattr(args, name) for name in OPTION_FIELDS}  # each a TrainArguments field
    if args.distill:
        if args.teacher_fine_tune and args.teacher is not None:
            raise ValueError(f"--teacher {args.teacher} and --teacher_fine_tune: give one (the teacher is either "
                             "that model or SRC fine-tuned first)")
        if args.teacher_learning_rate is not None and not args.teacher_fine_tune:
            raise ValueError("--teacher_learning_rate is an option of --teacher_fine_tune, which is not given")
        if args.skip_teacher_mistakes and args.task != "classification":
            raise ValueError(f"--skip_teacher_mistakes is for --task classification, not {args.task} (its labels are "
                             "compared with the teacher's top class)")
        return DistillConfig(**given)
    unused = [name for name, value in given.items() if value != getattr(DistillConfig, name)]
    unused += [name for name in ("teacher", "teacher_fine_tune", "teacher_learning_rate")
               if getattr(args, name) not in (None, False)]
    if unused:
        raise ValueError(f"--{unused[0]} is an option of --distill, which is not given")
    return None


def check_teacher(src: Path, teacher: str | None, labels: list[str] | None, fine_tune: bool = False) -> None:
    """Refuse a ``--distill`` teacher that would teach noise, before it is loaded.

    Without ``teacher`` the teacher is ``src`` before conversion (:func:`hf_tbn.distill.load_teacher`),
    or with ``fine_tune`` ``src`` fine-tuned first (:func:`fine_tune_teacher`): ``src`` must be full
    precision and, without ``fine_tune``, for classification (``labels``: the student's classes in id
    order) a classifier of exactly these classes, since a new head is untrained. A given teacher
    must name the student's classes in the same order (or leave them unnamed, ``LABEL_i``).
    """
    source = str(src) if teacher is None else teacher
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        raise ValueError(f"--teacher {source}: {str(e).splitlines()[0]}") from None
    if teacher is None and getattr(config, "quantization_config", None) is not None:
        role = "be fine-tuned into the teacher" if fine_tune else "be the teacher"
        raise ValueError(f"--distill: {src} is already TBN, so it cannot {role}; pass --teacher, "
                         "a full-precision model (folder or Hub id) of the same architecture")
    if labels is None or fine_tune:
        return
    names = [config.id2label[i] for i in range(config.num_labels)]
    if teacher is None and names != labels:
        raise ValueError(f"--distill: {src}'s classification head is not trained on the data's classes {labels} "
                         f"(it has {names}), so it would teach noise; add --teacher_fine_tune, or pass a "
                         "full-precision classifier fine-tuned on the data with --teacher")
    if names != labels and names != [f"LABEL_{i}" for i in range(len(labels))]:
        raise ValueError(f"--teacher {teacher}: its classes {names} are not the student's {labels} in this order")


def fine_tune_teacher(src: Path, task: str, args: TrainingArguments, learning_rate: float | None,
                      tokenizer: PreTrainedTokenizerBase, train: Dataset, evaluation: Dataset | None = None,
                      labels: list[str] | None = None) -> Path:
    """``src`` fine-tuned in full precision on ``train`` with ``args``' budget: ``--teacher_fine_tune``'s teacher.

    BitDistill's first stage: a teacher fitted to the task teaches better than the checkpoint before
    conversion, and a new classification head has to be trained first (docs/distillation.md). The
    learning rate is ``learning_rate`` (None: ``args.learning_rate``). Saved, with ``tokenizer``, as
    ``args.output_dir/teacher`` once done; a saved one is reused, so ``--resume`` distils from the same teacher.
    """
    folder = Path(args.output_dir) / TEACHER_FOLDER
    if folder.is_dir():
        return folder
    staging = folder.with_name(TEACHER_STAGING)
    shutil.rmtree(staging, ignore_errors=True)
    teacher_args = copy.copy(args)
    teacher_args.output_dir, teacher_args.save_strategy = str(staging), SaveStrategy.NO
    if learning_rate is not None:
        teacher_args.learning_rate = learning_rate
    set_seed(args.seed)  # a new head starts the same in every run
    model = load_for_training(src, task, None, labels)
    trainer = make_trainer(model, teacher_args, task, tokenizer, train, evaluation)
    trainer.train()
    metrics = evaluate(trainer, task) if evaluation is not None else None  # every process takes part
    if metrics and trainer.is_world_process_zero():
        print(f"teacher evaluation: {metrics_line(metrics)}")
    trainer.save_model(str(staging))  # with the tokenizer; under DDP by the main process only
    if trainer.args.should_save:
        staging.rename(folder)
    trainer.accelerator.wait_for_everyone()
    return folder


def teacher_begun(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a ``--teacher_fine_tune`` teacher, saved or still being fine-tuned."""
    return any((Path(output_dir) / name).is_dir() for name in (TEACHER_FOLDER, TEACHER_STAGING))


def load_data(data: Path, args: TrainArguments, seed: int) -> tuple[Dataset, Dataset | None]:
    """Training and evaluation data: ``args.validation_file``, else ``args.eval_fraction`` of ``data``."""

    def read(path: Path) -> Dataset:
        if not path.is_file():
            raise ValueError(f"{path}: no such data file")
        if path.suffix not in BUILDERS:
            raise ValueError(f"{path}: data must be one of {sorted(BUILDERS)}, got {path.suffix!r}")
        return load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train")

    train = read(data)
    evaluation = read(Path(args.validation_file)) if args.validation_file is not None else None
    columns = [args.text_column, *([args.label_column] if args.task == "classification" else [])]
    for name, split in ((data, train), (args.validation_file, evaluation)):
        missing = [c for c in columns if split is not None and c not in split.column_names]
        if missing:
            raise ValueError(f"{name}: column {missing[0]!r} missing: the data has columns {split.column_names}")
    if evaluation is not None or args.eval_fraction <= 0:
        return train, evaluation
    parts = train.train_test_split(test_size=args.eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def check_task(task: str) -> str:
    """``task`` itself, if it is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def label_names(data: Dataset, column: str) -> list[str]:
    """Class names: a ``ClassLabel`` column's own names, otherwise the sorted distinct values."""
    feature = data.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return sorted({str(v) for v in data[column]})


def tokenize(data: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None, text_column: str,
             label_column: str | None = None, names: list[str] | None = None) -> Dataset:
    """``input_ids``/``attention_mask`` (truncated at ``max_length``; None: whole texts) and ``labels``: the
    index of each label's name in ``names``, or without ``label_column`` (a language model) the ids themselves."""
    ids = {name: i for i, name in enumerate(names or [])}
    feature = data.features[label_column] if label_column is not None else None

    def label_id(value: object) -> int:
        name = feature.int2str(value) if isinstance(feature, ClassLabel) else str(value)
        if name not in ids:
            raise ValueError(f"label {name!r} is not one of the model's labels {names}")
        return ids[name]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = dict(tokenizer([str(t) for t in batch[text_column]], truncation=max_length is not None,
                             max_length=max_length))
        out["labels"] = out["input_ids"] if label_column is None else [label_id(y) for y in batch[label_column]]
        return out

    return data.map(encode, batched=True, remove_columns=data.column_names)


def group_texts(data: Dataset, block_size: int, eos_token_id: int | None) -> Dataset:
    """Tokenized texts, each ended by EOS, concatenated and cut into rows of ``block_size`` tokens (the last,
    shorter block dropped), as transformers' run_clm example does: every row a whole block, no padding."""
    if block_size < 2:
        raise ValueError(f"block_size {block_size}: a block needs at least 2 tokens (one predicted)")
    end = [] if eos_token_id is None else [eos_token_id]

    def ended(row: list[int]) -> list[int]:
        return row if row[-1:] == end else row + end

    def cut(batch: dict[str, list]) -> dict[str, list]:
        ids = [t for row in batch["input_ids"] for t in ended(row)]
        blocks = [ids[start : start + block_size] for start in range(0, len(ids) - block_size + 1, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    grouped = data.map(cut, batched=True, batch_size=None, remove_columns=data.column_names)
    if len(grouped) == 0:
        tokens = sum(len(ended(row)) for row in data["input_ids"])
        raise ValueError(f"{tokens} tokens make no whole block of block_size {block_size}")
    return grouped


def label_config(names: list[str]) -> dict[str, Any]:
    """The config fields that name the classes (what ``pipeline("text-classification")`` reports)."""
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}


def load_for_training(src: Path, task: str, config: TBNConfig | None, labels: list[str] | None = None
                      ) -> PreTrainedModel:
    """The latent-form model to fine-tune: ``src`` quantized on load with ``config``, or (``config``
    None) a TBN folder loaded as saved. For classification see :func:`head_config`."""
    cls = AutoModelForSequenceClassification if check_task(task) == "classification" else AutoModelForCausalLM
    extra = head_config(src, labels) if labels else {}
    if config is not None:
        return cls.from_pretrained(src, quantization_config=config, **extra)
    return to_latent_model(cls.from_pretrained(src, **extra))


def head_config(src: Path, labels: list[str]) -> dict[str, Any]:
    """How to load ``src`` for the classes ``labels``: as saved when it names these classes (in its
    own order), with new class names for a base model or an unnamed head; a classifier of other
    named classes is refused."""
    saved = AutoConfig.from_pretrained(src)
    names = [saved.id2label[i] for i in range(saved.num_labels)]
    if sorted(names) == sorted(labels):
        return {}
    classifier = any(a.endswith("ForSequenceClassification") for a in saved.architectures or [])
    if classifier and names != [f"LABEL_{i}" for i in range(saved.num_labels)]:
        raise ValueError(f"{src}: the model's classes {names} are not the data's {labels}")
    return label_config(labels)


def model_labels(model: PreTrainedModel) -> list[str]:
    """The model's class names in id order."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose largest logit is the label."""
    return float((torch.as_tensor(logits).argmax(-1) == torch.as_tensor(labels)).float().mean())


def _classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": accuracy(torch.as_tensor(logits), torch.as_tensor(prediction.label_ids))}


def make_trainer(model: PreTrainedModel, args: TrainingArguments, task: str, tokenizer: PreTrainedTokenizerBase,
                 train: Dataset, evaluation: Dataset | None = None, distill: DistillConfig | None = None,
                 teacher: str | None = None, warmup: float | None = None) -> Trainer:
    """Trainer with the task's collator and metrics (accuracy for classification; loss, perplexity after).

    With ``distill``, a :class:`hf_tbn.distill.DistillationTrainer` with that loss and ``teacher``
    (None: the checkpoint ``model`` was loaded from, before conversion). ``warmup``: the warm-up fraction
    (None: the model's ``TBNConfig.warmup``).
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    classify = check_task(task) == "classification"
    # A language model's labels are its input ids, padded with -100 (the pad id may be EOS, which stays a label).
    collate = DataCollatorWithPadding(tokenizer) if classify else DataCollatorForSeq2Seq(tokenizer)
    common = {"model": model, "args": args, "train_dataset": train, "eval_dataset": evaluation,
              "data_collator": collate, "processing_class": tokenizer,
              "compute_metrics": _classification_metrics if classify else None}
    if distill is not None:
        return DistillationTrainer(**common, teacher=teacher, distill=distill, warmup=warmup)
    trainer = TBNTrainer(**common, warmup=warmup)
    if classify:
        # A classifier's loss is a per-batch mean (BERT's ignores num_items_in_batch), which transformers would
        # still treat as token-normalised: times the processes under DDP, undivided by the accumulation steps.
        trainer.model_accepts_loss_kwargs = False
    return trainer


def evaluate(trainer: Trainer, task: str) -> dict[str, float]:
    """``trainer.evaluate()``; for a language model also ``eval_perplexity``, the ``exp`` of the eval loss."""
    metrics = trainer.evaluate()
    if check_task(task) == "causal-lm":
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))  # 700: exp stays finite
    return metrics


def metrics_line(metrics: dict[str, Any]) -> str:
    """The float metrics as ``name value, ...`` (4 significant digits)."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))


@torch.no_grad()
def predict(model: PreTrainedModel, data: Dataset, collate: DataCollatorWithPadding, batch: int = 64) -> torch.Tensor:
    """Logits for the whole tokenized dataset, in order (any form, packed included; Trainer refuses packed)."""
    model.eval()
    rows = data.remove_columns([c for c in data.column_names if c == "labels"])
    out = [model(**collate([rows[i] for i in range(start, min(start + batch, len(rows)))])).logits
           for start in range(0, len(rows), batch)]
    return torch.cat(out)
