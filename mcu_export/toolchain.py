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


def _harness_flags(export: ExportResult) -> list[str]:
    plan = export.plan
    return [
        f"-DTBN_HARNESS_HEADER=\"{plan.prefix}.h\"", f"-DTBN_HARNESS_RUN={plan.prefix}_run",
        f"-DTBN_HARNESS_IN={plan.generated.input_size}", f"-DTBN_HARNESS_OUT={plan.generated.output_size}",
        f"-I{export.directory}",
    ]


def build_host(export: ExportResult, exe: Path | None = None) -> Path:
    """Compile the export and the harness with ``gcc -std=c99 -Wall -Wextra -Werror``."""
    exe = exe or export.directory / "tbn_host"
    sources = [*export.c_sources(), export.directory / "tbn_harness.c"]
    _run([require("gcc"), *STRICT_C99, *_harness_flags(export), *map(str, sources), "-o", str(exe)])
    return exe


def build_board(export: ExportResult, elf: Path | None = None) -> Path:
    """Cross-compile the export, harness and startup for the Cortex-M4 board (newlib semihosting)."""
    elf = elf or export.directory / "tbn_m4.elf"
    d = export.directory
    sources = [*export.c_sources(), d / "tbn_harness.c", d / "tbn_startup.c"]
    _run([
        require("arm-none-eabi-gcc"), *CORTEX_M4, *STRICT_C99, "-ffunction-sections", "-fdata-sections",
        "--specs=rdimon.specs", "-Wl,--gc-sections", "-T", str(d / "tbn_board.ld"), *_harness_flags(export),
        *map(str, sources), "-o", str(elf),
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


def run_host(export: ExportResult, exe: Path, inputs: torch.Tensor) -> torch.Tensor:
    """Outputs ``(n, output_size)`` of the host build on ``inputs`` ``(n, *input_shape)``."""
    _write_inputs(inputs, export.directory)
    _run([str(exe.resolve())], cwd=export.directory)
    return _read_outputs(export.directory, inputs.shape[0], export.plan.generated.output_size)


@dataclass(frozen=True)
class BoardRun:
    """Outputs of a board run and its instruction counts (qemu -icount shift=0, SysTick)."""

    outputs: torch.Tensor
    instructions_per_inference: float
    ticks_min: int
    ticks_max: int
    instructions_per_tick: float


def run_board(export: ExportResult, elf: Path, inputs: torch.Tensor) -> BoardRun:
    """Run the board build under ``qemu-system-arm -M mps2-an386`` with semihosting."""
    _write_inputs(inputs, export.directory)
    stdout = _run([require("qemu-system-arm"), *QEMU_BOARD, "-kernel", str(elf.resolve())], cwd=export.directory)
    fields = dict(re.findall(r"(\w+)=(\d+)", stdout))
    if "ticks_total" not in fields:
        raise RuntimeError(f"board run printed no tick counts:\n{stdout}")
    per_tick = int(fields["calibration_instructions"]) / int(fields["calibration_ticks"])
    n = inputs.shape[0]
    return BoardRun(
        _read_outputs(export.directory, n, export.plan.generated.output_size),
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


def footprint(export: ExportResult) -> Footprint:
    """``arm-none-eabi-size -A`` of the model linked alone (``ld -r --gc-sections`` from its entry point).

    Only what ``<prefix>_run`` reaches is kept, so runtime kernels the model does not call are
    not counted; the activation arena is in ``.bss``.
    """
    d, objects = export.directory, []
    for src in export.c_sources():
        obj = d / (src.stem + ".m4.o")
        _run([require("arm-none-eabi-gcc"), *CORTEX_M4, *STRICT_C99, "-ffunction-sections", "-fdata-sections",
              "-c", str(src), "-o", str(obj)])
        objects.append(str(obj))
    linked = d / f"{export.plan.prefix}.linked.o"
    _run([require("arm-none-eabi-ld"), "-r", "--gc-sections", "-u", f"{export.plan.prefix}_run",
          "-e", f"{export.plan.prefix}_run", *objects, "-o", str(linked)])
    sizes = {"text": 0, "rodata": 0, "data": 0, "bss": 0}
    for line in _run([require("arm-none-eabi-size"), "-A", str(linked)]).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            kind = parts[0].lstrip(".").split(".")[0]
            if kind in sizes:
                sizes[kind] += int(parts[1])
    return Footprint(**sizes)
