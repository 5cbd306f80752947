"""The installed package: its subpackages, its registrations whatever is imported first, and nothing in the checkout
shadowing Hugging Face's ``kernels``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# transformers (5.25 on) depends on Hugging Face's ``kernels`` package and imports it while probing for it;
# a top-level ``kernels/`` folder in the checkout would be imported instead from the root (until session 18
# ours was one: the DDP launches and ``python -c`` from the root failed with an ImportError).
CHECK = """
import importlib.util, pathlib, sys
import hf_tbn, hf_tbn.kernels, hf_tbn.mcu_export
import transformers.utils.import_utils as iu
assert "kernels" not in sys.modules  # hf_tbn never imports Hugging Face's kernels package
root = pathlib.Path(sys.argv[1])
spec = importlib.util.find_spec("kernels")
assert spec is None or pathlib.Path(spec.origin) not in {root / "kernels" / "__init__.py", root / "kernels.py"}, spec
if iu.is_kernels_available():
    from kernels import get_kernel  # what transformers imports
print("ok", hf_tbn.kernels.__name__, hf_tbn.mcu_export.__name__)
"""

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_subpackages_import_and_nothing_shadows_kernels(where: str, tmp_path: Path) -> None:
    # From the root the checkout is on sys.path (python -c, accelerate launch); elsewhere only the environment is.
    cwd = ROOT if where == "root" else tmp_path
    result = subprocess.run([sys.executable, "-c", CHECK, str(ROOT)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "hf_tbn.kernels", "hf_tbn.mcu_export"]


# Each module that registers hf_tbn with a library, imported first in a fresh process (before the library it registers
# with), then the libraries: every registration must be in place. hf_tbn.quantizer and hf_tbn.lora import their
# library themselves, which fires hf_tbn's import hook while they are half executed (until session 19: ImportError).
REGISTERED = """
import sys
import {module}
assert ("transformers.trainer" in sys.modules) == ({module!r} == "hf_tbn.qat"), "{module} imports the trainer"
import peft.tuners.lora, transformers.quantizers.auto, transformers.trainer
from hf_tbn.warmup import QuantizationWarmup
print("tbn" in transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING,
      "tbn" in transformers.quantizers.auto.AUTO_QUANTIZATION_CONFIG_MAPPING,
      QuantizationWarmup in transformers.trainer.DEFAULT_CALLBACKS,
      getattr(peft.tuners.lora.LoraModel, "_hf_tbn_registered", False))
"""


@pytest.mark.parametrize("module", ["hf_tbn", "hf_tbn.quantizer", "hf_tbn.lora", "hf_tbn.warmup", "hf_tbn.qat"])
def test_registrations_whatever_is_imported_first(module: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", REGISTERED.format(module=module)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * 4
