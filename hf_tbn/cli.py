"""The ``hf-tbn`` command line tool; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# Modules that each provide ``add_parser(subparsers)``; the parser's ``func`` runs the command.
COMMAND_MODULES: tuple[str, ...] = ("hf_tbn.commands", "hf_tbn.mcu_export.cli")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every subcommand registered)."""
    parser = argparse.ArgumentParser(prog="hf-tbn", description="Tiled Bit Networks for Hugging Face models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-tbn``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
