"""A quantized all-MiniLM-L6-v2 stays a sentence-transformers model and works in transformers pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from sentence_transformers import SentenceTransformer
from transformers import pipeline

from hf_tbn import tbn_layers
from hf_tbn.cli import main
from hf_tbn.commands import WEIGHT_SUFFIXES

SENTENCES = ["A man is playing a guitar.", "The new movie is awesome.", "Stocks fell sharply on Monday."]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> dict[str, Path]:
    """MiniLM quantized by the CLI to the latent form, and that folder packed."""
    root = tmp_path_factory.mktemp("minilm")
    assert main(["quantize", str(minilm_dir), str(root / "latent"), "--form", "latent"]) == 0
    assert main(["pack", str(root / "latent"), str(root / "packed")]) == 0
    return {"latent": root / "latent", "packed": root / "packed"}


def companions(folder: Path) -> set[str]:
    """Every file the source holds besides weights, hidden files and its card."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith(".")
            and p.name != "README.md"}


@pytest.mark.parametrize("form", ["latent", "packed"])
def test_every_file_but_the_weights_travels(quantized: dict[str, Path], minilm_dir: Path, form: str) -> None:
    out = quantized[form]
    wanted = companions(minilm_dir)
    assert {"modules.json", "1_Pooling/config.json", "config_sentence_transformers.json", "tokenizer.json"} <= wanted
    assert wanted <= {str(p.relative_to(out)) for p in out.rglob("*")}
    card = ModelCard.load(out / "README.md")  # the TBN card replaces the source's, keeping its license
    assert card.data.license == ModelCard.load(minilm_dir / "README.md").data.license == "apache-2.0"


def test_sentence_transformer_loads_the_tbn_folders(quantized: dict[str, Path], minilm_dir: Path) -> None:
    embeddings = {form: SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True)
                  for form, folder in {"fp": minilm_dir, **quantized}.items()}
    for form, e in embeddings.items():
        assert e.shape == (len(SENTENCES), 384), form
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-5)  # 2_Normalize
    # The packed folder computes what the latent one does; both are TBN, not the fp model.
    cosine = (embeddings["latent"] * embeddings["packed"]).sum(-1)
    assert cosine.min() > 0.999, cosine
    model = SentenceTransformer(str(quantized["packed"]), device="cpu")
    assert {layer.form for _, layer in tbn_layers(model)} == {"packed"}
    assert not torch.allclose(embeddings["fp"], embeddings["packed"], atol=1e-3)


def test_feature_extraction_pipeline_on_tbn_folders(quantized: dict[str, Path]) -> None:
    features = {form: torch.tensor(pipeline("feature-extraction", model=str(folder), device="cpu")(SENTENCES[0])[0])
                for form, folder in quantized.items()}
    assert features["packed"].shape[-1] == 384 and features["packed"].shape == features["latent"].shape
    torch.testing.assert_close(features["packed"], features["latent"], rtol=1e-3, atol=1e-3)
