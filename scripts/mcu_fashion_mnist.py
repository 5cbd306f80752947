"""Fashion-MNIST on an emulated Cortex-M4: the paper's microcontroller MLP and a small CNN.

Trains each variant with hf_tbn (same data, seed and budget per model family), exports it
with hf_tbn.mcu_export, checks the host build against PyTorch on the whole test set, runs
the Cortex-M4 build under qemu (mps2-an386, -icount shift=0) and prints one table: test
accuracy in Python and on the board, weight bytes, flash/RAM of the model from
arm-none-eabi-size and instructions per inference. With --doc the table replaces the
results block of docs/mcu.md.

    .venv/bin/python scripts/mcu_fashion_mnist.py --doc docs/mcu.md
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from doc_blocks import replace_block
from torch import nn

from hf_tbn import mcu_export
from hf_tbn.demos import fashion_mnist as demo

tc = mcu_export.toolchain

VARIANTS: tuple[tuple[str, str, Callable[[], nn.Module]], ...] = (
    ("MLP TBN fc1 p=4, fc2 p=1", "mlp", lambda: demo.mlp(4, 1)),
    ("MLP binary p=1", "mlp", lambda: demo.mlp(1, 1)),
    ("MLP float32", "mlp", lambda: demo.mlp(None, None)),
    ("CNN TBN conv1 p=1, conv2 p=4, fc p=1", "cnn", lambda: demo.cnn(1, 4, 1)),
    ("CNN float32", "cnn", lambda: demo.cnn(None, None, None)),
)
HEADER = (
    "| model | acc. Python (10k) | acc. board | board = PyTorch | weight bytes | flash B (text+rodata) "
    "| RAM B (data+bss) | instructions / inference |"
)


def evaluate(name: str, model: nn.Module, data: dict[str, torch.Tensor], board_images: int, workdir: Path) -> str:
    """Export ``model``, check host and board against PyTorch, return its table row."""
    logits = demo.predict(model, data["xt"])
    py_acc = (logits.argmax(1) == data["yt"]).float().mean().item()
    export = mcu_export.export_model(model, (1, 28, 28), workdir / re.sub(r"\W+", "_", name))
    host = tc.run_host(export, tc.build_host(export), data["xt"])
    rel = tc.rel_err(host, logits)
    host_same = (host.argmax(1) == logits.argmax(1)).float().mean().item()
    board = tc.run_board(export, tc.build_board(export), data["xt"][:board_images])
    board_pred = board.outputs.argmax(1)
    board_acc = (board_pred == data["yt"][:board_images]).float().mean().item()
    board_same = (board_pred == logits[:board_images].argmax(1)).float().mean().item()
    fp = tc.footprint(export)
    print(f"  {name}: host vs PyTorch on {len(host)} images: max rel err {rel:.2e}, argmax identical {host_same:.2%}; "
          f"board: {board_images} images, ticks/inference {board.ticks_min}-{board.ticks_max} "
          f"({board.instructions_per_tick:.2f} instructions/tick); footprint {fp}")
    return (
        f"| {name} | {py_acc:.2%} | {board_acc:.2%} ({board_images}) | {board_same:.2%} "
        f"| {export.plan.generated.weight_bytes:,} | {fp.flash:,} | {fp.ram:,} "
        f"| {board.instructions_per_inference:,.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp-epochs", type=int, default=5)
    parser.add_argument("--cnn-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlp-board-images", type=int, default=10000, help="test images run on the board (MLPs)")
    parser.add_argument("--cnn-board-images", type=int, default=2000, help="test images run on the board (CNNs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=None, help="markdown file whose results block to rewrite")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x, y = demo.load_fashion_mnist("train")
    xt, yt = demo.load_fashion_mnist("test")
    data = {"xt": xt, "yt": yt}
    budget = (
        f"budget: Adam lr 1e-3, batch 128, seed {args.seed}, full 60k training set; MLPs {args.mlp_epochs} epochs, "
        f"CNNs {args.cnn_epochs} epochs; board images: MLPs first {args.mlp_board_images}, CNNs first "
        f"{args.cnn_board_images} of the test set; torch {torch.__version__}, {args.threads} threads"
    )
    print(budget)
    rows = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    with tempfile.TemporaryDirectory(prefix="tbn_mcu_") as tmp:
        for name, family, build in VARIANTS:
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            epochs = args.mlp_epochs if family == "mlp" else args.cnn_epochs
            model = demo.train(build(), x, y, epochs, args.seed)
            print(f"{name}: trained {epochs} epochs in {time.perf_counter() - start:.0f} s")
            images = args.mlp_board_images if family == "mlp" else args.cnn_board_images
            rows.append(evaluate(name, model, data, images, Path(tmp)))
    table = "\n".join(rows)
    print(table)
    if args.doc is not None:
        replace_block(args.doc, "results", f"{budget}\n\n{table}\n")


if __name__ == "__main__":
    main()
