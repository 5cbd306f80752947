"""Model cards, tags and the one-commit Hub upload (``hf_tbn.hub``), offline: the Hub is mocked."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.repocard
import pytest
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import LocalEntryNotFoundError
from tiny import tiny_bert_classifier
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils.hub import PushToHubMixin

from hf_tbn import TBNConfig, hub, pack_model
from hf_tbn.report import summarize

# Text that YAML would misread if written unescaped: a colon, quotes and a comment sign.
TRICKY_LICENSE_NAME = "tiny license: 'v1' # not a comment"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny full-precision BERT classifier with MiniLM's tokenizer and a card of its own."""
    folder = tiny_bert_classifier(tmp_path_factory.mktemp("hub") / "fp", minilm_dir, num_labels=3)
    data = ModelCardData(license="other", license_name=TRICKY_LICENSE_NAME, license_link="LICENSE",
                         language=["en", "fr"], pipeline_tag="fill-mask", base_model="org/grandparent",
                         tags=["source-tag"])
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n# The source model\n").save(folder / "README.md")
    return folder


def load_tbn(folder: Path | str) -> PreTrainedModel:
    config = TBNConfig(min_compress_size=0)
    return AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=config)


def saved_card(model: PreTrainedModel, folder: Path, **kwargs: Any) -> ModelCard:
    hub.save_tbn(model, folder, **kwargs)
    return ModelCard.load(folder / "README.md")


def test_card_of_a_local_source(source: Path, tmp_path: Path, minilm_dir: Path) -> None:
    """Source license and language carried, no local path as base_model, the head's task, sizes."""
    model = load_tbn(source)
    card = saved_card(model, tmp_path / "out", tokenizer=AutoTokenizer.from_pretrained(minilm_dir))
    src = ModelCard.load(source / "README.md").data
    assert (card.data.license, card.data.license_name, card.data.license_link, card.data.language) == (
        src.license, src.license_name, src.license_link, src.language)
    assert card.data.license_name == TRICKY_LICENSE_NAME
    assert card.data.base_model is None and "base_model_relation" not in card.data
    assert str(source) not in card.content
    assert card.data.pipeline_tag == "text-classification"  # the head decides, not the source's fill-mask
    assert card.data.library_name == "transformers" and list(hub.TAGS) == card.data.tags
    assert f"{summarize(model).bits_per_weight:.3f} bits per weight" in card.text
    assert "import hf_tbn" in card.text and "BertForSequenceClassification.from_pretrained(" in card.text
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        f.name for f in (tmp_path / "out").iterdir()}


def test_base_model_given_or_read_from_the_hub_id(source: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_tbn(source)
    card = hub.model_card(model, base_model="org/tiny")
    assert (card.data.base_model, card.data.get("base_model_relation")) == ("org/tiny", "quantized")
    assert "https://huggingface.co/org/tiny" in card.text
    with pytest.raises(ValueError, match="base_model must be a Hub model id.*" + str(source)):
        hub.model_card(model, base_model=str(source))

    # Loaded from the Hub: the id is the base model and the Hub's card gives the license.
    downloads: list[str] = []
    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download",
                        lambda repo_id, filename, **kw: downloads.append(repo_id) or str(source / filename))
    model.config.name_or_path = "org/tiny"
    data = hub.card_data(model)
    assert (data.base_model, data.license_name, downloads) == ("org/tiny", TRICKY_LICENSE_NAME, ["org/tiny"])

    def offline(repo_id: str, filename: str, **kw: Any) -> str:
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", offline)
    data = hub.card_data(model)
    assert (data.base_model, data.license) == ("org/tiny", None)


def test_hub_cache_folder_stands_for_its_id(source: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--org--tiny-bert" / "snapshots" / "0123abc"
    shutil.copytree(source, snapshot)
    assert hub.hub_id(snapshot) == "org/tiny-bert"
    assert hub.hub_id(source) is None and hub.hub_id("") is None and hub.hub_id("a/b/c") is None
    data = hub.card_data(load_tbn(snapshot))
    assert (data.base_model, data.license_name) == ("org/tiny-bert", TRICKY_LICENSE_NAME)


def test_packing_a_tbn_folder_keeps_base_model_and_license(source: Path, tmp_path: Path) -> None:
    """The CLI's pack path: the latent folder's own TBN card passes its base model on."""
    hub.save_tbn(load_tbn(source), tmp_path / "latent", base_model="org/tiny")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "latent")
    card = saved_card(pack_model(model), tmp_path / "packed")
    assert (card.data.base_model, card.data.license_name) == ("org/tiny", TRICKY_LICENSE_NAME)
    assert "form `packed`" in card.text


def test_eval_results_round_trip(source: Path) -> None:
    model = load_tbn(source)
    metrics = {"eval_accuracy": 0.875, "eval_loss": 0.5, "eval_runtime": 1.5, "eval_samples_per_second": 9.0,
               "epoch": 1.0}
    results = hub.eval_results_from_metrics(metrics, "text-classification", "News: test | v2", split="test")
    card = ModelCard(str(hub.model_card(model, eval_results=results, model_id="me/tiny-tbn")))
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results] == [
        ("accuracy", 0.875, "News: test | v2"), ("loss", 0.5, "News: test | v2")]
    assert card.data.model_name == "me/tiny-tbn"
    assert "accuracy on News: test | v2 (test): 0.875" in card.text
    with pytest.raises(ValueError, match="model_name"):
        hub.card_data(model, eval_results=results)


class FakeApi:
    """The two HfApi calls push_to_hub may make; anything else fails with AttributeError."""

    commits: list[dict[str, Any]] = []

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs: Any) -> str:
        folder = Path(folder_path)
        files = {f.name: f.read_bytes() for f in folder.iterdir()}
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return "commit-info"


def test_push_to_hub_is_one_commit(source: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    FakeApi.commits = []
    model = load_tbn(source)
    info = hub.push_to_hub(model, "me/tiny-tbn", tokenizer=AutoTokenizer.from_pretrained(minilm_dir),
                           base_model="org/tiny")
    (commit,) = FakeApi.commits
    assert info == "commit-info" and commit["repo_id"] == "me/tiny-tbn"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"} <= set(
        commit["files"])
    assert "*.safetensors" in commit["delete_patterns"]
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.base_model == "org/tiny" and 'from_pretrained("me/tiny-tbn")' in card.text


def test_tags_reach_a_plain_push_to_hub(source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pushed: dict[str, Any] = {}
    monkeypatch.setattr(PushToHubMixin, "push_to_hub", lambda self, repo_id, **kw: pushed.update(kw))
    model = hub.tag_model(load_tbn(source))
    model.push_to_hub("me/tiny-tbn", tags=["mine"])
    assert set(hub.TAGS) | {"mine"} <= set(pushed["tags"])


def test_minilm_card(minilm_dir: Path) -> None:
    """The real offline all-MiniLM-L6-v2: its card's license and task, and no local base_model."""
    model = AutoModel.from_pretrained(minilm_dir, quantization_config=TBNConfig(compression_factor=4))
    card = ModelCard(str(hub.model_card(model)))
    src = ModelCard.load(minilm_dir / "README.md").data
    assert (card.data.license, card.data.pipeline_tag, card.data.language) == (
        src.license, src.pipeline_tag, src.language)
    assert card.data.license == "apache-2.0" and card.data.base_model is None
    assert str(minilm_dir) not in card.content
    assert f"{summarize(model).bits_per_weight:.3f} bits per weight" in card.text
