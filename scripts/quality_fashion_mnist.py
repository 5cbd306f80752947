"""Fashion-MNIST from scratch: an MLP and a small CNN, full precision vs binary vs TBN p = 2..16.

Every variant trains with the same data, budget and seed (DESIGN.md section 7); the TBN
variants are the dense model converted with ``hf_tbn.convert_model`` before training
(quantization-aware training from the dense initialisation), then packed for evaluation.

    .venv/bin/python scripts/quality_fashion_mnist.py           # full budget, writes docs/
    .venv/bin/python scripts/quality_fashion_mnist.py --quick --out /tmp/q   # CI smoke run
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict

import torch
from results import Task, measure, publish, quality_parser
from torch import nn

from hf_tbn import TBNConfig, convert_model, pack_model
from hf_tbn.demos.fashion_mnist import load_fashion_mnist, predict, train

FACTORS = [None, 1, 2, 4, 8, 16]


def mlp() -> nn.Module:
    """784-512-512-10 with BatchNorm."""
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=nn.Linear(784, 512), bn1=nn.BatchNorm1d(512), relu1=nn.ReLU(),
        fc2=nn.Linear(512, 512), bn2=nn.BatchNorm1d(512), relu2=nn.ReLU(),
        fc3=nn.Linear(512, 10),
    ))


def cnn() -> nn.Module:
    """Three 3x3 conv blocks (16-32-64 channels) with BatchNorm and max pooling, one linear head."""
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 3 * 3, 10))


def run_task(name: str, build: type[nn.Module] | object, data: dict[str, torch.Tensor], epochs: int, seed: int,
             lr: float, schedule: str, min_compress_size: int, fp_layers: list[str]) -> Task:
    """Train every variant; ``fp_layers`` stay full precision in all TBN variants (the classifier head
    above all: tiled, its output blocks would be scaled copies of each other, i.e. classes that
    cannot be told apart)."""
    rows = []
    torch.manual_seed(seed)
    dense = build()
    for p in FACTORS:
        model = copy.deepcopy(dense)  # the same initialisation for every variant
        config = None
        if p is not None:
            config = TBNConfig(compression_factor=p, min_compress_size=min_compress_size,
                               modules_to_not_convert=fp_layers)
            convert_model(model, config)
        start = time.time()
        train(model, data["x_train"], data["y_train"], epochs=epochs, seed=seed, lr=lr, cosine=schedule == "cosine")
        seconds = time.time() - start
        pack_model(model)
        acc = float((predict(model, data["x_test"]).argmax(-1) == data["y_test"]).float().mean())
        rows.append(measure(p, model, {"test accuracy %": 100 * acc}, seconds))
        print(f"{name} {rows[-1].variant}: accuracy {100 * acc:.2f}%  bits/weight {rows[-1].bits_converted:.3f}  "
              f"{seconds:.0f}s  factors {rows[-1].converted_layers}", flush=True)
    budget = {"epochs": epochs, "batch_size": 128, "optimizer": "Adam", "lr": lr, "lr schedule": schedule, "seed": seed,
              "train_images": int(data["x_train"].shape[0]), "test_images": int(data["x_test"].shape[0]),
              "min_compress_size": min_compress_size, "full precision layers": fp_layers}
    return Task(f"fashion_mnist-{name}", f"Fashion-MNIST, {name.upper()} from scratch", "test accuracy %", True,
                budget, rows)


def main() -> None:
    parser = quality_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    parser.add_argument("--mlp-epochs", type=int, default=20)
    parser.add_argument("--cnn-epochs", type=int, default=10)
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="lr over the run")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:512], y_train[:512], x_test[:256], y_test[:256]
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    if "mlp" in args.tasks:
        epochs = 1 if args.quick else args.mlp_epochs
        publish(run_task("mlp", mlp, data, epochs, args.seed, lr=1e-3, schedule=args.schedule,
                         min_compress_size=64_000, fp_layers=["fc3"]),
                args.out)
    if "cnn" in args.tasks:
        epochs = 1 if args.quick else args.cnn_epochs
        # The first conv (1 -> 16, 144 weights) and the head stay full precision, as is usual for binary CNNs.
        publish(run_task("cnn", cnn, data, epochs, args.seed, lr=1e-3, schedule=args.schedule, min_compress_size=1_000,
                         fp_layers=["0", "13"]), args.out)


if __name__ == "__main__":
    main()
