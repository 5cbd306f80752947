"""Distillation from a full-precision teacher (hf_tbn.distill), with Trainer and under ``accelerate launch``.

Run as a script, this file is the worker of the DDP test:

    python test_distill.py FP_DIR OUT_DIR PER_DEVICE_BATCH STEPS
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from tiny import Tokens
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, TrainingArguments

from hf_tbn import TBNConfig, pack_model, tbn_layers
from hf_tbn.distill import DistillationTrainer, DistillConfig, hidden_loss, kl_loss, load_teacher, teacher_right
from hf_tbn.qat import end_process_group

TBN = TBNConfig(min_compress_size=0)


def targs(out: Path, steps: int = 6, batch: int = 8, **kwargs: object) -> TrainingArguments:
    settings = {"learning_rate": 1e-2, "train_sampling_strategy": "sequential", "save_strategy": "no", "report_to": [],
                "use_cpu": True, "seed": 0, "disable_tqdm": True, "logging_steps": 1}
    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                             **{**settings, **kwargs})


def student(folder: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=TBN)


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def kl_to(teacher: torch.nn.Module, model: torch.nn.Module, data: Tokens) -> float:
    model.eval()
    return float(kl_loss(model(input_ids=data.ids).logits, teacher(input_ids=data.ids).logits))


# -- the loss terms against literal formulas ----------------------------------------------
def test_kl_loss_is_the_temperature_scaled_kl_over_counted_positions() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    temp = 2.0
    expected = []
    for b, i in mask.nonzero().tolist():
        q = [math.exp(v / temp) for v in t[b, i].tolist()]
        r = [math.exp(v / temp) for v in s[b, i].tolist()]
        q, r = [v / sum(q) for v in q], [v / sum(r) for v in r]
        expected.append(sum(a * math.log(a / c) for a, c in zip(q, r, strict=True)))
    got = kl_loss(s, t, temp, mask)
    assert float(got) == pytest.approx(temp**2 * sum(expected) / len(expected), rel=1e-5)
    assert float(kl_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_loss_is_the_relative_squared_error_of_the_chosen_layers() -> None:
    g = torch.Generator().manual_seed(1)
    t = tuple(torch.randn(2, 4, 8, generator=g) for _ in range(3))
    s = tuple(x + 0.1 * torch.randn(x.shape, generator=g) for x in t)
    expected = sum(float(((s[i] - t[i]) ** 2).sum(-1).div((t[i] ** 2).sum(-1)).mean()) for i in (1, 2)) / 2
    assert float(hidden_loss(s, t)) == pytest.approx(expected, rel=1e-5)
    assert float(hidden_loss(s, t, (0,))) == pytest.approx(float(((s[0] - t[0]) ** 2).sum(-1).div(
        (t[0] ** 2).sum(-1)).mean()), rel=1e-5)
    with pytest.raises(ValueError, match=r"hidden_layers \(5,\)"):
        hidden_loss(s, t, (5,))


def test_teacher_right_keeps_the_rows_whose_label_is_the_teacher_top_class() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, -100])
    mask = labels != -100
    assert teacher_right(labels, logits, mask).tolist() == [True, False, True, False]
    assert teacher_right(labels, logits, None).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match=r"labels \(4, 3\) against logits \(4, 3\)"):
        teacher_right(logits, logits, None)  # soft (multi-label) targets have no class to compare
    with pytest.raises(ValueError, match="labels NoneType"):
        teacher_right(None, logits, None)


def test_kl_weight_schedule_and_bad_settings() -> None:
    cfg = DistillConfig(kl_weight=0.5, kl_start=0.2, kl_ramp=0.4)
    assert [cfg.kl_weight_at(x) for x in (0.0, 0.1, 0.2, 0.4, 0.6, 1.0)] == pytest.approx([0, 0, 0, 0.25, 0.5, 0.5])
    assert DistillConfig(kl_weight=0.3).kl_weight_at(0.0) == 0.3
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="kl_weight"):
        DistillConfig(kl_weight=-1)
    with pytest.raises(ValueError, match="at most 1"):
        DistillConfig(kl_start=0.5, kl_ramp=0.6)
    with pytest.raises(ValueError, match="nothing to train"):
        DistillConfig(kl_weight=0, task_weight=0)
    with pytest.raises(ValueError, match="skip_teacher_mistakes must be True or False"):
        DistillConfig(skip_teacher_mistakes=1)


# -- the teacher ---------------------------------------------------------------------------
def test_default_teacher_is_the_checkpoint_before_conversion(tiny_llama_dir: Path) -> None:
    model = student(tiny_llama_dir)
    teacher = load_teacher(model)
    assert not list(tbn_layers(teacher)) and list(tbn_layers(model))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    ids = Tokens().ids[:2]
    fp = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=ids).logits, fp(input_ids=ids).logits)


def test_teacher_follows_the_student_dtype(tiny_llama_dir: Path) -> None:
    model = student(tiny_llama_dir).to(torch.bfloat16)
    assert {p.dtype for p in load_teacher(model).parameters()} == {torch.bfloat16}


def test_teacher_refuses_quantized_and_untrained_checkpoints(tiny_llama_dir: Path, tmp_path: Path) -> None:
    student(tiny_llama_dir).save_pretrained(tmp_path / "tbn")
    with pytest.raises(ValueError, match="quantized checkpoint"):
        load_teacher(student(tiny_llama_dir), tmp_path / "tbn")
    LlamaModel.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "base")
    classifier = LlamaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3,
                                                                quantization_config=TBN)
    with pytest.raises(ValueError, match=r"'score.weight'.*fine-tune a full-precision model"):
        load_teacher(classifier)


# -- training ------------------------------------------------------------------------------
def test_without_distillation_terms_it_trains_exactly_like_trainer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import Trainer

    plain = student(tiny_llama_dir)
    Trainer(model=plain, args=targs(tmp_path / "a"), train_dataset=Tokens()).train()
    distilled = student(tiny_llama_dir)
    DistillationTrainer(model=distilled, args=targs(tmp_path / "b"), train_dataset=Tokens(),
                        distill=DistillConfig(kl_weight=0)).train()
    a, b = trained_state(plain), trained_state(distilled)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_distillation_pulls_the_student_to_the_teacher(tiny_llama_dir: Path, tmp_path: Path) -> None:
    teacher = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    data = Tokens()
    start = kl_to(teacher, student(tiny_llama_dir), data)
    task_only = student(tiny_llama_dir)
    DistillationTrainer(model=task_only, args=targs(tmp_path / "task", steps=10), train_dataset=data,
                        teacher=teacher, distill=DistillConfig(kl_weight=0)).train()
    model = student(tiny_llama_dir)
    trainer = DistillationTrainer(model=model, args=targs(tmp_path / "kd", steps=10), train_dataset=data,
                                  teacher=teacher,
                                  distill=DistillConfig(task_weight=0, temperature=2.0, hidden_weight=0.5))
    trainer.train()
    distilled = kl_to(teacher, model, data)
    assert distilled < 0.7 * start and distilled < kl_to(teacher, task_only, data)
    assert all(torch.equal(before[n], p) for n, p in teacher.state_dict().items())  # frozen
    logged = [e for e in trainer.state.log_history if "kl_loss" in e]
    assert len(logged) == 10 and all("hidden_loss" in e and "task_loss" in e for e in logged)


class Classes(torch.utils.data.Dataset):
    """Tokens() sequences, each with a class label from ``labels``."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.ids, self.labels = Tokens().ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_skip_teacher_mistakes_leaves_the_teacher_mistakes_out_of_the_kl(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Labels the teacher always gets right: the same training as without the option; labels it always gets wrong:
    the same as without a KL term."""
    torch.manual_seed(0)
    fp = LlamaForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=3, pad_token_id=0).eval()
    fp.save_pretrained(tmp_path / "fp")
    with torch.no_grad():
        logits = fp(input_ids=Tokens().ids).logits  # (32, 3)

    def train(labels: torch.Tensor, distill: DistillConfig, name: str) -> dict[str, torch.Tensor]:
        model = LlamaForSequenceClassification.from_pretrained(tmp_path / "fp", quantization_config=TBN)
        DistillationTrainer(model=model, args=targs(tmp_path / name, steps=3), train_dataset=Classes(labels),
                            teacher=fp, distill=distill).train()
        return trained_state(model)

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)

    right, wrong = logits.argmax(-1), logits.argmin(-1)
    skip = DistillConfig(skip_teacher_mistakes=True)
    assert same(train(right, skip, "right-skip"), train(right, DistillConfig(), "right"))
    skipped = train(wrong, skip, "wrong-skip")
    assert same(skipped, train(wrong, DistillConfig(kl_weight=0), "wrong-task"))
    assert not same(skipped, train(wrong, DistillConfig(), "wrong"))  # the KL did count there without the option
    with pytest.raises(ValueError, match="LlamaForCausalLM generates text"):
        DistillationTrainer(model=student(tiny_llama_dir), args=targs(tmp_path / "lm"), train_dataset=Tokens(),
                            distill=skip)


def test_evaluation_scores_the_task_loss_alone(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """eval_loss (and the perplexity from it) is the task's, as a plain Trainer reports it for the same weights."""
    from transformers import Trainer

    model = student(tiny_llama_dir)
    trainer = DistillationTrainer(model=model, args=targs(tmp_path / "kd", steps=4), train_dataset=Tokens(),
                                  eval_dataset=Tokens(), distill=DistillConfig(kl_weight=5.0, hidden_weight=1.0))
    trainer.train()
    plain = Trainer(model=model, args=targs(tmp_path / "plain"), eval_dataset=Tokens()).evaluate()["eval_loss"]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain, rel=1e-6)


