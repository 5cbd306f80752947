"""The exporter's Python API: a TBN model in, a self-contained C99 folder out."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .codegen import NIBBLE_TABLE_ROWS, Generated, check_prefix, generate
from .lower import Op, lower, prepare

RUNTIME_SOURCES = ("tbn_runtime.h", "tbn_runtime.c")
BOARD_SOURCES = ("tbn_harness.c", "tbn_startup.c", "tbn_board.ld")


@dataclass(frozen=True)
class ExportPlan:
    """What an export will write and the memory it commits to, before anything is written."""

    prefix: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    ops: tuple[Op, ...]
    generated: Generated

    @property
    def flash_bytes(self) -> int:
        """Constant data the model puts in flash (weights, scales, biases, geometry); code excluded."""
        return self.generated.const_bytes

    @property
    def ram_bytes(self) -> int:
        """The static activation arena (the model's only RAM besides a few stack words)."""
        return self.generated.arena_bytes

    def summary(self) -> str:
        """One line per runtime step, then the sizes."""
        lines = [f"{i}: {op.name} {op.kind} {op.in_shape} -> {op.out_shape}" for i, op in enumerate(self.ops)]
        lines.append(
            f"weights {self.generated.weight_bytes} B, constants {self.flash_bytes} B (flash), "
            f"arena {self.ram_bytes} B (RAM)"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class ExportResult:
    """A written export: the model's header and source next to a copy of the runtime."""

    plan: ExportPlan
    directory: Path

    @property
    def header(self) -> Path:
        return self.directory / f"{self.plan.prefix}.h"

    @property
    def source(self) -> Path:
        return self.directory / f"{self.plan.prefix}.c"

    def c_sources(self) -> list[Path]:
        """The C files to compile for the model alone."""
        return [self.source, self.directory / "tbn_runtime.c"]


def plan_export(model: nn.Module, input_shape: tuple[int, ...], prefix: str = "tbn_model",
                nibble_table_rows: int = NIBBLE_TABLE_ROWS) -> ExportPlan:
    """Lower ``model`` (either TBN form; not modified) and generate its C, without writing files.

    ``nibble_table_rows``: tiled layers with at least this many tile rows use 16-entry nibble
    tables, the others 4-entry pair tables (the default is the measured break-even, docs/mcu.md).
    """
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or min(input_shape) <= 0:
        raise ValueError(f"input_shape must be positive dimensions without the batch, got {input_shape}")
    prefix = check_prefix(prefix)
    prepared = prepare(model)
    try:
        ops = lower(prepared, input_shape)  # checks each layer's input before running it
        with torch.no_grad():
            output_shape = tuple(prepared(torch.zeros(1, *input_shape)).shape[1:])
    except (RuntimeError, IndexError) as err:  # e.g. a pooling window larger than its input
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"input shape {input_shape} does not fit {type(model).__name__}: {reason}") from None
    description = f"{prefix}: {type(model).__name__}, input {input_shape}, output {output_shape}, {len(ops)} steps"
    return ExportPlan(prefix, input_shape, output_shape, tuple(ops),
                      generate(ops, input_shape, output_shape, prefix, description, nibble_table_rows))


def check_budget(plan: ExportPlan, flash_kb: float | None = None, ram_kb: float | None = None) -> None:
    """Refuse a model whose constants or arena exceed the budgets, saying what it needs.

    A budget must be a finite number >= 0 (NaN would silently turn the check off).
    """
    for flag, budget in (("--flash-kb", flash_kb), ("--ram-kb", ram_kb)):
        if budget is not None and not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
            raise ValueError(f"budget {flag} must be a finite number of KiB >= 0, got {budget!r}")
    problems = []
    if flash_kb is not None and plan.flash_bytes > flash_kb * 1024:
        problems.append(f"flash: needs {plan.flash_bytes} bytes ({plan.flash_bytes / 1024:.1f} KB) of constants, "
                        f"budget --flash-kb {flash_kb:g} ({int(flash_kb * 1024)} bytes)")
    if ram_kb is not None and plan.ram_bytes > ram_kb * 1024:
        problems.append(f"RAM: needs {plan.ram_bytes} bytes ({plan.ram_bytes / 1024:.1f} KB) of activation arena, "
                        f"budget --ram-kb {ram_kb:g} ({int(ram_kb * 1024)} bytes)")
    if problems:
        raise ValueError(f"model {plan.prefix} does not fit: " + "; ".join(problems))


def export_model(model: nn.Module, input_shape: tuple[int, ...], out_dir: str | Path, prefix: str = "tbn_model",
                 flash_kb: float | None = None, ram_kb: float | None = None,
                 nibble_table_rows: int = NIBBLE_TABLE_ROWS) -> ExportResult:
    """Export ``model`` to ``out_dir``: ``<prefix>.h``, ``<prefix>.c`` and the runtime files.

    ``input_shape`` excludes the batch, e.g. ``(1, 28, 28)``. The budgets (KiB) are checked
    before anything is written. The board files (harness, startup, linker script) are copied
    too, so the folder builds for the host and for the Cortex-M4 test board as it is.
    """
    plan = plan_export(model, input_shape, prefix, nibble_table_rows)
    check_budget(plan, flash_kb, ram_kb)
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    result = ExportResult(plan, directory)
    result.header.write_text(plan.generated.header)
    result.source.write_text(plan.generated.source)
    runtime = resources.files(__package__).joinpath("runtime")
    for name in RUNTIME_SOURCES + BOARD_SOURCES:
        with resources.as_file(runtime.joinpath(name)) as src:
            shutil.copyfile(src, directory / name)
    return result
