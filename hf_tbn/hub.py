"""Model card, tags, local save and one-commit Hub upload of TBN models (docs/huggingface.md).

The checkpoint itself is plain ``save_pretrained`` (config.json and safetensors); :func:`save_tbn`
adds the tokenizer and the README.md card, :func:`push_to_hub` uploads all of it in one commit.
The card's metadata is a ``huggingface_hub.ModelCardData``: the base model's Hub id when one is
known (never a local path), ``base_model_relation: quantized``, the license and language of the
source model's own card, the pipeline tag, the hf-tbn tags and any evaluation results given.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedModel

from .config import TBNConfig
from .report import format_summary, format_table, layer_rows, summarize

TAGS = ("hf-tbn", "tbn", "tiled-bit-networks", "quantized", "sub-bit")
# Card fields that describe where the weights come from, copied from the source model's card.
INHERITED_FIELDS = ("license", "license_name", "license_link", "language")
# Weight files of an earlier upload that the new one replaces (a sharded push leaves shards and index).
STALE_WEIGHTS = ["*.safetensors", "*.safetensors.index.json"]


def tbn_config(model: PreTrainedModel) -> TBNConfig:
    """The model's TBNConfig; a clear error for models that are not TBN models."""
    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, TBNConfig):
        raise ValueError(f"{type(model).__name__} is not a TBN model (config.quantization_config is {config!r})")
    return config


def tag_model(model: PreTrainedModel) -> PreTrainedModel:
    """Add the hf-tbn tags to ``model.model_tags``, so that a plain ``model.push_to_hub`` carries them."""
    model.add_model_tags(list(TAGS))
    return model


def hub_id(name_or_path: str | Path | None) -> str | None:
    """The Hub model id ``name_or_path`` stands for, or None when it names none.

    An ``org/name`` string that is not a local path is an id; a folder of the Hub cache
    (``.../models--org--name/snapshots/<revision>``) stands for ``org/name``; any other local path
    and the empty string stand for no id.
    """
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if path.exists():
        for folder, child in pairwise(path.absolute().parts):
            if folder.startswith("models--") and child == "snapshots":
                return folder.removeprefix("models--").replace("--", "/")
        return None
    name = str(name_or_path)
    return name if name.count("/") == 1 and _valid_repo_id(name) else None


def _valid_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def source_card(name_or_path: str | Path | None) -> ModelCard | None:
    """The card of the model ``name_or_path`` names: a local folder's README.md, else the Hub's.

    None when there is no card: no README.md in the folder, no Hub id, or the Hub has none or
    cannot be reached (``HF_HUB_OFFLINE=1`` reads the local Hub cache only).
    """
    if not name_or_path:
        return None
    folder = Path(name_or_path)
    if folder.is_dir():
        readme = folder / "README.md"
        return ModelCard.load(readme, ignore_metadata_errors=True) if readme.is_file() else None
    repo = hub_id(name_or_path)
    if repo is None:
        return None
    try:
        return ModelCard.load(repo, ignore_metadata_errors=True)
    except (OSError, EntryNotFoundError):
        return None


def pipeline_tag(model: PreTrainedModel, source_tag: str | None = None) -> str | None:
    """The task of the model's head from transformers' class mappings; a headless model keeps ``source_tag``.

    A model with a task head (``...ForSequenceClassification``, ``...ForCausalLM``) gets that task,
    whatever its source's card said; a base model (``BertModel``) keeps its source's tag
    (all-MiniLM-L6-v2: ``sentence-similarity``), else ``feature-extraction``.
    """
    from transformers.modelcard import TASK_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = type(model).__name__
    for task, mapping in TASK_MAPPING.items():
        if name in _class_names(mapping):
            return task
    if source_tag:
        return source_tag
    return "feature-extraction" if name in _class_names(MODEL_MAPPING_NAMES) else None


def _class_names(mapping: Any) -> set[str]:
    """model type -> class name (or a tuple of names), flattened to the set of names."""
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else [value])
    return names


def eval_results_from_metrics(metrics: Mapping[str, float], task: str, dataset: str,
                              split: str | None = None) -> list[EvalResult]:
    """Trainer-style metrics (``{"eval_accuracy": 0.94, "eval_runtime": 3.1}``) as the card's results.

    ``task`` is a Hub task such as ``"text-classification"``, ``dataset`` a Hub dataset id or name.
    The ``eval_`` prefix is dropped, and so are timings (``runtime``, ``..._per_second``) and ``epoch``.
    """
    results = []
    for key, value in metrics.items():
        name = key.removeprefix("eval_")
        if name not in ("epoch", "runtime") and not name.endswith("_per_second"):
            results.append(EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, dataset_split=split,
                                      metric_type=name, metric_value=value))
    return results


