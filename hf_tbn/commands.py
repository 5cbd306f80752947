"""``hf-tbn`` commands on Hugging Face folders: quantize, pack, dequantize, inspect, train, demo.

A command that writes a folder checks its input first, refuses to write over it (or into a
non-empty folder without ``--overwrite``), writes everything into a fresh folder beside OUT and
renames that into place at the end: a run that fails leaves OUT as it was. Every file of the
source that is not a weight file travels along (tokenizer, sentence-transformers modules,
license, README unless the model card replaces it).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModel, PreTrainedModel, TrainingArguments

from . import hub
from .cli import OneLineErrors, UserError, add_config_args, add_output_args
from .config import TBNConfig
from .convert import pack_model, tbn_layers, to_latent_model
from .report import format_table

if TYPE_CHECKING:
    from .demos.train import TrainArguments

# Weights in any format: the output's own weights are written by save_pretrained, and the
# source's full-precision weights (or exports of them) must not travel with a TBN model.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
                   ".onnx_data", ".ot", ".tflite", ".index.json")
EXPORT_FOLDERS = {"onnx", "openvino"}  # full-precision exports of the source model
METRICS_FILE = "eval_results.json"  # what train measured: true of the weights it wrote, not of later ones
# TBNConfig fields set from the command line (dest of the option -> field).
CONFIG_OPTIONS = {"p": "compression_factor", "min_compress_size": "min_compress_size",
                  "exclude": "modules_to_not_convert", "alpha_mode": "alpha_mode", "alpha_param": "alpha_param",
                  "tile_layout": "tile_layout"}


# -- input folders ----------------------------------------------------------------------------
def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json``; a one-line error when the folder is missing or not a model folder."""
    if not folder.is_dir():
        raise UserError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"{folder}: no config.json, not a transformers model folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None


def saved_tbn_config(folder: Path) -> dict[str, Any] | None:
    """The folder's TBN quantization config as saved; None for a full-precision folder."""
    quantization = read_config(folder).get("quantization_config")
    if quantization is None:
        return None
    if quantization.get("quant_method") != "tbn":
        raise UserError(f"{folder}: quantized with {quantization.get('quant_method')!r}, not TBN")
    return quantization


def require_tbn(folder: Path) -> dict[str, Any]:
    saved = saved_tbn_config(folder)
    if saved is None:
        raise UserError(f"{folder}: not a TBN folder (config.json has no quantization_config); "
                        "convert it with hf-tbn quantize")
    return saved


def model_class(folder: Path) -> type[PreTrainedModel]:
    """The architecture recorded in the folder's config.json (AutoModel when none is known)."""
    archs = read_config(folder).get("architectures") or []
    return getattr(transformers, archs[0], AutoModel) if archs else AutoModel


