"""``hf-tbn`` subcommands for Hugging Face folders: quantize, pack, inspect, train, demo."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, PreTrainedModel

from .config import TBNConfig
from .convert import pack_model
from .demo import DemoBudget, run_demo
from .hub import save_tbn, tbn_config
from .report import format_table
from .train import TASKS, TrainBudget, train

# Files save_pretrained writes itself, or that describe the full-precision weights only.
_NOT_COPIED = {"config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "README.md", "generation_config.json"}


def model_class(folder: Path) -> type[PreTrainedModel]:
    """The architecture recorded in the folder's config.json (AutoModel when none is recorded)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder}: no config.json; expected a transformers model folder")
    archs = json.loads(config_file.read_text()).get("architectures") or []
    return getattr(transformers, archs[0], AutoModel) if archs else AutoModel


def copy_companions(src: Path, out: Path) -> None:
    """Tokenizer, preprocessor and other small top-level files travel with the converted model."""
    for f in src.iterdir():
        if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy2(f, out / f.name)


def _config_from(args: argparse.Namespace, form: str) -> TBNConfig:
    return TBNConfig(
        compression_factor=args.p, min_compress_size=args.min_compress_size, form=form,
        modules_to_not_convert=args.exclude or None, alpha_mode=args.alpha_mode,
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--p", type=int, default=4, help="compression factor p (default 4)")
    p.add_argument("--min-compress-size", type=int, default=64_000, help="layers with fewer weights get p=1")
    p.add_argument("--exclude", action="append", help="module-name pattern kept full precision (repeatable)")
    p.add_argument("--alpha-mode", default="per_tile", choices=("per_tile", "per_layer"))


def cmd_quantize(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = model_class(src).from_pretrained(src, quantization_config=_config_from(args, args.form), dtype=dtype)
    save_tbn(model, out, base_model=args.base_model or str(src))
    copy_companions(src, out)
    print(format_table(model, max_rows=args.max_rows))
    print(f"wrote {out}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    model = model_class(src).from_pretrained(src)
    tbn_config(model)
    pack_model(model)
    save_tbn(model, out, base_model=args.base_model)
    copy_companions(src, out)
    print(format_table(model, max_rows=args.max_rows))
    print(f"wrote {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    model = model_class(folder).from_pretrained(folder)
    config = tbn_config(model)
    print(f"{folder}: {type(model).__name__}, TBN form {config.form}, alpha mode {config.alpha_mode}")
    print(format_table(model, max_rows=args.max_rows))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    budget = TrainBudget(args.steps, args.batch_size, args.lr, args.max_length, args.seed)
    print(f"QAT budget: {budget}")
    out = Path(args.out)
    model = train(Path(args.src), Path(args.data), out, args.task, _config_from(args, "latent"), budget,
                  args.text_column, args.label_column)
    if args.pack:
        pack_model(model)
    save_tbn(model, out, base_model=args.src)
    print(f"wrote {out} ({model.config.quantization_config.form} form)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    budget = DemoBudget(compression_factor=args.p, max_length=args.max_length, train_steps=args.steps,
                        batch_size=args.batch_size, eval_examples=args.eval_examples, seed=args.seed)
    run_demo(Path(args.output_dir), budget)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register quantize, pack, inspect, train and demo."""
    q = subparsers.add_parser("quantize", help="convert a full-precision model folder to TBN")
    q.add_argument("src", help="full-precision transformers model folder")
    q.add_argument("out", help="output folder")
    _add_config_args(q)
    q.add_argument("--form", default="packed", choices=("latent", "packed"), help="saved form (default packed)")
    q.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype of the unconverted tensors")
    q.add_argument("--base-model", help="base model id for the model card (default: SRC)")
    q.add_argument("--max-rows", type=int, default=20, help="layer rows to print")
    q.set_defaults(func=cmd_quantize)

    p = subparsers.add_parser("pack", help="latent TBN folder -> packed TBN folder (tiles + scales)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--base-model", help="base model id for the model card")
    p.add_argument("--max-rows", type=int, default=20)
    p.set_defaults(func=cmd_pack)

    i = subparsers.add_parser("inspect", help="per-layer table: shape, p, bytes, bits per weight, totals")
    i.add_argument("dir")
    i.add_argument("--max-rows", type=int, default=None, help="layer rows to print (default all)")
    i.set_defaults(func=cmd_inspect)

    t = subparsers.add_parser("train", help="QAT fine-tuning with Trainer on a local .csv/.jsonl dataset")
    t.add_argument("src", help="TBN folder, or full-precision folder (quantized on load with --p ...)")
    t.add_argument("data", help=".csv (with header) or .jsonl file")
    t.add_argument("out", help="output folder")
    t.add_argument("--task", default="classification", choices=TASKS)
    t.add_argument("--text-column", default="text")
    t.add_argument("--label-column", default="label")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--pack", action="store_true", help="save the packed form instead of the latent form")
    _add_config_args(t)
    t.set_defaults(func=cmd_train)

    d = subparsers.add_parser("demo", help="MiniLM + BBC News, TBN p=4, QAT, pack, save, reload (README main job)")
    d.add_argument("--output-dir", default="hf-tbn-demo", help="runs go to fresh timestamped folders under it")
    d.add_argument("--p", type=int, default=DemoBudget.compression_factor)
    d.add_argument("--steps", type=int, default=DemoBudget.train_steps)
    d.add_argument("--batch-size", type=int, default=DemoBudget.batch_size)
    d.add_argument("--max-length", type=int, default=DemoBudget.max_length)
    d.add_argument("--eval-examples", type=int, help="evaluate on the first N test articles (default all)")
    d.add_argument("--seed", type=int, default=DemoBudget.seed)
    d.set_defaults(func=cmd_demo)
