"""``hf-tbn`` quantize / pack / dequantize / inspect / train / demo end to end on small model folders."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import reviews_csv, tiny_bert_classifier, tiny_llama_lm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    Trainer,
    pipeline,
)

from hf_tbn import tbn_layers, tiling
from hf_tbn.cli import main
from hf_tbn.version import version
from hf_tbn.warmup import DEFAULT_WARMUP, QuantizationWarmup


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny BERT classifier with MiniLM's tokenizer, a license, a module subfolder and an ONNX export."""
    folder = tiny_bert_classifier(tmp_path_factory.mktemp("cli") / "fp", minilm_dir, num_labels=2)
    (folder / "LICENSE").write_text("license text")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 32}')
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"full-precision export")
    return folder


def check_companions(out: Path) -> None:
    """The source's other files came along; its full-precision export did not."""
    assert (out / "LICENSE").read_text() == "license text" and (out / "1_Pooling" / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and not (out / "onnx").exists()


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 labelled texts as CSV."""
    return reviews_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


def forms(folder: Path) -> set[tuple[str, int]]:
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return {(layer.form, layer.compression_factor) for _, layer in tbn_layers(model)}


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line a refused command printed last on stderr (after progress bars, if any)."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hf-tbn: error: ") and "Traceback" not in err and err.count("error") == 1, err
    return last


def test_quantize_pack_dequantize_inspect(fp_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    latent, packed, dense = tmp_path / "latent", tmp_path / "packed", tmp_path / "dense"
    assert main(["quantize", str(fp_folder), str(latent), "--form", "latent", "--min-compress-size", "0"]) == 0
    assert forms(latent) == {("latent", 4)}
    check_companions(latent)
    card = (latent / "README.md").read_text()
    assert card.startswith("---\n") and "import hf_tbn" in card and "bits per weight" in card

    assert main(["pack", str(latent), str(packed)]) == 0
    assert forms(packed) == {("packed", 4)}
    check_companions(packed)
    capsys.readouterr()
    assert main(["inspect", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.0.intermediate.dense" in out and "TBN form packed" in out and "fp16/bf16" in out

    assert main(["dequantize", str(packed), str(dense)]) == 0
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    plain = AutoModelForSequenceClassification.from_pretrained(dense)
    tbn = AutoModelForSequenceClassification.from_pretrained(packed)
    ids = torch.randint(0, 30522, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, tbn(input_ids=ids).logits)
    assert not list(tbn_layers(plain)) and not (dense / "README.md").exists()  # the TBN card stays behind


def test_quantize_of_a_tbn_folder_keeps_its_plan(fp_folder: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    latent = tmp_path / "latent"
    assert main(["quantize", str(fp_folder), str(latent), "--form", "latent", "--min-compress-size", "0"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(latent), str(tmp_path / "p8"), "--p", "8"]) == 2
    assert "compression_factor=4" in error_line(capsys) and not (tmp_path / "p8").exists()
    assert main(["quantize", str(latent), str(tmp_path / "same"), "--p", "4"]) == 0  # same p: packs
    assert forms(tmp_path / "same") == {("packed", 4)}


def test_alpha_param_option_reaches_the_config(fp_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--alpha-param: the latent folder holds the scalars, started from the dense weights; a TBN folder keeps
    its own."""
    latent = tmp_path / "latent"
    assert main(["quantize", str(fp_folder), str(latent), "--form", "latent", "--min-compress-size", "0",
                 "--alpha-param", "scalars"]) == 0
    layers = [layer for _, layer in tbn_layers(AutoModelForSequenceClassification.from_pretrained(latent))]
    assert layers and all(layer.alpha_param == "scalars" for layer in layers)
    assert all(torch.equal(layer.alpha, tiling.alpha(layer.weight, layer.compression_factor)) for layer in layers)
    capsys.readouterr()
    assert main(["quantize", str(latent), str(tmp_path / "other"), "--alpha-param", "tensor"]) == 2
    assert "alpha_param='scalars'" in error_line(capsys) and not (tmp_path / "other").exists()


def test_tile_layout_option_reaches_the_packed_folder(fp_folder: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--tile-layout input: every packed layer's tile is an (out, in/p) weight; a TBN folder keeps its own layout."""
    packed = tmp_path / "packed"
    assert main(["quantize", str(fp_folder), str(packed), "--min-compress-size", "0", "--tile-layout", "input"]) == 0
    layers = [layer for _, layer in tbn_layers(AutoModelForSequenceClassification.from_pretrained(packed))]
    assert layers and all(layer.tile_layout == "input" and layer.form == "packed" for layer in layers)
    assert all(layer.tile_shape[0] == layer.weight_shape[0] for layer in layers)
    capsys.readouterr()
    assert main(["quantize", str(packed), str(tmp_path / "other"), "--tile-layout", "output"]) == 2
    assert "tile_layout='input'" in error_line(capsys) and not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "{tmp}/missing", "{tmp}/out"], "missing: no such folder"),
        (["quantize", "{tmp}/empty", "{tmp}/out"], "no config.json, not a transformers model folder"),
        (["pack", "{fp}", "{tmp}/out"], "not a TBN folder"),
        (["inspect", "{fp}"], "not a TBN folder"),
        (["dequantize", "{fp}", "{tmp}/out"], "not a TBN folder"),
        (["quantize", "{fp}", "{tmp}/out", "--p", "0"], "compression_factor must be"),
        (["quantize", "{tmp}/noweights", "{tmp}/out"], "noweights"),
        (["train", "{fp}", "{tmp}/missing.csv", "{tmp}/out"], "missing.csv: no such data file"),
        (["train", "{fp}", "{tmp}/data.txt", "{tmp}/out"], "data must be one of"),
    ],
)
def test_user_mistakes_are_one_line_errors(fp_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "data.txt").write_text("text\nhello\n")
    (tmp_path / "noweights" / "config.json").write_text((fp_folder / "config.json").read_text())
    assert main([a.format(tmp=tmp_path, fp=fp_folder) for a in argv]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_argument_errors_are_one_line_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["quantize"], ["quantize", "a", "b", "--p", "x"], ["bogus"], ["inspect", "d", "--nope"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        error_line(capsys)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-tbn {version()}"


def test_help_imports_no_command_code() -> None:
    """``hf-tbn -h`` builds the parser only: no command module, datasets or Trainer is imported."""
    check = textwrap.dedent("""
        import sys, hf_tbn
        before = set(sys.modules)
        from hf_tbn.cli import main
        try:
            main(["-h"])
        except SystemExit:
            pass
        print(sorted(m for m in set(sys.modules) - before if m.startswith(("hf_tbn", "datasets", "transformers"))),
              file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    new = result.stderr.strip().splitlines()[-1]
    assert "hf_tbn.commands" not in new and "datasets" not in new and "transformers.trainer" not in new, new


def test_train_from_full_precision_then_from_tbn(fp_folder: Path, reviews: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert main(["train", str(fp_folder), str(reviews), str(first), "--max_steps", "3", "--min-compress-size", "0",
                 "--per_device_train_batch_size", "4"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(first)
    assert model.config.quantization_config.form == "latent" and model.config.id2label == {0: "neg", 1: "pos"}
    assert list(tbn_layers(model))
    check_companions(first)
    metrics = json.loads((first / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    assert (tmp_path / "first-checkpoints" / "checkpoint-3").is_dir()  # transformers' default save_strategy

    # From the TBN folder, parquet data, packed output, no checkpoints: no checkpoint folder remains.
    data = tmp_path / "reviews.parquet"
    import datasets

    datasets.load_dataset("csv", data_files=str(reviews), split="train").to_parquet(str(data))
    second = tmp_path / "second"
    assert main(["train", str(first), str(data), str(second), "--max_steps", "2", "--pack", "--save_strategy", "no",
                 "--eval_fraction", "0"]) == 0
    assert forms(second) == {("packed", 4)} and not (second / "eval_results.json").exists()
    assert not (tmp_path / "second-checkpoints").exists()


def test_train_a_classifier_on_a_tbn_base_model(tmp_path: Path, minilm_dir: Path) -> None:
    """A quantized base model (no head) gets a head with the data's classes, named."""
    base, tbn = tmp_path / "base", tmp_path / "tbn"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(base)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(base)
    assert main(["quantize", str(base), str(tbn), "--min-compress-size", "0"]) == 0
    data = tmp_path / "topics.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i}", "topic": "abc"[i % 3]}) + "\n" for i in range(30)))
    out = tmp_path / "out"
    assert main(["train", str(tbn), str(data), str(out), "--label_column", "topic", "--max_steps", "1",
                 "--save_strategy", "no"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and list(tbn_layers(model))


def test_train_resume_continues_the_last_checkpoint(fp_folder: Path, reviews: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    resumed_from = []
    train = Trainer.train

    def recording_train(self: Trainer, resume_from_checkpoint: str | None = None, **kwargs: object) -> object:
        resumed_from.append(resume_from_checkpoint)
        return train(self, resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(Trainer, "train", recording_train)
    common = ["--min-compress-size", "0", "--per_device_train_batch_size", "4", "--save_steps", "2",
              "--eval_fraction", "0"]
    out, checkpoints = tmp_path / "out", tmp_path / "out-checkpoints"
    assert main(["train", str(fp_folder), str(reviews), str(out), "--max_steps", "2", *common]) == 0
    capsys.readouterr()
    # Checkpoints already there: continuing needs --resume (and OUT, not empty now, --overwrite).
    assert main(["train", str(fp_folder), str(reviews), str(tmp_path / "other"), "--max_steps", "4",
                 "--output_dir", str(checkpoints), *common]) == 2
    assert "pass --resume" in error_line(capsys)
    assert main(["train", str(fp_folder), str(reviews), str(out), "--max_steps", "4", "--resume", "--overwrite",
                 *common]) == 0
    assert resumed_from == [None, str(checkpoints / "checkpoint-2")]
    assert json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    capsys.readouterr()
    assert main(["train", str(fp_folder), str(reviews), str(tmp_path / "x"), "--resume",
                 "--output_dir", str(tmp_path / "none"), *common]) == 2
    assert "no checkpoint" in error_line(capsys)


def test_train_classifier_accumulating_two_batches_of_two_matches_batches_of_four(
        reviews: Path, tmp_path: Path, minilm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """transformers leaves a loss undivided by the accumulation steps when the model takes loss kwargs, as BERT
    does though its classification loss is a plain mean: hf-tbn train keeps it a per-batch mean, so gradients
    accumulated over 2 x 2 texts are those of 4 (the trained weights within float rounding)."""
    src = tiny_bert_classifier(tmp_path / "fp", minilm_dir, num_labels=2, dropout=0.0)
    common = ["--min-compress-size", "0", "--max_steps", "3", "--train_sampling_strategy", "sequential",
              "--save_strategy", "no", "--eval_fraction", "0"]
    assert main(["train", str(src), str(reviews), str(tmp_path / "four"), "--per_device_train_batch_size", "4",
                 *common]) == 0
    assert main(["train", str(src), str(reviews), str(tmp_path / "two"), "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "2", *common]) == 0
    capsys.readouterr()
    four, two = (load_file(tmp_path / run / "model.safetensors") for run in ("four", "two"))
    assert four.keys() == two.keys()
    for key in four:
        torch.testing.assert_close(two[key], four[key], rtol=1e-4, atol=1e-5, msg=key)


def test_train_causal_lm_from_jsonl_reports_perplexity(tmp_path: Path, minilm_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A language model distilled from itself fine-tuned first (the recipe of docs/distillation.md): the
    teacher's and the student's evaluations are printed, with perplexity."""
    src = tiny_llama_lm(tmp_path / "lm", minilm_dir)
    data = tmp_path / "lines.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} comes after line {i - 1}"}) + "\n" for i in range(30)))
    assert main(["train", str(src), str(data), str(tmp_path / "out"), "--task", "causal-lm", "--max_steps", "2",
                 "--min-compress-size", "0", "--activation_checkpointing", "--save_strategy", "no",
                 "--distill", "--teacher_fine_tune", "--task_weight", "0"]) == 0
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-5)
    assert list(tbn_layers(AutoModelForCausalLM.from_pretrained(tmp_path / "out")))
    assert not list(tbn_layers(AutoModelForCausalLM.from_pretrained(tmp_path / "out-checkpoints" / "teacher")))
    printed = capsys.readouterr().out
    assert "teacher evaluation: " in printed and printed.count("eval_perplexity") == 2


def test_train_causal_lm_on_blocks_of_text(tmp_path: Path, smollm2_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--block_size: the texts, each ended by EOS, concatenated into whole blocks (one step per block at batch
    1); refused for classification, beside --max_length, and for too little text, naming the data file."""
    src, data = tiny_llama_lm(tmp_path / "lm", smollm2_dir), tmp_path / "lines.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = [f"line {i} comes after line {i - 1}" for i in range(30)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokens = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # + EOS
    common = [str(src), str(data), "--task", "causal-lm", "--eval_fraction", "0", "--min-compress-size", "0"]
    assert main(["train", *common, str(tmp_path / "out"), "--block_size", "16", "--num_train_epochs", "1",
                 "--per_device_train_batch_size", "1", "--save_strategy", "epoch"]) == 0
    assert [p.name for p in (tmp_path / "out-checkpoints").iterdir()] == [f"checkpoint-{tokens // 16}"]
    assert main(["train", *common, str(tmp_path / "same"), "--block_size", "16", "--validation_file", str(data),
                 "--max_steps", "1", "--save_strategy", "no"]) == 0  # DATA evaluated on as blocks too
    assert "eval_perplexity" in json.loads((tmp_path / "same" / "eval_results.json").read_text())

    assert main(["train", *common, str(tmp_path / "x"), "--block_size", "100000"]) == 2
    assert error_line(capsys) == (f"hf-tbn: error: {data}: --block_size: {tokens} tokens make no whole block "
                                  "of block_size 100000")
    assert main(["train", *common[:2], str(tmp_path / "x"), "--block_size", "16"]) == 2
    assert "--block_size 16: expected at least 2 tokens, with --task causal-lm" in error_line(capsys)
    assert main(["train", *common, str(tmp_path / "x"), "--block_size", "16", "--max_length", "64"]) == 2
    assert "--max_length 64 and --block_size 16: give one" in error_line(capsys)


def test_train_warmup_option_overrides_the_models_fraction(fp_folder: Path, reviews: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset: the model's TBNConfig ("auto": 0.3 for a classifier); --warmup sets it; out of [0, 1] is refused."""
    fractions = []
    begin = QuantizationWarmup.on_train_begin

    def recording_begin(self: QuantizationWarmup, *args: object, **kwargs: object) -> None:
        begin(self, *args, **kwargs)
        fractions.append(self._active)

    monkeypatch.setattr(QuantizationWarmup, "on_train_begin", recording_begin)
    common = ["--max_steps", "1", "--min-compress-size", "0", "--save_strategy", "no", "--eval_fraction", "0"]
    assert main(["train", str(fp_folder), str(reviews), str(tmp_path / "auto"), *common]) == 0
    assert main(["train", str(fp_folder), str(reviews), str(tmp_path / "half"), "--warmup", "0.5", *common]) == 0
    assert fractions == [DEFAULT_WARMUP, 0.5]
    assert main(["train", str(fp_folder), str(reviews), str(tmp_path / "bad"), "--warmup", "2", *common]) == 2
    assert "--warmup 2.0: expected a fraction" in error_line(capsys) and not (tmp_path / "bad").exists()


def test_train_refuses_a_missing_column(fp_folder: Path, reviews: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(fp_folder), str(reviews), str(tmp_path / "bad"), "--text_column", "body"]) == 2
    assert "column 'body' missing" in error_line(capsys)
    assert not (tmp_path / "bad").exists()


def test_train_refuses_fsdp(fp_folder: Path, reviews: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """OUT is written from whole weights; FSDP would leave the main process a shard of each (and on CPU accelerate
    runs --use_fsdp as DDP anyway): refused, asked for in TrainingArguments or by accelerate launch."""
    out = tmp_path / "out"
    assert main(["train", str(fp_folder), str(reviews), str(out), "--fsdp", "full_shard"]) == 2
    assert "FSDP (--fsdp, or accelerate launch --use_fsdp)" in error_line(capsys)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(["train", str(fp_folder), str(reviews), str(out)]) == 2
    assert "launch with accelerate launch --multi_gpu (DDP)" in error_line(capsys)
    assert not out.exists() and not (tmp_path / "out-checkpoints").exists()


def test_demo_runs_end_to_end_into_fresh_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shrunken budget (the README's default is the full one): same path, every line of the table."""
    from hf_tbn.demos.bbc import fresh_run_dir

    budget = ["--steps", "2", "--max-length", "24", "--batch-size", "4", "--eval-examples", "24"]
    assert main(["demo", "--output-dir", str(tmp_path), *budget]) == 0
    out = capsys.readouterr().out
    for line in ("accuracy, TBN p=4 after QAT", "bits per weight", "checkpoint MB vs full-precision",
                 "checkpoint written to"):
        assert line in out
    assert "reloaded logits bit-identical to in-memory packed  yes" in out
    runs = sorted(tmp_path.iterdir())
    assert len(runs) == 1 and (runs[0] / "tbn-packed" / "README.md").is_file()
    assert sorted(p.name for p in runs[0].iterdir()) == ["fp-start", "tbn-packed"]  # no empty Trainer folder
    classify = pipeline("text-classification", model=str(runs[0] / "tbn-packed"), device="cpu")
    answer = classify("Shares in the bank rose after its profits beat forecasts.", top_k=None)
    assert sorted(a["label"] for a in answer) == ["business", "entertainment", "politics", "sports", "tech"]
    assert fresh_run_dir(tmp_path) != runs[0]  # a second run in the same second still gets its own folder