def load(folder: Path, **kwargs: Any) -> PreTrainedModel:
    """``from_pretrained`` of the folder's own class; missing weight files are a user error."""
    try:
        return model_class(folder).from_pretrained(folder, **kwargs)
    except OSError as e:
        raise UserError(f"{folder}: {e}".splitlines()[0]) from None


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TBNConfig fields given on the command line (unset options keep TBNConfig's defaults)."""
    return {field: getattr(args, dest) for dest, field in CONFIG_OPTIONS.items() if getattr(args, dest) is not None}


def check_same_config(src: Path, saved: dict[str, Any], overrides: dict[str, Any]) -> None:
    """A TBN folder keeps its saved plan: refuse options that ask for another one."""
    for field, value in overrides.items():
        if field == "modules_to_not_convert" or saved.get(field) != value:
            raise UserError(f"{src} is already TBN ({field}={saved.get(field)!r}); it cannot be converted again "
                            f"with {field}={value!r}: start from its full-precision source")


def quantization_for(src: Path, args: argparse.Namespace) -> TBNConfig | None:
    """The config to quantize ``src`` on load with (latent form), or None when ``src`` is TBN (loaded as saved)."""
    saved, overrides = saved_tbn_config(src), config_overrides(args)
    if saved is not None:
        check_same_config(src, saved, overrides)
        return None
    return TBNConfig(**overrides, form="latent")


# -- output folders ---------------------------------------------------------------------------
def check_output(out: Path, sources: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output that is, holds or sits inside an input, or a non-empty one without ``overwrite``."""
    target = out.resolve()
    for src in sources:
        source = src.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise UserError(f"{out}: the output would write over the input {src}; choose another folder")
    if target.exists():
        if not target.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        if any(target.iterdir()) and not overwrite:
            raise UserError(f"{out}: folder is not empty; pass --overwrite to replace it")


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into; it replaces ``out`` only if the block succeeds."""
    target = out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".{target.name}.{secrets.token_hex(4)}.partial"
    stage.mkdir()
    old = stage.with_suffix(".old")
    try:
        yield stage
        if target.exists():
            target.rename(old)
        try:
            stage.rename(target)
        except BaseException:
            if old.exists():
                old.rename(target)
            raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def copy_companions(src: Path, out: Path, skip: Sequence[str] = ()) -> None:
    """Copy every file and subfolder of ``src`` that is not a weight file and not already in ``out``.

    Hidden entries, full-precision exports (``onnx/``, ``openvino/``), the source's evaluation
    results and the names in ``skip`` stay behind.
    """
    for entry in src.iterdir():
        target = out / entry.name
        if entry.name.startswith(".") or entry.name in (*skip, METRICS_FILE) or target.exists():
            continue
        if entry.is_dir():
            if entry.name not in EXPORT_FOLDERS:
                shutil.copytree(entry, target, ignore=_weight_files)
        elif not entry.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(entry, target)


def _weight_files(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n.endswith(WEIGHT_SUFFIXES) or n.startswith(".")}


def write_tbn(model: PreTrainedModel, src: Path, args: argparse.Namespace, tokenizer: Any = None,
              metrics: dict[str, float] | None = None, task: str | None = None) -> int:
    """The common ending: save (card included) and the source's other files into OUT, then the table.

    ``metrics`` (Trainer's, of ``task`` on the held-out data) go into the card and ``eval_results.json``.
    """
    out = Path(args.out)
    results = hub.eval_results_from_metrics(metrics, task, Path(args.data).name) if metrics else None
    with staged_output(out) as stage:
        hub.save_tbn(model, stage, base_model=args.base_model, tokenizer=tokenizer, eval_results=results)
        if metrics:
            (stage / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        copy_companions(src, stage)
    print(format_table(model, max_rows=args.max_rows))
    print(f"wrote {out} ({model.config.quantization_config.form} form)")
    return 0


def pack_layers(model: PreTrainedModel) -> PreTrainedModel:
    """:func:`hf_tbn.pack_model` with a progress bar over the layers (shown on a terminal)."""
    for _, layer in tqdm(list(tbn_layers(model)), desc="pack", unit="layer", disable=None):
        layer.pack()
    return pack_model(model)  # records the packed form in the model's TBNConfig


# -- commands ---------------------------------------------------------------------------------
def quantize(args: argparse.Namespace) -> int:
    src = Path(args.src)
    check_output(Path(args.out), [src], args.overwrite)
    config = quantization_for(src, args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load(src, dtype=dtype) if config is None else load(src, quantization_config=config, dtype=dtype)
    if args.form == "packed":
        pack_layers(model)
    else:
        to_latent_model(model)
    return write_tbn(model, src, args)


def pack(args: argparse.Namespace) -> int:
    src = Path(args.src)
    check_output(Path(args.out), [src], args.overwrite)
    require_tbn(src)
    return write_tbn(pack_layers(load(src)), src, args)


def dequantize(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    check_output(out, [src], args.overwrite)
    require_tbn(src)
    model = load(src).dequantize(dtype=getattr(torch, args.dtype) if args.dtype else None)
    with staged_output(out) as stage:
        model.save_pretrained(stage)
        copy_companions(src, stage, skip=["README.md"])  # the TBN card does not describe the dense model
    print(f"wrote {out} (plain {type(model).__name__}, no TBN layers)")
    return 0


def inspect(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    require_tbn(folder)
    model = load(folder)
    config = hub.tbn_config(model)
    print(f"{folder}: {type(model).__name__}, TBN form {config.form}, alpha mode {config.alpha_mode}")
    print(format_table(model, max_rows=args.max_rows))
    return 0


def train(args: argparse.Namespace) -> int:
    """Parse the train options (``TrainArguments`` + ``TrainingArguments``), fine-tune, write OUT."""
    from transformers import AutoTokenizer

    from .demos import train as qat
    from .qat import end_process_group

    parser = train_parser(qat.TrainArguments, TrainingArguments)
    first, _ = parser.parse_known_args(args.rest)  # OUT decides the default checkpoint folder
    parser.set_defaults(output_dir=f"{first.out}-checkpoints")
    own, training, cli = parser.parse_args_into_dataclasses(args.rest)
    check_processes(training)
    src, data, out, checkpoints = Path(cli.src), Path(cli.data), Path(cli.out), Path(training.output_dir)
    distill = qat.distill_config(own)
    check_train_options(own)
    teacher = [Path(own.teacher)] if own.teacher is not None and Path(own.teacher).exists() else []
    check_output(out, [src, data, checkpoints, *teacher], cli.overwrite)
    check_output(checkpoints, [src], overwrite=True)
    if not own.resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise UserError(f"{checkpoints}: not empty; pass --resume to continue from its last checkpoint, "
                        "or choose another --output_dir")
    config = quantization_for(src, cli)
    resume = resume_point(own, training.resume_from_checkpoint, checkpoints)

    # Under DDP the main process reads and tokenizes first (into the datasets cache), after every process's checks.
    with training.main_process_first(desc="data"):
        train_set, eval_set = qat.load_data(data, own, training.seed)
        classify = own.task == "classification"
        model = qat.load_for_training(src, own.task, config,
                                      qat.label_names(train_set, own.label_column) if classify else None)
        tokenizer = AutoTokenizer.from_pretrained(src)
        label_column, names = (own.label_column, qat.model_labels(model)) if classify else (None, None)
        if distill is not None:
            qat.check_teacher(src, own.teacher, names, own.teacher_fine_tune)
        length = qat.MAX_LENGTH if own.max_length is None else own.max_length
        if own.block_size is not None:
            length = None  # blocks are cut from whole texts
        train_set, eval_set = (None if d is None else qat.tokenize(d, tokenizer, length, own.text_column,
                                                                  label_column, names) for d in (train_set, eval_set))
        if own.block_size is not None:
            held_out = own.validation_file or f"{data} (its evaluation share)"
            train_set, eval_set = blocks_of(own.block_size, tokenizer.eos_token_id,
                                            [(str(data), train_set), (held_out, eval_set)])
    existed = checkpoints.exists()
    teacher = own.teacher
    if own.teacher_fine_tune:
        teacher = str(qat.fine_tune_teacher(src, own.task, training, own.teacher_learning_rate, tokenizer,
                                            train_set, eval_set, names))
    trainer = qat.make_trainer(model, training, own.task, tokenizer, train_set, eval_set, distill, teacher,
                               own.warmup)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if training.should_save and not existed and checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # nothing was saved: leave no empty folder behind
    metrics = qat.evaluate(trainer, own.task) if eval_set is not None else None  # every process takes part
    del trainer  # before its process group ends (end_process_group)
    end_process_group()
    if not training.should_save:
        return 0  # under DDP the main process alone writes OUT
    if metrics:
        print(f"evaluation: {qat.metrics_line(metrics)}")
    if own.pack:
        pack_layers(model)
    task = "text-classification" if classify else "text-generation"
    return write_tbn(model, src, cli, tokenizer, metrics, task)


def check_train_options(own: TrainArguments) -> None:
    """Refuse ``hf-tbn train`` options (``TrainArguments``) out of range or in combinations it cannot honour."""
    if own.warmup is not None and not 0 <= own.warmup <= 1:
        raise UserError(f"--warmup {own.warmup}: expected a fraction of the training steps in [0, 1]")
    if own.block_size is not None and (own.task != "causal-lm" or own.block_size < 2):
        raise UserError(f"--block_size {own.block_size}: expected at least 2 tokens, with --task causal-lm")
    if own.block_size is not None and own.max_length is not None:
        raise UserError(f"--max_length {own.max_length} and --block_size {own.block_size}: give one (blocks are "
                        "cut from whole texts)")


def resume_point(own: TrainArguments, given: str | None, checkpoints: Path) -> str | None:
    """The checkpoint Trainer resumes from: ``--resume_from_checkpoint`` (``given``) if set, with ``--resume`` the
    last ``checkpoint-*`` under ``checkpoints``, else None (a fresh run)."""
    from transformers.trainer_utils import get_last_checkpoint

    from .demos.train import teacher_begun

    if not own.resume or given is not None:
        return given
    resume = get_last_checkpoint(checkpoints) if checkpoints.is_dir() else None
    # A --teacher_fine_tune teacher alone (saved or partial): QAT starts from the first step.
    if resume is None and not (own.teacher_fine_tune and teacher_begun(checkpoints)):
        raise UserError(f"--resume: no checkpoint-* folder in {checkpoints}")
    return resume


def check_processes(training: TrainingArguments) -> None:
    """Refuse a multi-process launch that ``training`` (``TrainingArguments``) does not run data-parallel: every
    process would train a model of its own and write OUT. Refuse FSDP: OUT is written from the main process's
    weights, which FSDP leaves as shards (docs/peft-and-distributed.md)."""
    if training.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UserError("FSDP (--fsdp, or accelerate launch --use_fsdp): train writes OUT from whole weights and "
                        "runs data-parallel only; launch with accelerate launch --multi_gpu (DDP)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training.world_size != launched:
        raise UserError(f"launched as {launched} processes (WORLD_SIZE={launched}) but Trainer would run "
                        f"{training.world_size}, each training its own copy: without a GPU pass --use_cpu "
                        "(data-parallel over gloo)")


def blocks_of(block_size: int, eos_token_id: int | None, splits: list[tuple[str, Any]]) -> list[Any]:
    """``hf-tbn train --block_size``: each tokenized split (beside what to call it) as whole blocks of text."""
    from .demos.train import group_texts

    blocks = []
    for name, split in splits:
        try:
            blocks.append(None if split is None else group_texts(split, block_size, eos_token_id))
        except ValueError as err:
            raise UserError(f"{name}: --block_size: {err}") from err
    return blocks


def train_parser(*dataclasses: type) -> argparse.ArgumentParser:
    """``HfArgumentParser`` over ``dataclasses`` plus SRC DATA OUT, the TBN options and ``--overwrite``."""
    from transformers import HfArgumentParser

    from .demos.train import QAT_DEFAULTS

    class Parser(OneLineErrors, HfArgumentParser):
        pass

    parser = Parser(dataclasses, prog="hf-tbn train",
                    description="QAT fine-tuning with Trainer. SRC is a TBN folder, or a full-precision folder "
                                "quantized on load with --p etc.; DATA a .csv, .json/.jsonl or .parquet file. "
                                "--distill adds a full-precision teacher (docs/distillation.md).")
    parser.add_argument("src", help="TBN or full-precision transformers model folder")
    parser.add_argument("data", help="training data: .csv (header line), .json/.jsonl or .parquet")
    add_output_args(parser)
    add_config_args(parser)
    parser.set_defaults(**QAT_DEFAULTS)
    return parser


def demo(args: argparse.Namespace) -> int:
    from .demos.bbc import DemoBudget, run_demo

    fields = ("compression_factor", "train_steps", "batch_size", "max_length", "eval_examples", "seed")
    run_demo(Path(args.output_dir), DemoBudget(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None}))
    return 0

