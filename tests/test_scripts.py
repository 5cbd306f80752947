"""The benchmark scripts of the foundation run (quick mode) so they cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--quick"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert len(rows) == 6
    assert all(float(row[-1]) > 0 for row in rows)  # a ratio was measured for every row
