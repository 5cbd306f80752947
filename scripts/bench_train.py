"""Training-step cost of latent TBN layers against the same model with plain torch layers.

Each row times one optimizer step (forward, backward, AdamW) of a small stack, dense and
converted to latent TBN, interleaved in the same run so machine noise hits both alike, and
prints the medians and their ratio. Target (issue 2): ratio <= 1.5.

    .venv/bin/python scripts/bench_train.py            # full shapes
    .venv/bin/python scripts/bench_train.py --quick    # tiny shapes (CI)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from hf_tbn import TBNConfig, convert_model


def mlp_block(d: int, hidden: int) -> nn.Module:
    """A transformer feed-forward block (MiniLM: 384 -> 1536 -> 384)."""
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


def conv_block(c: int) -> nn.Module:
    """Two ResNet-style 3x3 convolutions."""
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))


def step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def compare(dense: nn.Module, x: torch.Tensor, p: int, repeats: int) -> tuple[float, float]:
    """Median seconds per step of the dense model and its latent TBN twin, interleaved."""
    tbn = convert_model(copy.deepcopy(dense), TBNConfig(compression_factor=p, min_compress_size=0))
    steps = {"dense": step_fn(dense, x), "tbn": step_fn(tbn, x)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(2):  # warm-up
        for step in steps.values():
            step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["dense"]), statistics.median(times["tbn"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (CI)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        cases = [("ffn 32x64, 64 tokens", mlp_block(32, 64), torch.randn(64, 32)),
                 ("conv 8ch 8x8, batch 2", conv_block(8), torch.randn(2, 8, 8, 8))]
        repeats = args.repeats or 3
    else:
        cases = [("ffn 384x1536 (MiniLM), 8x128 tokens", mlp_block(384, 1536), torch.randn(8, 128, 384)),
                 ("conv 64ch 3x3, 32x32, batch 32", conv_block(64), torch.randn(32, 64, 32, 32))]
        repeats = args.repeats or 15
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats} (median), AdamW step")
    print(f"{'case':40s} {'p':>3s} {'dense ms':>9s} {'tbn ms':>9s} {'ratio':>6s}")
    for name, dense, x in cases:
        for p in (1, 4, 8):
            d, t = compare(dense, x, p, repeats)
            print(f"{name:40s} {p:3d} {d * 1e3:9.2f} {t * 1e3:9.2f} {t / d:6.2f}")


if __name__ == "__main__":
    main()
