"""Fashion-MNIST from scratch: an MLP, a small CNN and a small ResNet, full precision vs binary vs TBN p = 2..16.

Every variant trains with the same data, budget and seed (docs/quality.md); the TBN
variants are the dense model converted with ``hf_tbn.convert_model`` before training
(quantization-aware training from the dense initialisation), then packed for evaluation.
A variant is ``fp`` or ``P`` (TBN with p = P); with several ``--seeds`` each variant's row holds
the mean accuracy over the seeds, its standard deviation and the worst seed.

    .venv/bin/python scripts/quality_fashion_mnist.py           # full budget, writes docs/
    .venv/bin/python scripts/quality_fashion_mnist.py --tasks resnet --variants fp,4,8 --seeds 0,1,2
    .venv/bin/python scripts/quality_fashion_mnist.py --quick --out /tmp/q   # CI smoke run
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from results import Row, Task, measure, over_seeds, publish, quality_parser, seeds_of
from torch import nn

from hf_tbn import TBNConfig, convert_model, pack_model
from hf_tbn.demos.fashion_mnist import load_fashion_mnist, predict, resnet, train

VARIANTS = "fp,1,2,4,8,16"
METRIC = "test accuracy %"
RESNET_NOTES = (
    "ResNet (hf_tbn.demos.fashion_mnist.resnet): stride-2 3x3 stem conv 1 -> 96 (864 weights, full precision), "
    "three residual blocks of two 3x3 convs 96 -> 96 (82,944 weights each; the first block strides to 7x7 and its "
    "shortcut is 2x2 average pooling), global average pooling, linear head 96 -> 10 (full precision). TBN tiles "
    "exactly the six block convs (factors per row in results/fashion_mnist-resnet.json)."
)


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


def variant_list(text: str) -> list[int | None]:
    """``--variants``: comma-separated ``fp`` (None) or a compression factor p >= 1."""
    variants: list[int | None] = []
    for item in text.split(","):
        if item != "fp" and not (item.isdigit() and int(item) >= 1):
            raise argparse.ArgumentTypeError(f"variant {item!r}: expected fp or a compression factor p >= 1, "
                                             "e.g. fp,4,8")
        variants.append(None if item == "fp" else int(item))
    if len(set(variants)) < len(variants):
        raise argparse.ArgumentTypeError(f"{text!r} names a variant twice")
    return variants


def run_task(name: str, label: str, build: Callable[[], nn.Module], data: dict[str, torch.Tensor], epochs: int,
             seeds: list[int], variants: list[int | None], lr: float, schedule: str, min_compress_size: int,
             fp_layers: list[str], out: Path, notes: str = "") -> None:
    """Train every variant with every seed and publish the rows after each; ``fp_layers`` stay full precision in
    all TBN variants (the classifier head above all: tiled, its output blocks would be scaled copies of each
    other, i.e. classes that cannot be told apart). Per seed every variant starts from the same dense weights."""
    budget = {"epochs": epochs, "batch_size": 128, "optimizer": "Adam", "lr": lr, "lr schedule": schedule,
              **({"seed": seeds[0]} if len(seeds) == 1 else {"seeds": seeds}),
              "train_images": int(data["x_train"].shape[0]), "test_images": int(data["x_test"].shape[0]),
              "min_compress_size": min_compress_size, "full precision layers": fp_layers}
    results: dict[int | None, list[Row]] = {p: [] for p in variants}
    for seed in seeds:
        torch.manual_seed(seed)
        dense = build()
        for p in variants:
            model = copy.deepcopy(dense)
            if p is not None:
                convert_model(model, TBNConfig(compression_factor=p, min_compress_size=min_compress_size,
                                               modules_to_not_convert=fp_layers))
            start = time.time()
            train(model, data["x_train"], data["y_train"], epochs=epochs, seed=seed, lr=lr,
                  cosine=schedule == "cosine")
            seconds = time.time() - start
            pack_model(model)
            acc = float((predict(model, data["x_test"]).argmax(-1) == data["y_test"]).float().mean())
            row = measure(p, model, {METRIC: 100 * acc}, seconds)
            results[p].append(row)
            print(f"{name} {row.variant} seed {seed}: accuracy {100 * acc:.2f}%  bits/weight {row.bits_converted:.3f}"
                  f"  {seconds:.0f}s  factors {row.converted_layers}", flush=True)
            rows = [r[0] if len(seeds) == 1 else over_seeds(r, METRIC, True) for r in results.values() if r]
            publish(Task(f"fashion_mnist-{name}", f"Fashion-MNIST, {label} from scratch", METRIC, True, budget, rows,
                         notes), out, show=seed == seeds[-1] and p == variants[-1])


def main() -> None:
    parser = quality_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", choices=["mlp", "cnn", "resnet"], default=["mlp", "cnn", "resnet"])
    parser.add_argument("--variants", type=variant_list, default=variant_list(VARIANTS),
                        help=f"comma-separated fp or p (default {VARIANTS})")
    parser.add_argument("--mlp-epochs", type=int, default=20)
    parser.add_argument("--cnn-epochs", type=int, default=10)
    parser.add_argument("--resnet-epochs", type=int, default=4)
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="lr over the run")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:512], y_train[:512], x_test[:256], y_test[:256]
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    common = {"data": data, "seeds": seeds_of(args), "variants": args.variants, "lr": 1e-3,
              "schedule": args.schedule, "out": args.out}
    if "mlp" in args.tasks:
        run_task("mlp", "MLP", mlp, epochs=1 if args.quick else args.mlp_epochs, min_compress_size=64_000,
                 fp_layers=["fc3"], **common)
    if "cnn" in args.tasks:
        # The first conv (1 -> 16, 144 weights) and the head stay full precision, as is usual for binary CNNs.
        run_task("cnn", "CNN", cnn, epochs=1 if args.quick else args.cnn_epochs, min_compress_size=1_000,
                 fp_layers=["0", "13"], **common)
    if "resnet" in args.tasks:
        # The paper's regime: every tiled conv above 64,000 weights; stem conv and head full precision.
        run_task("resnet", "ResNet", resnet, epochs=1 if args.quick else args.resnet_epochs, min_compress_size=64_000,
                 fp_layers=["stem.conv", "fc"], notes=RESNET_NOTES, **common)


if __name__ == "__main__":
    main()
