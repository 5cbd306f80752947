"""The installed package: subpackage layout and the ``kernels`` import-name hazard (docs/foundation.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = """
import importlib.util, sys
import hf_tbn, hf_tbn.kernels, hf_tbn.mcu_export
import transformers.utils.import_utils as iu
assert importlib.util.find_spec("kernels") is None, importlib.util.find_spec("kernels")
assert not iu.is_kernels_available()
assert "kernels" not in sys.modules
print("ok", hf_tbn.kernels.__name__, hf_tbn.mcu_export.__name__)
"""


ROOT = Path(__file__).resolve().parents[1]


def test_import_from_the_checkout_root() -> None:
    # From the root, ``kernels/`` is importable as top-level ``kernels``, which transformers probes
    # (and imports) for Hugging Face's own package: ours must stay inert under that name.
    check = "import hf_tbn, transformers.utils.import_utils as iu; assert not iu.is_kernels_available(); print('ok')"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_no_top_level_kernels_module(tmp_path: Path) -> None:
    # Run from an empty folder so only the installed environment is on sys.path.
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "hf_tbn.kernels", "hf_tbn.mcu_export"]
