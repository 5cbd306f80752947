"""Exporter of small TBN models to microcontroller C.

``export_model(model, input_shape, out_dir)`` writes portable C99 (packed tiles, scales and
biases as ``const`` arrays, BatchNorm folded, one static arena, no malloc) with the entry
point ``int <prefix>_run(const float *in, float *out)``; :mod:`.toolchain` builds and runs it
on the host and on an emulated Cortex-M4 (docs/mcu.md). Names are imported on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {"ExportPlan": "export", "ExportResult": "export", "check_budget": "export", "export_model": "export",
         "plan_export": "export"}

__all__ = [*_LAZY, "toolchain"]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "toolchain":
        return importlib.import_module(".toolchain", __name__)
    raise AttributeError(f"module 'hf_tbn.mcu_export' has no attribute {name!r}")
