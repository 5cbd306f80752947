"""Build and run an export on the host (gcc) and on the emulated Cortex-M4 (qemu mps2-an386).

Both builds use the same harness (``runtime/tbn_harness.c``): inputs go in through
``tbn_inputs.bin`` and outputs come back through ``tbn_outputs.bin`` (semihosting file I/O
on the board). A missing tool raises ``RuntimeError`` naming the Debian packages.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from .export import ExportResult

APT_PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi binutils-arm-none-eabi qemu-system-arm"
STRICT_C99 = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-O2")
CORTEX_M4 = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
QEMU_BOARD = ("-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "none",
              "-semihosting-config", "enable=on,target=native", "-icount", "shift=0")
TIMEOUT_S = 900


def require(tool: str) -> str:
    """Absolute path of ``tool``, or a RuntimeError saying how to install it."""
    path = shutil.which(tool)
    if path is None:
        hint = "apt-get install gcc" if tool == "gcc" else f"apt-get install {APT_PACKAGES}"
        raise RuntimeError(f"{tool} not found on PATH; run scripts/setup.sh as root or `{hint}`")
    return path


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-input ``max|got - ref| / max|ref|`` over a batch of outputs: how an export is checked
    against PyTorch (each input's error relative to the scale of its own outputs)."""
    return ((got - ref).abs().amax(dim=1) / ref.abs().amax(dim=1)).max().item()


@dataclass(frozen=True)
class Program:
    """A model's C for the harness: its sources in ``directory`` (which also holds the harness and
    board files), the entry point ``<prefix>_run`` declared in ``<prefix>.h``, and its sizes in floats.

    ``library`` sources (e.g. CMSIS-NN for the int8 baseline) are compiled with ``flags`` and
    without the strict warnings."""

    directory: Path
    prefix: str
    sources: tuple[Path, ...]
    input_size: int
    output_size: int
    library: tuple[Path, ...] = ()
    flags: tuple[str, ...] = ()


def program(export: ExportResult | Program) -> Program:
    """The :class:`Program` of an export (a Program is returned as it is)."""
    if isinstance(export, Program):
        return export
    g = export.plan.generated
    return Program(export.directory, export.plan.prefix, tuple(export.c_sources()), g.input_size, g.output_size)


def harness_flags(prog: Program) -> list[str]:
    """The -D/-I flags that bind ``tbn_harness.c`` to the model (also what a user passes by hand)."""
    return [
        f"-DTBN_HARNESS_HEADER=\"{prog.prefix}.h\"", f"-DTBN_HARNESS_RUN={prog.prefix}_run",
        f"-DTBN_HARNESS_IN={prog.input_size}", f"-DTBN_HARNESS_OUT={prog.output_size}", f"-I{prog.directory}",
    ]


def _objects(prog: Program, compiler: list[str], suffix: str) -> list[str]:
    """The library sources compiled apart (relaxed warnings), as object files."""
    objects = []
    for src in prog.library:
        obj = prog.directory / f"{src.parent.name}_{src.stem}{suffix}"
        _run([*compiler, "-std=c99", "-O2", *prog.flags, "-c", str(src), "-o", str(obj)])
        objects.append(str(obj))
    return objects


def build_host(export: ExportResult | Program, exe: Path | None = None) -> Path:
    """Compile the export and the harness with ``gcc -std=c99 -Wall -Wextra -Werror``."""
    prog = program(export)
    exe = exe or prog.directory / "tbn_host"
    sources = [*prog.sources, prog.directory / "tbn_harness.c"]
    libs = _objects(prog, [require("gcc")], ".host.o")
    _run([require("gcc"), *STRICT_C99, *prog.flags, *harness_flags(prog), *map(str, sources), *libs, "-o", str(exe)])
    return exe


def build_board(export: ExportResult | Program, elf: Path | None = None) -> Path:
    """Cross-compile the export, harness and startup for the Cortex-M4 board (newlib semihosting)."""
    prog = program(export)
    d = prog.directory
    elf = elf or d / "tbn_m4.elf"
    sources = [*prog.sources, d / "tbn_harness.c", d / "tbn_startup.c"]
    cross = [require("arm-none-eabi-gcc"), *CORTEX_M4, "-ffunction-sections", "-fdata-sections"]
    libs = _objects(prog, cross, ".m4.o")
    _run([
        *cross, *STRICT_C99, *prog.flags, "--specs=rdimon.specs", "-Wl,--gc-sections", "-T", str(d / "tbn_board.ld"),
        *harness_flags(prog), *map(str, sources), *libs, "-o", str(elf),
    ])
    return elf


