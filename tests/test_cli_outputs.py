"""The CLI never writes over its input, never fills a non-empty folder unasked, and a failed run changes nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from hf_tbn import hub, tbn_layers
from hf_tbn.cli import main
from hf_tbn.commands import staged_output


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> dict[str, Path]:
    """A tiny full-precision BERT classifier, its latent TBN form, and a CSV dataset."""
    root = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(root / "fp")
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(root / "fp")
    assert main(["quantize", str(root / "fp"), str(root / "latent"), "--form", "latent",
                 "--min-compress-size", "0"]) == 0
    with (root / "data.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([f"text {i}", "ab"[i % 2]] for i in range(20))
    return {"fp": root / "fp", "latent": root / "latent", "data": root / "data.csv"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("command", ["pack", "quantize", "dequantize"])
def test_output_equal_to_input_is_refused(folders: dict[str, Path], command: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = folders["latent"]
    before = snapshot(src)
    refused([command, str(src), str(src)], capsys, "would write over the input")
    refused([command, str(src), str(src / "inside")], capsys, "would write over the input")
    refused([command, str(src), str(src.parent), "--overwrite"], capsys, "would write over the input")
    assert snapshot(src) == before


def test_train_onto_its_source_is_refused(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    src = folders["latent"]
    before = snapshot(src)
    refused(["train", str(src), str(folders["data"]), str(src), "--overwrite"], capsys, "would write over the input")
    refused(["train", str(src), str(folders["data"]), str(src.parent / "elsewhere"), "--output_dir", str(src)],
            capsys, "would write over the input")
    assert snapshot(src) == before


def test_a_symlink_to_the_input_is_the_input(folders: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "link"
    link.symlink_to(folders["latent"], target_is_directory=True)
    before = snapshot(folders["latent"])
    refused(["pack", str(link), str(folders["latent"]), "--overwrite"], capsys, "would write over the input")
    refused(["pack", str(folders["latent"]), str(link), "--overwrite"], capsys, "would write over the input")
    assert snapshot(folders["latent"]) == before


def test_non_empty_output_needs_overwrite(folders: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(["pack", str(folders["latent"]), str(out)], capsys, "pass --overwrite")
    assert snapshot(out) == {"notes.txt": b"mine"}
    (tmp_path / "file").write_text("x")
    refused(["pack", str(folders["latent"]), str(tmp_path / "file")], capsys, "not a folder")

    assert main(["pack", str(folders["latent"]), str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()  # replaced as a whole, no stale files mixed in
    assert {layer.form for _, layer in tbn_layers(AutoModelForSequenceClassification.from_pretrained(out))} == {
        "packed"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pack", str(folders["latent"]), str(empty)]) == 0  # an empty folder is fine
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.mark.parametrize("command", ["pack", "quantize", "train"])
def test_a_failure_midway_leaves_the_old_output_loadable(folders: dict[str, Path], tmp_path: Path, command: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert main(["pack", str(folders["latent"]), str(out)]) == 0
    before = snapshot(out)
    save = hub.save_tbn

    def save_then_fail(model: object, folder: Path, **kwargs: object) -> None:
        save(model, folder, **kwargs)  # the weights are written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "save_tbn", save_then_fail)
    argv = {"pack": ["pack", str(folders["latent"])],
            "quantize": ["quantize", str(folders["fp"]), "--min-compress-size", "0"],
            "train": ["train", str(folders["latent"]), str(folders["data"]), "--max_steps", "1",
                      "--save_strategy", "no"]}[command]
    with pytest.raises(OSError, match="No space left"):
        main([*argv, str(out), "--overwrite"])
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the partial folder is gone
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert {layer.form for _, layer in tbn_layers(model)} == {"packed"}


def test_a_failed_final_rename_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    rename = Path.rename

    def rename_fails_into_place(self: Path, target: Path) -> Path:
        if self.name.endswith(".partial"):
            raise OSError("rename failed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_fails_into_place)
    with pytest.raises(OSError, match="rename failed"), staged_output(out) as stage:
        (stage / "weights").write_text("new")
    assert (out / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