def test_kl_weight_ramps_in(tiny_llama_dir: Path, tmp_path: Path) -> None:
    trainer = DistillationTrainer(model=student(tiny_llama_dir), args=targs(tmp_path, steps=8), train_dataset=Tokens(),
                                  distill=DistillConfig(kl_weight=0.8, kl_start=0.25, kl_ramp=0.5))
    trainer.train()
    weights = [e["kl_weight"] for e in trainer.state.log_history if "kl_weight" in e]
    assert weights == pytest.approx([0, 0, 0, 0.2, 0.4, 0.6, 0.8, 0.8])  # at steps 0..7 of 8


# -- data parallel: 2 processes under accelerate launch = 1 process on the same batches ----------
def test_two_process_distillation_matches_one_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from test_distributed import ACCELERATE, free_port, run

    def launch(out: Path, processes: int, batch: int) -> list[dict[str, torch.Tensor]]:
        out.mkdir()
        args = [__file__, str(tiny_llama_dir), str(out), str(batch), "4"]
        if processes == 1:
            run([sys.executable, *args])
        else:
            run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args])
        results = [torch.load(out / f"rank{r}.pt") for r in range(processes)]
        assert all(int(r.pop("world_size")) == processes for r in results)
        return results

    rank0, rank1 = launch(tmp_path / "ddp", 2, batch=4)
    (single,) = launch(tmp_path / "single", 1, batch=8)
    assert rank0.keys() == rank1.keys() == single.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    for key in (k for k in rank0 if not k.endswith(".tile")):
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    tiles = [k for k in rank0 if k.endswith(".tile")]
    assert tiles and all(torch.equal(rank0[k], single[k]) for k in tiles)


def worker(fp_dir: str, out_dir: str, batch: int, steps: int) -> None:
    model = student(Path(fp_dir))
    args = targs(Path(out_dir), steps=steps, batch=batch, ddp_find_unused_parameters=False)
    DistillationTrainer(model=model, args=args, train_dataset=Tokens(),
                        distill=DistillConfig(kl_weight=0.5, temperature=2.0, hidden_weight=0.1)).train()
    result = trained_state(model)
    for name, layer in tbn_layers(pack_model(model)):
        result[f"{name}.tile"] = layer.tile.clone()
    result["world_size"] = torch.tensor(args.world_size)
    torch.save(result, Path(out_dir) / f"rank{args.process_index}.pt")
    end_process_group()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
