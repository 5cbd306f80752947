"""``hf-tbn export-mcu``: a saved TBN model to a folder of portable C99."""

from __future__ import annotations

import argparse
import math
import pickle
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when the command runs: ``hf-tbn -h`` stays fast
    from torch import nn


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must be integers like 1,28,28, got {text!r}") from None
    if not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got {text!r}")
    return shape


def _kib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of KiB, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of KiB >= 0, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export-mcu``."""
    parser = subparsers.add_parser(
        "export-mcu",
        help="export a small sequential TBN model to microcontroller C",
        description="Export a sequential model saved whole with torch.save (TBN layers in either form) to C99: "
        "<name>.h, <name>.c and the runtime. The file is read with torch.load(weights_only=True) allowing "
        "only the module classes the exporter supports; --trust-pickle unpickles anything (trusted files only).",
    )
    parser.add_argument("model", help="file written by torch.save(model)")
    parser.add_argument("--input-shape", type=_shape, required=True, help="one input without the batch, e.g. 1,28,28")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default="tbn_model",
                        help="C identifier naming <name>.h/.c and <name>_run(in, out) (default tbn_model)")
    parser.add_argument("--flash-kb", type=_kib, default=None, help="refuse if constants exceed this many KiB")
    parser.add_argument("--ram-kb", type=_kib, default=None, help="refuse if the arena exceeds this many KiB")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load with full unpickling (runs code from the file: only for files you trust)")
    parser.set_defaults(func=run)
    return parser


def safe_classes() -> list[type]:
    """The classes a whole saved model may hold under ``weights_only=True``: the supported layers and containers."""
    import torch
    from torch import nn

    from .. import layers
    from ..kernels.conv import ConvGeometry
    from .lower import SUPPORTED

    return [*SUPPORTED, nn.Sequential, nn.ModuleList, layers.TBNLinear, layers.TBNConv2d, ConvGeometry, torch.Size]


def load_model(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """The module saved at ``path``: restricted unpickling unless ``trust_pickle``; a ValueError says what failed."""
    import torch

    try:
        if trust_pickle:
            model = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(safe_classes()):
                model = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"{found.group(1)} is not allowed" if found else str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: refused by the restricted loader ({reason}); the exporter's classes are "
                         f"allowed, anything else needs --trust-pickle (only for files you trust)") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: cannot be read as a torch.save file ({err})") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a module")
    return model


def run(args: argparse.Namespace) -> int:
    """Load, export, print the plan; a refused model prints the reason and returns 1."""
    from .export import export_model

    try:
        model = load_model(args.model, args.trust_pickle)
        result = export_model(model, args.input_shape, args.out, args.name, args.flash_kb, args.ram_kb)
    except ValueError as err:
        print(f"hf-tbn export-mcu: error: {err}", file=sys.stderr)
        return 1
    print(result.plan.summary())
    print(f"wrote {result.header} and {result.source} (+ runtime) to {result.directory}")
    return 0
