"""``hf-tbn train --distill``: QAT with hf_tbn.distill.DistillationTrainer end to end, resume, and the refusals."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import error_line, fp_folder, reviews  # noqa: F401 (fp_folder, reviews: fixtures)
from transformers import AutoModelForSequenceClassification, Trainer

from hf_tbn.cli import main
from hf_tbn.demos.train import label_config
from hf_tbn.distill import DistillationTrainer, DistillConfig
from hf_tbn.qat import TBNTrainer

# 4 steps: the KL weight is 0 for the first quarter, then rises over the next half to 0.5.
SCHEDULE = ["--kl_weight", "0.5", "--kl_start", "0.25", "--kl_ramp", "0.5", "--temperature", "2"]
COMMON_RATE = 5e-4  # hf-tbn train's default learning rate
COMMON = ["--min-compress-size", "0", "--per_device_train_batch_size", "4", "--eval_fraction", "0",
          "--logging_steps", "1", "--save_steps", "2", "--max_steps", "4"]


def classifier(source: Path, folder: Path, names: list[str]) -> Path:
    """``source``'s classifier and tokenizer with its classes named ``names`` (stands for a fine-tuned one)."""
    AutoModelForSequenceClassification.from_pretrained(source, **label_config(names)).save_pretrained(folder)
    for file in source.glob("tokenizer*"):
        shutil.copy(file, folder)
    return folder


@pytest.fixture(scope="module")
def teacher_fp(tmp_path_factory: pytest.TempPathFactory, fp_folder: Path) -> Path:  # noqa: F811
    """A full-precision classifier of the data's classes (neg, pos)."""
    return classifier(fp_folder, tmp_path_factory.mktemp("teacher") / "fp", ["neg", "pos"])


@dataclass(frozen=True)
class Trained:
    """What one ``Trainer.train`` call of the CLI ran: class, distillation settings, teacher, rate, resume."""

    cls: type
    distill: DistillConfig | None = None
    teacher: str | None = None
    learning_rate: float = COMMON_RATE
    resume: object = None


