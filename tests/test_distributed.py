"""Data-parallel training on CPU under ``accelerate launch`` with 2 processes (DDP over gloo)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


# accelerate 1.x sends `--cpu` to its single-process launcher (multi-CPU needs an MPI hostfile);
# `--multi_gpu` starts the processes through torchrun and, with no CUDA, DDP runs over gloo.
LAUNCHERS = {"ddp": ["--multi_gpu"], "fsdp2": ["--use_fsdp", "--fsdp_version", "2"]}


def train(model_dir: Path, out: Path, mode: str, launcher: str | None, batch: int) -> list[dict[str, torch.Tensor]]:
    out.mkdir()
    args = [str(WORKER), str(model_dir), str(out), mode, str(batch), "6"]
    processes = 1 if launcher is None else 2
    if launcher is None:
        run([sys.executable, *args])
    else:
        run([str(ACCELERATE), "launch", *LAUNCHERS[launcher], "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args])
    results = [torch.load(out / f"rank{r}.pt") for r in range(processes)]
    assert all(int(r.pop("world_size")) == processes for r in results)
    return results


@pytest.mark.parametrize(("launcher", "mode"), [("ddp", "qat"), ("ddp", "lora"), ("fsdp2", "qat")])
def test_two_process_training_matches_one_process(tiny_llama_dir: Path, tmp_path: Path, launcher: str,
                                                  mode: str) -> None:
    rank0, rank1 = train(tiny_llama_dir, tmp_path / launcher, mode, launcher, batch=4)
    (single,) = train(tiny_llama_dir, tmp_path / "single", mode, None, batch=8)

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
    assert (mode == "qat") == bool(tiles)
    flipped = sum(int(torch.count_nonzero(torch.bitwise_xor(rank0[k], single[k]))) for k in tiles)
    assert flipped == 0, f"{flipped} tile bytes differ between 2-process and 1-process training"