def _write_inputs(inputs: torch.Tensor, workdir: Path) -> None:
    x = inputs.detach().to(torch.float32).contiguous()
    (workdir / "tbn_inputs.bin").write_bytes(struct.pack("<I", x.shape[0]) + x.numpy().astype("<f4").tobytes())


def _read_outputs(workdir: Path, count: int, size: int) -> torch.Tensor:
    data = (workdir / "tbn_outputs.bin").read_bytes()
    if len(data) != 4 * count * size:
        raise RuntimeError(f"tbn_outputs.bin holds {len(data)} bytes, expected {4 * count * size}")
    return torch.frombuffer(bytearray(data), dtype=torch.float32).view(count, size)


def run_host(export: ExportResult | Program, exe: Path, inputs: torch.Tensor) -> torch.Tensor:
    """Outputs ``(n, output_size)`` of the host build on ``inputs`` ``(n, *input_shape)``."""
    prog = program(export)
    _write_inputs(inputs, prog.directory)
    _run([str(exe.resolve())], cwd=prog.directory)
    return _read_outputs(prog.directory, inputs.shape[0], prog.output_size)


@dataclass(frozen=True)
class BoardRun:
    """Outputs of a board run and its instruction counts (qemu -icount shift=0, SysTick)."""

    outputs: torch.Tensor
    instructions_per_inference: float
    ticks_min: int
    ticks_max: int
    instructions_per_tick: float


def run_board(export: ExportResult | Program, elf: Path, inputs: torch.Tensor) -> BoardRun:
    """Run the board build under ``qemu-system-arm -M mps2-an386`` with semihosting."""
    prog = program(export)
    _write_inputs(inputs, prog.directory)
    stdout = _run([require("qemu-system-arm"), *QEMU_BOARD, "-kernel", str(elf.resolve())], cwd=prog.directory)
    fields = dict(re.findall(r"(\w+)=(\d+)", stdout))
    if "ticks_total" not in fields:
        raise RuntimeError(f"board run printed no tick counts:\n{stdout}")
    per_tick = int(fields["calibration_instructions"]) / int(fields["calibration_ticks"])
    n = inputs.shape[0]
    return BoardRun(
        _read_outputs(prog.directory, n, prog.output_size),
        int(fields["ticks_total"]) * per_tick / n, int(fields["ticks_min"]), int(fields["ticks_max"]), per_tick,
    )


@dataclass(frozen=True)
class Footprint:
    """Cortex-M4 memory of the model alone (its code, the runtime code it uses, constants, arena)."""

    text: int
    rodata: int
    data: int
    bss: int

    @property
    def flash(self) -> int:
        """Code and constants (``.data`` initial values, 0 for exported models, are not added)."""
        return self.text + self.rodata

    @property
    def ram(self) -> int:
        return self.data + self.bss


def footprint(export: ExportResult | Program) -> Footprint:
    """``arm-none-eabi-size -A`` of the model linked alone (``ld -r --gc-sections`` from its entry point).

    Only what ``<prefix>_run`` reaches is kept, so runtime kernels the model does not call are
    not counted; the activation arena is in ``.bss``.
    """
    prog = program(export)
    d = prog.directory
    cross = [require("arm-none-eabi-gcc"), *CORTEX_M4, "-ffunction-sections", "-fdata-sections"]
    objects = _objects(prog, cross, ".m4.o")
    for src in prog.sources:
        obj = d / (src.stem + ".m4.o")
        _run([*cross, *STRICT_C99, *prog.flags, "-c", str(src), "-o", str(obj)])
        objects.append(str(obj))
    linked = d / f"{prog.prefix}.linked.o"
    _run([require("arm-none-eabi-ld"), "-r", "--gc-sections", "-u", f"{prog.prefix}_run",
          "-e", f"{prog.prefix}_run", *objects, "-o", str(linked)])
    sizes = {"text": 0, "rodata": 0, "data": 0, "bss": 0}
    for line in _run([require("arm-none-eabi-size"), "-A", str(linked)]).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            kind = parts[0].lstrip(".").split(".")[0]
            if kind in sizes:
                sizes[kind] += int(parts[1])
    return Footprint(**sizes)