@pytest.fixture
def trainers(monkeypatch: pytest.MonkeyPatch) -> list[Trained]:
    """Every Trainer the CLI trains, in order."""
    seen: list[Trained] = []
    train = Trainer.train

    def recording_train(self: Trainer, resume_from_checkpoint: str | None = None, **kwargs: object) -> object:
        teacher = getattr(self, "teacher", None)
        seen.append(Trained(type(self), getattr(self, "distill", None), teacher and teacher.name_or_path,
                            self.args.learning_rate, resume_from_checkpoint))
        return train(self, resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(Trainer, "train", recording_train)
    return seen


def test_distill_trains_with_the_teacher_loss_and_resumes_exactly(
        teacher_fp: Path, reviews: Path, tmp_path: Path,  # noqa: F811
        trainers: list[Trained]) -> None:
    """SRC is the teacher (no --teacher): the logged loss is task + w_kl * KL on the schedule asked for, and a
    run resumed half-way writes the same weights as the uninterrupted one."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["train", str(teacher_fp), str(reviews), str(whole), "--distill", *SCHEDULE, *COMMON]) == 0
    config = DistillConfig(kl_weight=0.5, kl_start=0.25, kl_ramp=0.5, temperature=2.0)
    assert trainers == [Trained(DistillationTrainer, config, str(teacher_fp))]

    state = json.loads((tmp_path / "whole-checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["kl_weight"] for entry in steps] == [0.0, 0.0, 0.25, 0.5]
    for entry in steps:
        kl = entry.get("kl_loss", 0.0)
        assert (kl > 0) == (entry["kl_weight"] > 0)  # the teacher (fp) and the TBN student disagree
        assert entry["loss"] == pytest.approx(entry["task_loss"] + entry["kl_weight"] * kl, rel=1e-3, abs=1e-4)

    (tmp_path / "resumed-checkpoints").mkdir()
    shutil.copytree(tmp_path / "whole-checkpoints" / "checkpoint-2", tmp_path / "resumed-checkpoints" / "checkpoint-2")
    assert main(["train", str(teacher_fp), str(reviews), str(resumed), "--distill", "--resume", *SCHEDULE,
                 *COMMON]) == 0
    assert trainers[1] == Trained(DistillationTrainer, config, str(teacher_fp),
                                  resume=str(tmp_path / "resumed-checkpoints" / "checkpoint-2"))
    first, second = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0, msg=name)


def test_an_explicit_teacher_is_used(fp_folder: Path, teacher_fp: Path, reviews: Path, tmp_path: Path,  # noqa: F811
                                     trainers: list[Trained]) -> None:
    """A base classifier with an unnamed head distils from the --teacher given, not from itself."""
    out = tmp_path / "out"
    assert main(["train", str(fp_folder), str(reviews), str(out), "--distill", "--teacher", str(teacher_fp),
                 "--skip_teacher_mistakes", "--save_strategy", "no", *COMMON]) == 0
    assert trainers == [Trained(DistillationTrainer, DistillConfig(skip_teacher_mistakes=True), str(teacher_fp))]
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label == {0: "neg", 1: "pos"}


def test_teacher_fine_tune_trains_the_teacher_first_and_resumes_exactly(
        fp_folder: Path, reviews: Path, tmp_path: Path, trainers: list[Trained]) -> None:  # noqa: F811
    """A base model with an unnamed head: --teacher_fine_tune fine-tunes it in full precision at its own rate,
    saves it in the checkpoints folder and distils from it; a resumed run reuses that teacher and writes the
    same weights as the uninterrupted one."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    options = ["--distill", "--teacher_fine_tune", "--teacher_learning_rate", "1e-3", *COMMON]
    assert main(["train", str(fp_folder), str(reviews), str(whole), *options]) == 0
    teacher = tmp_path / "whole-checkpoints" / "teacher"
    assert trainers == [Trained(TBNTrainer, learning_rate=1e-3), Trained(DistillationTrainer, DistillConfig(),
                                                                         str(teacher))]
    tuned = AutoModelForSequenceClassification.from_pretrained(teacher)
    assert tuned.config.id2label == {0: "neg", 1: "pos"} and "quantization_config" not in tuned.config.to_dict()
    source = load_file(fp_folder / "model.safetensors")
    assert any(not torch.equal(source[name], value) for name, value in tuned.state_dict().items() if name in source)
    assert (teacher / "tokenizer.json").is_file() and not teacher.with_name("teacher.partial").exists()

    (tmp_path / "resumed-checkpoints").mkdir()
    for folder in ("checkpoint-2", "teacher"):
        shutil.copytree(tmp_path / "whole-checkpoints" / folder, tmp_path / "resumed-checkpoints" / folder)
    assert main(["train", str(fp_folder), str(reviews), str(resumed), "--resume", *options]) == 0
    assert trainers[2:] == [Trained(DistillationTrainer, DistillConfig(), str(tmp_path / "resumed-checkpoints" /
                                    "teacher"), resume=str(tmp_path / "resumed-checkpoints" / "checkpoint-2"))]
    first, second = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{fp}", "--distill"], "{fp}'s classification head is not trained on the data's classes"),
        (["{tbn}", "--distill"], "--distill: {tbn} is already TBN, so it cannot be the teacher; pass --teacher"),
        (["{fp}", "--distill", "--teacher", "{tbn}"], "is a quantized checkpoint; the teacher must be full precision"),
        (["{fp}", "--distill", "--teacher", "{reversed}"], "classes ['pos', 'neg'] are not the student's"),
        (["{fp}", "--distill", "--teacher", "{tmp}/missing"], "--teacher {tmp}/missing: "),
        (["{teacher}", "--kl_weight", "0.5"], "--kl_weight is an option of --distill, which is not given"),
        (["{fp}", "--teacher", "{teacher}"], "--teacher is an option of --distill"),
        (["{teacher}", "--distill", "--temperature", "0"], "temperature must be positive"),
        (["{teacher}", "--skip_teacher_mistakes"],
         "--skip_teacher_mistakes is an option of --distill, which is not given"),
        (["{teacher}", "--distill", "--skip_teacher_mistakes", "--task", "causal-lm"],
         "--skip_teacher_mistakes is for --task classification, not causal-lm"),
        (["{teacher}", "--distill", "--teacher", "{tmp}"], "the output would write over the input {tmp}"),
        (["{fp}", "--distill", "--teacher_fine_tune", "--teacher", "{teacher}"],
         "--teacher {teacher} and --teacher_fine_tune: give one"),
        (["{teacher}", "--teacher_fine_tune"], "--teacher_fine_tune is an option of --distill"),
        (["{teacher}", "--distill", "--teacher_learning_rate", "1e-4"],
         "--teacher_learning_rate is an option of --teacher_fine_tune, which is not given"),
        (["{tbn}", "--distill", "--teacher_fine_tune"], "{tbn} is already TBN, so it cannot be fine-tuned into the"),
        (["{teacher}", "--distill", "--teacher_fine_tune", "--resume"], "--resume: no checkpoint-* folder in"),
    ],
)
def test_distill_refusals_are_one_line_errors(fp_folder: Path, teacher_fp: Path, reviews: Path,  # noqa: F811
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              argv: list[str], message: str) -> None:
    tbn, wrong = tmp_path / "tbn", tmp_path / "reversed"
    if "{tbn}" in " ".join(argv):
        assert main(["quantize", str(fp_folder), str(tbn), "--form", "latent", "--min-compress-size", "0"]) == 0
    if "{reversed}" in argv:
        classifier(fp_folder, wrong, ["pos", "neg"])
    names = {"fp": fp_folder, "tbn": tbn, "teacher": teacher_fp, "reversed": wrong, "tmp": tmp_path}
    capsys.readouterr()
    src, *options = (a.format(**names) for a in argv)
    assert main(["train", src, str(reviews), str(tmp_path / "out"), *options, "--save_strategy", "no"]) == 2
    assert message.format(**names) in error_line(capsys)
    assert not (tmp_path / "out").exists()
