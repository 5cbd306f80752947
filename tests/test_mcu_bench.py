"""scripts/bench_mcu.py --quick: hf-tbn exports against CMSIS-NN int8 on the emulated Cortex-M4.

Needs the Arm toolchain, qemu-system-arm and the CMSIS-NN source tree the script defaults to.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_mcu.py"


def _rows(text: str, family: str) -> dict[str, tuple[int, int, float]]:
    """variant -> (weight bytes, flash, instructions) of one model family from the printed table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] == family:
            rows[cells[1]] = (int(cells[2].replace(",", "")), int(cells[3].replace(",", "")),
                              float(cells[5].replace(",", "")))
    return rows


@pytest.fixture(scope="module")
def quick() -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quick_bench_meets_the_targets(quick: str) -> None:
    rows = _rows(quick, "MLP 784-128-10")
    assert set(rows) == {"float32 export", "CMSIS-NN int8", "binary p=1", "TBN fc1 p=2", "TBN fc1 p=4", "TBN fc1 p=8"}
    cmsis = rows["CMSIS-NN int8"][2]
    assert rows["TBN fc1 p=4"][2] <= 60_000  # the target for the paper's model
    assert rows["binary p=1"][2] < min(cmsis, rows["float32 export"][2])
    assert rows["TBN fc1 p=8"][2] < rows["TBN fc1 p=4"][2] < rows["TBN fc1 p=2"][2] < rows["binary p=1"][2]
    assert rows["TBN fc1 p=4"][0] * 30 < rows["CMSIS-NN int8"][0]  # 1/30 of the int8 weight bytes
    table = [line for line in quick.splitlines() if line.startswith("| MLP")]
    assert sum(bool(re.search(r"\| = PyTorch \(rel\. err", line)) for line in table) == 5


def test_quick_bench_cnn_beats_cmsis_nn(quick: str) -> None:
    rows = _rows(quick, "CNN")
    assert set(rows) == {"float32 export", "CMSIS-NN int8", "binary p=1", "TBN conv2 p=2", "TBN conv2 p=4",
                         "TBN conv2 p=8"}
    assert rows["binary p=1"][2] < min(rows["CMSIS-NN int8"][2], rows["float32 export"][2])
    assert rows["TBN conv2 p=8"][2] < rows["TBN conv2 p=4"][2] < rows["TBN conv2 p=2"][2] < rows["binary p=1"][2]
    table = [line for line in quick.splitlines() if line.startswith("| CNN")]
    assert sum(bool(re.search(r"\| = PyTorch \(rel\. err", line)) for line in table) == 5


def test_a_wrong_cmsis_path_is_refused() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--cmsis", str(ROOT)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "not a CMSIS-NN source tree" in proc.stderr
