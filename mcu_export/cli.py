"""``hf-tbn export-mcu``: a saved TBN model to a folder of portable C99."""

from __future__ import annotations

import argparse
import sys

import torch

from .export import export_model


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must be integers like 1,28,28, got {text!r}") from None
    if not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got {text!r}")
    return shape


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export-mcu``."""
    parser = subparsers.add_parser(
        "export-mcu",
        help="export a small sequential TBN model to microcontroller C",
        description="Export a sequential model saved whole with torch.save (TBN layers in either form; "
        "loading unpickles it, so only use trusted files) to C99: <name>.h, <name>.c and the runtime.",
    )
    parser.add_argument("model", help="file written by torch.save(model)")
    parser.add_argument("--input-shape", type=_shape, required=True, help="one input without the batch, e.g. 1,28,28")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default="tbn_model", help="C prefix: <name>_run(in, out) (default tbn_model)")
    parser.add_argument("--flash-kb", type=float, default=None, help="refuse if constants exceed this many KiB")
    parser.add_argument("--ram-kb", type=float, default=None, help="refuse if the arena exceeds this many KiB")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load, export, print the plan; a refused model prints the reason and returns 1."""
    model = torch.load(args.model, map_location="cpu", weights_only=False)
    if not isinstance(model, torch.nn.Module):
        print(f"hf-tbn export-mcu: error: {args.model} holds a {type(model).__name__}, not a module", file=sys.stderr)
        return 1
    try:
        result = export_model(model, args.input_shape, args.out, args.name, args.flash_kb, args.ram_kb)
    except ValueError as err:
        print(f"hf-tbn export-mcu: error: {err}", file=sys.stderr)
        return 1
    print(result.plan.summary())
    print(f"wrote {result.header} and {result.source} (+ runtime) to {result.directory}")
    return 0
