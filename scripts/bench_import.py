"""``import hf_tbn`` against ``import transformers.utils.quantization_config`` (which brings torch), side by side.

Each import runs in a fresh interpreter (alternating, ``--repeats`` times each); the script prints
the medians and their difference. Target (docs/foundation.md): hf_tbn costs at most 0.5 s more.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

BASELINE = "import transformers.utils.quantization_config"
CASES = {"baseline": BASELINE, "hf_tbn": f"{BASELINE}; import hf_tbn"}


def seconds(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, statement in CASES.items():
            times[name].append(seconds(statement))
    base, tbn = (statistics.median(times[name]) for name in CASES)
    print(f"{BASELINE}: {base:.3f} s; + import hf_tbn: {tbn:.3f} s; hf_tbn costs {tbn - base:+.3f} s "
          f"(median of {args.repeats} fresh interpreters each)")


if __name__ == "__main__":
    main()
