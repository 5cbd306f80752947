"""The ``hf-tbn`` command line tool: the parser here, light; each command's code is imported when it runs.

User mistakes (a missing folder, a folder that is not a model, a bad value) end in one line
``hf-tbn: error: ...`` on stderr and exit status 2, as argparse's own errors do.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .mcu_export.cli import add_parser as add_export_mcu
from .version import version


class UserError(Exception):
    """A mistake in the command line or its input; printed as one line, exit status 2."""


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse prints the usage first)."""

    def error(self, message: str) -> None:
        self.exit(2, f"hf-tbn: error: {message} (see: {self.prog} -h)\n")


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """Runs ``hf_tbn.commands.<name>``, importing it (torch, transformers) only then."""

    def run(args: argparse.Namespace) -> int:
        from . import commands

        return getattr(commands, name)(args)

    return run


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The TBNConfig options; unset ones keep TBNConfig's defaults (a TBN source keeps its saved plan)."""
    p.add_argument("--p", type=int, help="compression factor p (default 4)")
    p.add_argument("--min-compress-size", type=int, help="layers with fewer weights get p=1 (default 64000)")
    p.add_argument("--exclude", action="append", help="module-name pattern kept full precision (repeatable)")
    p.add_argument("--alpha-mode", choices=("per_tile", "per_layer"), help="scales per tile copy (default) or one")
    p.add_argument("--alpha-param", choices=("latent", "tensor", "scalars"),
                   help="what the latent form learns the scales through (TBNConfig.alpha_param, default latent)")
    p.add_argument("--tile-layout", choices=("output", "input"),
                   help="tile copies along the output rows (default) or the input columns / channels "
                        "(TBNConfig.tile_layout)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """OUT and the options of every command that writes a TBN folder."""
    p.add_argument("out", help="output folder (written beside it, then renamed into place)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a non-empty folder")
    p.add_argument("--base-model", help="Hub id of the base model, for the model card")
    p.add_argument("--max-rows", type=int, default=20, help="layer rows to print")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every subcommand registered)."""
    parser = OneLineErrors(prog="hf-tbn", description="Tiled Bit Networks for Hugging Face models")
    parser.add_argument("--version", action="version", version=f"hf-tbn {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)

    q = subparsers.add_parser("quantize", help="convert a full-precision model folder to TBN")
    q.add_argument("src", help="full-precision transformers model folder (a TBN folder: repacked, same p)")
    add_output_args(q)
    add_config_args(q)
    q.add_argument("--form", default="packed", choices=("latent", "packed"), help="saved form (default packed)")
    q.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype of the unconverted tensors")
    q.set_defaults(func=_command("quantize"))

    p = subparsers.add_parser("pack", help="latent TBN folder -> packed TBN folder (tiles + scales)")
    p.add_argument("src", help="TBN model folder")
    add_output_args(p)
    p.set_defaults(func=_command("pack"))

    d = subparsers.add_parser("dequantize", help="TBN folder -> plain transformers folder (dense W_hat weights)")
    d.add_argument("src", help="TBN model folder")
    d.add_argument("out", help="output folder (written beside it, then renamed into place)")
    d.add_argument("--overwrite", action="store_true", help="replace OUT if it is a non-empty folder")
    d.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype of the dense weights")
    d.set_defaults(func=_command("dequantize"))

    i = subparsers.add_parser("inspect", help="per-layer table: shape, p, bytes, bits per weight, totals")
    i.add_argument("dir", help="TBN model folder")
    i.add_argument("--max-rows", type=int, default=None, help="layer rows to print (default all)")
    i.set_defaults(func=_command("inspect"))

    # Every option of train (its own and all of transformers' TrainingArguments) is parsed by
    # HfArgumentParser when it runs: `hf-tbn train -h` lists them.
    t = subparsers.add_parser("train", add_help=False, help="QAT fine-tuning with Trainer (hf-tbn train -h)")
    t.set_defaults(func=_command("train"), takes_rest=True)

    m = subparsers.add_parser("demo", help="MiniLM + BBC News, TBN p=4, QAT, pack, save, reload (README main job)")
    m.add_argument("--output-dir", default="hf-tbn-demo", help="runs go to fresh timestamped folders under it")
    # Unset options keep the demo's budget (hf_tbn.demos.bbc.DemoBudget), printed when it starts.
    m.add_argument("--p", type=int, dest="compression_factor", help="compression factor p")
    m.add_argument("--steps", type=int, dest="train_steps", help="QAT steps")
    m.add_argument("--batch-size", type=int, help="articles per step")
    m.add_argument("--max-length", type=int, help="tokens per article")
    m.add_argument("--eval-examples", type=int, help="evaluate on the first N test articles (default all)")
    m.add_argument("--seed", type=int)
    m.set_defaults(func=_command("demo"))

    add_export_mcu(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-tbn``."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "takes_rest", False):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError) as err:  # the library's ValueErrors name the bad value
        print(f"hf-tbn: error: {err}", file=sys.stderr)
        return 2
