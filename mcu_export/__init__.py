"""Exporter of small TBN models to microcontroller C (installed as ``hf_tbn.mcu_export``).

``export_model(model, input_shape, out_dir)`` writes portable C99 (packed tiles, scales and
biases as ``const`` arrays, BatchNorm folded, one static arena, no malloc) with the entry
point ``int <prefix>_run(const float *in, float *out)``; :mod:`.toolchain` builds and runs it
on the host and on an emulated Cortex-M4 (docs/mcu.md).
"""

from . import toolchain
from .export import ExportPlan, ExportResult, check_budget, export_model, plan_export

__all__ = ["ExportPlan", "ExportResult", "check_budget", "export_model", "plan_export", "toolchain"]
