"""Data-parallel training on CPU under ``accelerate launch`` with 2 processes (DDP over gloo)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import reviews_csv, tiny_bert_classifier, tiny_llama_lm

from hf_tbn.cli import main

WORKER = Path(__file__).with_name("ddp_worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], returncode: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == returncode, result.stdout[-3000:] + result.stderr[-5000:]
    return result


# accelerate 1.x sends `--cpu` to its single-process launcher (multi-CPU needs an MPI hostfile);
# `--multi_gpu` starts the processes through torchrun and, with no CUDA, DDP runs over gloo.
def launch(*args: str) -> list[str]:
    """``accelerate launch`` of ``args`` (a script or ``-m module``, and its arguments) as 2 processes."""
    return [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]


def train(model_dir: Path, out: Path, mode: str, processes: int, batch: int) -> list[dict[str, torch.Tensor]]:
    out.mkdir()
    args = [str(WORKER), str(model_dir), str(out), mode, str(batch), "6"]
    run([sys.executable, *args] if processes == 1 else launch(*args))
    results = [torch.load(out / f"rank{r}.pt") for r in range(processes)]
    assert all(int(r.pop("world_size")) == processes for r in results)
    return results


@pytest.mark.parametrize("mode", ["qat", "lora", "fsdp2"])
def test_two_process_training_matches_one_process(tiny_llama_dir: Path, tmp_path: Path, mode: str) -> None:
    rank0, rank1 = train(tiny_llama_dir, tmp_path / "two", mode, processes=2, batch=4)
    (single,) = train(tiny_llama_dir, tmp_path / "single", mode, processes=1, batch=8)

    assert rank0.keys() == rank1.keys() == single.keys()
    for key in rank0:  # gradients are all-reduced: both ranks hold the very same weights
        assert torch.equal(rank0[key], rank1[key]), key

    # One process on the same 8-sample batches: the same training up to the order of the
    # gradient reduction (two means of 4 all-reduced vs one mean of 8), i.e. float rounding.
    trained = [k for k in rank0 if not k.endswith((".tile", ".alpha"))]
    assert trained
    for key in trained:
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    tiles = [k for k in rank0 if k.endswith(".tile")]
    assert (mode != "lora") == bool(tiles)
    flipped = sum(int(torch.count_nonzero(torch.bitwise_xor(rank0[k], single[k]))) for k in tiles)
    assert flipped == 0, f"{flipped} tile bytes differ between 2-process and 1-process training"
    if mode == "fsdp2":
        refused = torch.load(tmp_path / "two" / "refused0.pt")
        assert refused.startswith("model.layers.0.self_attn.q_proj: the latent weight is sharded (FSDP)"), refused


def test_cli_train_with_distillation_under_ddp_matches_one_process(tmp_path: Path, smollm2_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``accelerate launch -m hf_tbn train``: teacher fine-tune and distilled QAT both data-parallel, OUT and the
    teacher written once, by the main process, as one process trains them on the same batches. Without
    ``--use_cpu`` on a machine with no GPU, Trainer would run each process alone: refused."""
    src, data = tiny_llama_lm(tmp_path / "lm", smollm2_dir), tmp_path / "lines.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} comes after line {i - 1}"}) + "\n" for i in range(60)))

    def train_cli(out: Path, batch: int, *devices: str) -> list[str]:
        return ["train", str(src), str(data), str(out), "--task", "causal-lm", "--min-compress-size", "0",
                "--block_size", "16", "--max_steps", "3", "--per_device_train_batch_size", str(batch),
                "--train_sampling_strategy", "sequential", "--save_strategy", "no", "--seed", "0",
                "--distill", "--teacher_fine_tune", "--task_weight", "0", *devices]

    printed = run(launch("-m", "hf_tbn", *train_cli(tmp_path / "ddp", 2, "--use_cpu"))).stdout
    assert printed.count("teacher evaluation: ") == printed.count("\nevaluation: ") == 1, printed
    assert printed.count("wrote ") == 1, printed
    assert main(train_cli(tmp_path / "single", 4, "--use_cpu")) == 0
    capsys.readouterr()

    for folder in ("", "-checkpoints/teacher"):
        ddp, single = (load_file(tmp_path / f"{run}{folder}" / "model.safetensors") for run in ("ddp", "single"))
        assert ddp.keys() == single.keys()
        for key in ddp:  # the gradients of 2 x 2 blocks all-reduced against those of 4 blocks: float rounding
            torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    ddp, single = (json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("ddp", "single"))
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]

    refused = run(launch("-m", "hf_tbn", *train_cli(tmp_path / "x", 2)), returncode=1)
    assert "hf-tbn: error: launched as 2 processes (WORLD_SIZE=2) but Trainer would run 1" in refused.stderr
    assert not (tmp_path / "x").exists()


def test_cli_train_classification_resumed_under_ddp_matches_the_whole_run(tmp_path: Path, minilm_dir: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A new classification head (with the default 30% warm-up) trained data-parallel through the CLI: resumed
    from the half-way checkpoint under DDP it writes the very weights of the uninterrupted DDP run, and both match
    one process trained on the same batches, evaluation loss included."""
    src = tiny_bert_classifier(tmp_path / "fp", minilm_dir, num_labels=2, dropout=0.0)
    data = reviews_csv(tmp_path / "reviews.csv")

    def train_cli(out: Path, batch: int, *extra: str) -> list[str]:
        return ["train", str(src), str(data), str(out), "--p", "4", "--min-compress-size", "0", "--max_steps", "4",
                "--save_steps", "2", "--per_device_train_batch_size", str(batch), "--train_sampling_strategy",
                "sequential", "--seed", "0", "--use_cpu", *extra]

    printed = run(launch("-m", "hf_tbn", *train_cli(tmp_path / "whole", 2))).stdout
    assert printed.count("\nevaluation: ") == printed.count("wrote ") == 1, printed
    (tmp_path / "resumed-checkpoints").mkdir()
    shutil.copytree(tmp_path / "whole-checkpoints" / "checkpoint-2", tmp_path / "resumed-checkpoints" / "checkpoint-2")
    run(launch("-m", "hf_tbn", *train_cli(tmp_path / "resumed", 2, "--resume")))
    assert sorted(p.name for p in (tmp_path / "resumed-checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert main(train_cli(tmp_path / "single", 4)) == 0
    capsys.readouterr()

    whole, resumed, single = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "resumed", "single"))
    assert whole.keys() == resumed.keys() == single.keys()
    assert any(t.dim() == 3 for t in whole.values())  # latent TBN layers: (p, out/p, in)
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(single[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)
    # transformers multiplies a loss by the number of processes unless told it is a per-batch mean
    ddp, one = (json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("whole", "single"))
    assert ddp["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