def card_data(model: PreTrainedModel, base_model: str | None = None, eval_results: list[EvalResult] | None = None,
              model_name: str | None = None) -> ModelCardData:
    """The card's metadata; the source is the model's ``config.name_or_path`` (where it was loaded from).

    Args:
        base_model: Hub id of the model that was quantized. By default: the id the model was
            loaded from, or the ``base_model`` of a TBN source card (re-packing a TBN folder), or
            none (a local source outside the Hub cache).
        eval_results: metrics to record as the card's ``model-index`` (needs ``model_name``).
        model_name: the name the evaluation results are filed under.
    """
    tbn_config(model)
    source = model.config.name_or_path
    card = source_card(source)
    inherited = card.data if card is not None else ModelCardData()
    if base_model is None:
        base_model = inherited.base_model if TAGS[0] in (inherited.tags or []) else None
        base_model = base_model or hub_id(source)
    elif not _valid_repo_id(base_model) or Path(base_model).exists():
        what = "a local path" if Path(base_model).exists() else "not a valid id"
        raise ValueError(f"base_model must be a Hub model id such as 'org/name', got {base_model!r} ({what}); "
                         "leave it None for a model that is not on the Hub")
    if eval_results and not model_name:
        raise ValueError("eval_results need a model_name to be filed under")
    return ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag(model, inherited.pipeline_tag),
        tags=list(TAGS),
        eval_results=eval_results or None,
        model_name=model_name if eval_results else None,
        **{field: inherited.get(field) for field in INHERITED_FIELDS},
    )


def model_card(model: PreTrainedModel, base_model: str | None = None, eval_results: list[EvalResult] | None = None,
               model_id: str | None = None) -> ModelCard:
    """The README.md card: :func:`card_data`, then method, p per layer, bits per weight, sizes and loading.

    ``model_id`` is the Hub id (or folder) the loading snippet names and the evaluation results are
    filed under (default: a placeholder path, and the architecture's name).
    """
    arch = type(model).__name__
    data = card_data(model, base_model, eval_results, model_id or arch)
    config = tbn_config(model)
    summary = summarize(model)
    factors = ", ".join(map(str, sorted({row.p for row in layer_rows(model)}))) or "none"
    base = f"[{data.base_model}](https://huggingface.co/{data.base_model})" if data.base_model else "not recorded"
    title = f"{data.base_model} in Tiled Bit Network form" if data.base_model else f"{arch} in Tiled Bit Network form"
    lines = [
        f"# {title} (p = {factors})",
        "",
        "Every converted Linear/Conv layer stores one binary tile of N/p bits, reused p times with p scales "
        "(Tiled Bit Networks, Gorbett et al., CIKM 2024, [arXiv 2407.12075](https://arxiv.org/abs/2407.12075)), "
        "written with [hf-tbn](https://pypi.org/project/hf-tbn/).",
        "",
        f"- base model: {base}",
        f"- method: `tbn` (hf-tbn), form `{config.form}`, alpha mode `{config.alpha_mode}`, tile copies along the "
        f"{config.tile_layout} dimension, p per layer: {factors}",
        f"- converted layers: {summary.layers}, {summary.converted_weights:,} weights at "
        f"{summary.bits_per_weight:.3f} bits per weight ({summary.converted_bytes:,} bytes packed)",
        "- kept full precision: embeddings, norms, biases and "
        f"{', '.join(f'`{m}`' for m in config.modules_to_not_convert or []) or 'no other modules'}",
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
        f"model = {arch}.from_pretrained({json.dumps(model_id or 'path/to/this/folder')})",
        "# to fine-tune further: hf_tbn.to_latent_model(model), then train with Trainer",
        "```",
        "",
        *_evaluation(eval_results or []),
        "## Size",
        "",
        "```",
        format_summary(summary),
        "```",
        "",
        "<details><summary>Layers (p per layer)</summary>",
        "",
        "```",
        format_table(model),
        "```",
        "",
        "</details>",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _evaluation(results: list[EvalResult]) -> list[str]:
    if not results:
        return []
    rows = [f"- {r.metric_name or r.metric_type} on {r.dataset_name}"
            f"{f' ({r.dataset_split})' if r.dataset_split else ''}: {r.metric_value}" for r in results]
    return ["## Evaluation", "", *rows, ""]


def save_tbn(model: PreTrainedModel, folder: str | Path, *, tokenizer: Any = None, base_model: str | None = None,
             eval_results: list[EvalResult] | None = None, model_id: str | None = None) -> Path:
    """``save_pretrained``, the tokenizer (if given) and the README.md card of :func:`model_card`."""
    folder = Path(folder)
    card = model_card(model, base_model, eval_results, model_id)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    card.save(folder / "README.md")
    return folder


def push_to_hub(model: PreTrainedModel, repo_id: str, *, tokenizer: Any = None, base_model: str | None = None,
                eval_results: list[EvalResult] | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload TBN model (hf-tbn)",
                revision: str | None = None, create_pr: bool = False) -> Any:
    """Upload weights, config, tokenizer (if given) and card to ``repo_id`` in one commit.

    Everything is written by :func:`save_tbn` into a temporary folder, uploaded with
    ``HfApi.upload_folder``; weight files of an earlier upload that this one does not hold are
    deleted in the same commit. Returns the ``CommitInfo``.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        save_tbn(model, tmp, tokenizer=tokenizer, base_model=base_model, eval_results=eval_results,
                 model_id=repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision,
                                 create_pr=create_pr, delete_patterns=STALE_WEIGHTS)
