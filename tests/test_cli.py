"""``hf-tbn`` quantize / pack / inspect / train / demo end to end on small model folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers.utils.hub as hf_hub_utils
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from hf_tbn import TBNConfig, hub, tbn_layers
from hf_tbn.cli import main
from hf_tbn.demo import DemoBudget, fresh_run_dir


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny BERT classifier with MiniLM's tokenizer, saved as a full-precision folder."""
    folder = tmp_path_factory.mktemp("cli") / "fp"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(folder)
    return folder


def keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_quantize_pack_inspect(fp_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    latent, packed = tmp_path / "latent", tmp_path / "packed"
    assert main(["quantize", str(fp_folder), str(latent), "--form", "latent", "--min-compress-size", "0"]) == 0
    config = json.loads((latent / "config.json").read_text())["quantization_config"]
    assert config["form"] == "latent" and config["layer_factors"]["bert.encoder.layer.0.intermediate.dense"] == 4
    assert "bert.encoder.layer.0.intermediate.dense.weight" in keys(latent)
    assert (latent / "tokenizer.json").is_file()
    card = (latent / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "import hf_tbn" in card and "bits per weight" in card

    assert main(["pack", str(latent), str(packed)]) == 0
    assert {"bert.encoder.layer.0.intermediate.dense.tile", "bert.encoder.layer.0.intermediate.dense.alpha"} <= keys(
        packed)
    assert "bert.encoder.layer.0.intermediate.dense.weight" not in keys(packed)
    capsys.readouterr()
    assert main(["inspect", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.0.intermediate.dense" in out and "TBN form packed" in out and "fp16/bf16" in out

    with pytest.raises(ValueError, match="not a TBN model"):
        main(["inspect", str(fp_folder)])


def test_train_from_full_precision_and_from_tbn(fp_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(24):
            writer.writerow([("great fun" if i % 2 else "dull and slow") + f" {i}", "pos" if i % 2 else "neg"])
    first = tmp_path / "first"
    assert main(["train", str(fp_folder), str(data), str(first), "--steps", "3", "--min-compress-size", "0"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(first)
    assert model.config.quantization_config.form == "latent" and model.config.id2label == {0: "neg", 1: "pos"}
    assert list(tbn_layers(model))
    second = tmp_path / "second"
    assert main(["train", str(first), str(data), str(second), "--steps", "2", "--pack"]) == 0
    assert AutoModelForSequenceClassification.from_pretrained(second).config.quantization_config.form == "packed"
    with pytest.raises(ValueError, match="column 'body' missing"):
        main(["train", str(first), str(data), str(tmp_path / "bad"), "--text-column", "body"])


def test_demo_runs_end_to_end_twice_into_fresh_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shrunken budget (the README's default is the full one): same path, every line of the table."""
    budget = ["--steps", "2", "--max-length", "24", "--batch-size", "4", "--eval-examples", "24"]
    assert main(["demo", "--output-dir", str(tmp_path), *budget]) == 0
    out = capsys.readouterr().out
    for line in ("accuracy, TBN p=4 after QAT", "bits per weight", "checkpoint MB vs full-precision",
                 "checkpoint written to"):
        assert line in out
    assert "reloaded logits bit-identical to in-memory packed  yes" in out
    runs = sorted(tmp_path.iterdir())
    assert len(runs) == 1 and (runs[0] / "tbn-packed" / "README.md").is_file()
    assert fresh_run_dir(tmp_path) != runs[0]  # a second run in the same second still gets its own folder
    assert DemoBudget().compression_factor == 4


def test_push_to_hub_keeps_the_tbn_card(fp_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard ``PreTrainedModel.push_to_hub`` path, with the Hub replaced by a local folder."""
    remote = tmp_path / "remote"
    cards: dict[str, str] = {}

    class FakeApi:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def create_repo(self, repo_id: str, **kwargs: object) -> object:
            remote.mkdir(exist_ok=True)
            return type("Repo", (), {"repo_id": repo_id})()

    def upload(self: object, working_dir: str, repo_id: str, *args: object, **kwargs: object) -> None:
        for f in Path(working_dir).iterdir():
            (remote / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hf_hub_utils, "hf_api", FakeApi)
    monkeypatch.setattr(huggingface_hub.ModelCard, "push_to_hub",
                        lambda self, repo_id, **kw: cards.__setitem__(repo_id, str(self)))
    monkeypatch.setattr(huggingface_hub.ModelCard, "load",
                        classmethod(lambda cls, repo_id, **kw: cls(cards[repo_id])))
    monkeypatch.setattr(hf_hub_utils.PushToHubMixin, "_upload_modified_files", upload)

    model = AutoModelForSequenceClassification.from_pretrained(
        fp_folder, quantization_config=TBNConfig(min_compress_size=0, form="packed"))
    hub.push_to_hub(model, "me/tiny-tbn", base_model="tiny-bert")
    card = (remote / "README.md").read_text()
    assert "base_model: tiny-bert" in card and "import hf_tbn" in card and "- hf-tbn" in card
    assert 'from_pretrained("me/tiny-tbn")' in card
    again = AutoModelForSequenceClassification.from_pretrained(remote)
    assert again.config.quantization_config.form == "packed" and list(tbn_layers(again))

