"""Fashion-MNIST for the MCU demo, tests and scripts: data, the paper's MLP, a small CNN, a small ResNet, training.

Data: the Debian package ``dataset-fashion-mnist`` (idx files under
``/usr/share/datasets/fashion-mnist``). The MLP and the CNN are ``nn.Sequential`` chains, the
form the exporter takes; the ResNet (scripts/quality_fashion_mnist.py) has residual blocks.
"""

from __future__ import annotations

import gzip
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TBNConv2d, TBNLinear
from ..warmup import blend_at, set_blend

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics


def load_fashion_mnist(split: str, directory: Path = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images ``(n, 1, 28, 28)`` float32 and labels ``(n,)`` of ``split`` ("train" | "test")."""
    stem = {"train": "train", "test": "t10k"}.get(split)
    if stem is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = [directory / f"{stem}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: install the Debian package dataset-fashion-mnist")
    images = torch.frombuffer(bytearray(gzip.decompress(paths[0].read_bytes())[16:]), dtype=torch.uint8)
    labels = torch.frombuffer(bytearray(gzip.decompress(paths[1].read_bytes())[8:]), dtype=torch.uint8)
    x = (images.view(-1, 1, 28, 28).float() / 255.0 - MEAN) / STD
    return x, labels.long()


def mlp(fc1_p: int | None, fc2_p: int | None) -> nn.Sequential:
    """The paper's MCU model: 784-128-10, no bias; ``None`` keeps a layer float32 (dense)."""
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=_linear(784, 128, fc1_p),
        relu=nn.ReLU(),
        fc2=_linear(128, 10, fc2_p),
    ))


def cnn(conv1_p: int | None, conv2_p: int | None, fc_p: int | None) -> nn.Sequential:
    """A small CNN: two 3x3 convs with BatchNorm, max and average pooling, one linear layer."""
    return nn.Sequential(OrderedDict(
        conv1=_conv(1, 16, conv1_p), bn1=nn.BatchNorm2d(16), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=_conv(16, 32, conv2_p), bn2=nn.BatchNorm2d(32), relu2=nn.ReLU(), pool2=nn.AvgPool2d(2),
        flatten=nn.Flatten(),
        fc=_linear(32 * 7 * 7, 10, fc_p, bias=True),
    ))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a parameter-free shortcut (identity, or 2x2 average pooling when
    ``stride`` is 2), so every conv of a block is a ``width x width x 3 x 3`` weight."""

    def __init__(self, width: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"BasicBlock stride must be 1 or 2, got {stride}")
        self.conv1 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.AvgPool2d(2) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet(width: int = 96, strides: tuple[int, ...] = (2, 1, 1)) -> nn.Sequential:
    """A small ResNet for 28x28 inputs: a stride-2 3x3 stem conv (1 -> ``width``, 14x14), one
    :class:`BasicBlock` per entry of ``strides`` at constant ``width``, global average pooling, a
    linear head ``fc``. Every block conv has ``9 * width**2`` weights (82,944 at width 96, above the
    paper's 64,000 ``min_compress_size``); the stem conv (``stem.conv``) is tiny (``9 * width``).
    """
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(OrderedDict(conv=nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False),
                                       bn=nn.BatchNorm2d(width), relu=nn.ReLU())),
        **{f"block{i + 1}": BasicBlock(width, stride) for i, stride in enumerate(strides)},
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(width, 10),
    ))


def _linear(n_in: int, n_out: int, p: int | None, bias: bool = False) -> nn.Module:
    return nn.Linear(n_in, n_out, bias=bias) if p is None else TBNLinear(n_in, n_out, bias=bias, compression_factor=p)


def _conv(c_in: int, c_out: int, p: int | None) -> nn.Module:
    if p is None:
        return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    return TBNConv2d(c_in, c_out, 3, padding=1, bias=False, compression_factor=p)


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int,
          lr: float = 1e-3, batch_size: int = 128, cosine: bool = False, warmup: float = 0.0) -> nn.Module:
    """Adam with cross-entropy over shuffled mini-batches (latent TBN layers train as QAT).

    ``cosine`` anneals the learning rate to zero over the run (per step) instead of keeping it.
    ``warmup``: the fraction of the steps over which the latent TBN layers blend from their dense
    weight to ``W_hat`` (hf_tbn.warmup, what a Trainer does by default); 0: plain TBN from the start.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-images.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], batch_size):
            if warmup:
                set_blend(model, blend_at(step, steps, warmup))
            step += 1
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    if warmup:
        set_blend(model, 1.0)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` in eval mode, batched."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])
