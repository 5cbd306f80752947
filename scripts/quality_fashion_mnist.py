"""Fashion-MNIST from scratch: an MLP, a small CNN and a small ResNet, full precision vs binary vs TBN p = 2..16.

Every variant trains with the same data, budget and seed (docs/quality.md); the TBN
variants are the dense model converted with ``hf_tbn.convert_model`` before training
(quantization-aware training from the dense initialisation), then packed for evaluation.
A variant is ``fp``, ``P`` (TBN with p = P) or ``P+warmup`` (the dense-to-tiled warm-up a Trainer
runs by default, hf_tbn.warmup; plain ``P`` trains without it); with several ``--seeds`` each variant's row holds
the mean accuracy over the seeds, its standard deviation and the worst seed. ``--lr`` may give some
variants their own learning rate (each chosen on the ``--validation`` split).

    .venv/bin/python scripts/quality_fashion_mnist.py           # full budget, writes docs/
    .venv/bin/python scripts/quality_fashion_mnist.py --tasks resnet --variants fp,4,8 --seeds 0,1,2 --lr 1e-3,4=3e-3
    .venv/bin/python scripts/quality_fashion_mnist.py --tasks resnet --variants 4,4+warmup --validation
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
from results import (
    Row,
    Task,
    add_layer_options,
    add_lr_option,
    budget_rates,
    layer_options,
    measure,
    over_seeds,
    parse_variant,
    publish,
    quality_parser,
    seeds_of,
    variant_rates,
)
from torch import nn

from hf_tbn import TBNConfig, convert_model, pack_model
from hf_tbn.demos.fashion_mnist import load_fashion_mnist, predict, resnet, train
from hf_tbn.warmup import DEFAULT_WARMUP

VARIANTS = "fp,1,2,4,8,16"
VALIDATION_IMAGES = 10_000  # --validation: the last training images, scored instead of the test set
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


def variant_list(text: str) -> list[str]:
    """``--variants``: comma-separated ``fp``, ``P`` (TBN p = P) or ``P+warmup`` (results.parse_variant; this
    script's own training loop has no teacher, so no ``+distill``)."""
    variants = text.split(",")
    for variant in variants:
        try:
            p, _, distill = parse_variant(variant)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if distill or p == 0:
            raise argparse.ArgumentTypeError(f"variant {variant!r}: expected fp, P or P+warmup with P >= 1, "
                                             "e.g. fp,4,8+warmup")
    if len(set(variants)) < len(variants):
        raise argparse.ArgumentTypeError(f"{text!r} names a variant twice")
    return variants


def run_task(name: str, label: str, build: Callable[[], nn.Module], data: dict[str, torch.Tensor], epochs: int,
             seeds: list[int], variants: list[str], rates: dict[str, float], schedule: str, warmup: float,
             options: dict[str, str], validation: bool, min_compress_size: int, fp_layers: list[str], out: Path,
             notes: str = "") -> None:
    """Train every variant with every seed (at ``rates[variant]``) and publish the rows after each
    (``+warmup`` variants warm up over the fraction ``warmup`` of the steps, the others train plain); ``fp_layers``
    stay full precision in all TBN variants (the classifier head above all: tiled, its output blocks would be
    scaled copies of each other, i.e. classes that cannot be told apart). Per seed every variant starts from the
    same dense weights; ``options`` are the TBNConfig fields of :func:`results.layer_options`."""
    metric = f"{'validation' if validation else 'test'} accuracy %"
    budget = {"epochs": epochs, "batch_size": 128, "optimizer": "Adam", "lr": budget_rates(rates),
              "lr schedule": schedule,
              **({"seed": seeds[0]} if len(seeds) == 1 else {"seeds": seeds}),
              **({"warmup": warmup} if any("+warmup" in v for v in variants) else {}),
              **{k: v for k, v in options.items() if v != getattr(TBNConfig(), k)},
              "train_images": int(data["x_train"].shape[0]), "scored_images": int(data["x_test"].shape[0]),
              "min_compress_size": min_compress_size, "full precision layers": fp_layers}
    results: dict[str, list[Row]] = {v: [] for v in variants}
    for seed in seeds:
        torch.manual_seed(seed)
        dense = build()
        for variant in variants:
            p, with_warmup, _ = parse_variant(variant)
            model = copy.deepcopy(dense)
            if p is not None:
                convert_model(model, TBNConfig(compression_factor=p, min_compress_size=min_compress_size,
                                               modules_to_not_convert=fp_layers, **options))
            start = time.time()
            train(model, data["x_train"], data["y_train"], epochs=epochs, seed=seed, lr=rates[variant],
                  cosine=schedule == "cosine", warmup=warmup if with_warmup else 0.0)
            seconds = time.time() - start
            pack_model(model)
            acc = float((predict(model, data["x_test"]).argmax(-1) == data["y_test"]).float().mean())
            row = measure(None if p is None else f"p={variant}", model, {metric: 100 * acc}, seconds)
            results[variant].append(row)
            print(f"{name} {row.variant} seed {seed}: {metric} {100 * acc:.2f}  bits/weight {row.bits_converted:.3f}"
                  f"  {seconds:.0f}s  factors {row.converted_layers}", flush=True)
            rows = [r[0] if len(seeds) == 1 else over_seeds(r, metric, True) for r in results.values() if r]
            publish(Task(f"fashion_mnist-{name}" + ("-validation" if validation else ""),
                         f"Fashion-MNIST, {label} from scratch" + (": validation split" if validation else ""),
                         metric, True, budget, rows, notes), out, show=seed == seeds[-1] and variant == variants[-1])


def main() -> None:
    parser = quality_parser(__doc__, several_seeds=True)
    parser.add_argument("--tasks", nargs="+", choices=["mlp", "cnn", "resnet"], default=["mlp", "cnn", "resnet"])
    parser.add_argument("--variants", type=variant_list, default=variant_list(VARIANTS),
                        help=f"comma-separated fp, P or P+warmup (default {VARIANTS})")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP, help="warm-up fraction of +warmup variants")
    add_layer_options(parser)
    parser.add_argument("--validation", action="store_true",
                        help=f"train without the last {VALIDATION_IMAGES} training images and score on them")
    parser.add_argument("--mlp-epochs", type=int, default=20)
    parser.add_argument("--cnn-epochs", type=int, default=10)
    parser.add_argument("--resnet-epochs", type=int, default=4)
    add_lr_option(parser, "1e-3")
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="lr over the run")
    args = parser.parse_args()
    rates = variant_rates(parser, args.lr, args.variants)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if args.validation:
        x_train, y_train, x_test, y_test = (x_train[:-VALIDATION_IMAGES], y_train[:-VALIDATION_IMAGES],
                                            x_train[-VALIDATION_IMAGES:], y_train[-VALIDATION_IMAGES:])
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:512], y_train[:512], x_test[:256], y_test[:256]
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    common = {"data": data, "seeds": seeds_of(args), "variants": args.variants, "rates": rates,
              "schedule": args.schedule, "warmup": args.warmup, "options": layer_options(args),
              "out": args.out,
              "validation": args.validation}
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
