"""Model card, local save and Hub upload of TBN models (the checkpoint itself is plain ``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard
from transformers import PreTrainedModel

from .config import TBNConfig
from .report import format_summary, format_table, summarize

TAGS = ["hf-tbn", "tbn", "tiled-bit-networks", "quantized", "sub-bit"]


def tbn_config(model: PreTrainedModel) -> TBNConfig:
    """The model's TBNConfig; a clear error for models that are not TBN models."""
    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, TBNConfig):
        raise ValueError(f"{type(model).__name__} is not a TBN model (config.quantization_config is {config!r})")
    return config


def model_card(model: PreTrainedModel, base_model: str | None = None, model_id: str = "path/to/this/folder") -> str:
    """README.md text: metadata, method, p per layer, bits per weight, base model and the loading snippet."""
    config = tbn_config(model)
    summary = summarize(model)
    factors = sorted(set(config.layer_factors.values())) if config.layer_factors else []
    arch = type(model).__name__
    meta = ["---", "library_name: transformers", "tags:", *[f"- {t}" for t in TAGS]]
    if base_model:
        meta.append(f"base_model: {base_model}")
    meta.append("---")
    return "\n".join([
        *meta,
        "",
        f"# {arch} with Tiled Bit Network layers (p = {', '.join(map(str, factors))})",
        "",
        "Every converted Linear/Conv layer stores one binary tile of N/p bits, reused p times with p scales "
        "(Tiled Bit Networks, Gorbett et al., CIKM 2024, arXiv 2407.12075), written with "
        "[hf-tbn](https://pypi.org/project/hf-tbn/).",
        "",
        f"- method: `tbn` (hf-tbn), form `{config.form}`, alpha mode `{config.alpha_mode}`",
        f"- base model: {base_model or 'not recorded'}",
        f"- converted layers: {summary.layers}, {summary.converted_weights:,} weights at "
        f"{summary.bits_per_weight:.3f} bits per weight ({summary.converted_bytes:,} bytes packed)",
        "- kept full precision: embeddings, norms, biases and "
        f"{', '.join(config.modules_to_not_convert or []) or 'no other modules'}",
        "",
        "## Loading",
        "",
        "`import hf_tbn` registers the `tbn` quantization method with transformers; without it",
        "`from_pretrained` does not know the method and fails on the packed tensors.",
        "",
        "```python",
        "import hf_tbn  # noqa: F401  (registers the quantizer)",
        f"from transformers import {arch}",
        "",
        f'model = {arch}.from_pretrained("{model_id}")',
        "# to fine-tune further: hf_tbn.to_latent_model(model), then train with Trainer",
        "```",
        "",
        "## Size",
        "",
        "```",
        format_summary(summary),
        "```",
        "",
        "## Layers (p per layer)",
        "",
        "```",
        format_table(model),
        "```",
        "",
    ])


def save_tbn(model: PreTrainedModel, folder: str | Path, base_model: str | None = None,
             tokenizer: Any = None) -> Path:
    """``save_pretrained`` plus the tokenizer (if given) and the model card README.md."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(model, base_model))
    return folder


def push_to_hub(model: PreTrainedModel, repo_id: str, base_model: str | None = None, **kwargs: Any) -> Any:
    """Upload the TBN model card, then push through transformers' own ``push_to_hub``.

    The standard push keeps a card already in the repository and adds its tags to it, so the
    TBN card goes up first. ``kwargs`` are those of ``PreTrainedModel.push_to_hub``.
    """
    token = kwargs.get("token")
    repo_id = HfApi(token=token).create_repo(repo_id, private=kwargs.get("private"), exist_ok=True).repo_id
    ModelCard(model_card(model, base_model, repo_id)).push_to_hub(repo_id, token=token)
    return model.push_to_hub(repo_id, tags=TAGS, **kwargs)
