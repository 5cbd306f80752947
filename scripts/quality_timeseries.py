"""Time-series forecasting with a transformer (transformers' PatchTST) on Mauna Loa CO2, fp vs TBN.

Weekly CO2 (statsmodels, 1958-2001, gaps interpolated), standardised with training statistics;
104 weeks of context predict the next 26. Chronological split: first 80% of the windows'
targets train, the last 20% test. PatchTST trains from scratch; TBN variants are converted
with ``hf_tbn.quantize_model`` before training (every encoder Linear tiled; the forecasting
head, last module, stays full precision). Metrics: MSE and MAE on the standardised series.

    .venv/bin/python scripts/quality_timeseries.py                        # full budget, writes docs/
    .venv/bin/python scripts/quality_timeseries.py --quick --out /tmp/q   # CI smoke run
"""

from __future__ import annotations

import time

import statsmodels.api as sm
import torch
from results import Task, measure, publish, quality_parser
from transformers import PatchTSTConfig, PatchTSTForPrediction

from hf_tbn import TBNConfig, pack_model, quantize_model

FACTORS = [None, 1, 2, 4, 8, 16]
CONTEXT, HORIZON = 104, 26


def co2_windows() -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Sliding (context, horizon) windows of the standardised weekly series, split in time."""
    series = sm.datasets.co2.load_pandas().data["co2"].interpolate().to_numpy()
    x = torch.tensor(series, dtype=torch.float32)
    n_windows = len(x) - CONTEXT - HORIZON + 1
    split = int(0.8 * n_windows)
    train_end = split + CONTEXT + HORIZON - 1  # last value any training window sees
    mean, std = x[:train_end].mean(), x[:train_end].std()
    z = (x - mean) / std
    starts = torch.arange(n_windows)
    past = torch.stack([z[s : s + CONTEXT] for s in starts]).unsqueeze(-1)
    future = torch.stack([z[s + CONTEXT : s + CONTEXT + HORIZON] for s in starts]).unsqueeze(-1)
    # test windows start after the training targets end, so no test target was seen in training
    test_from = split + HORIZON
    data = {"past_train": past[:split], "future_train": future[:split],
            "past_test": past[test_from:], "future_test": future[test_from:]}
    return data, {"mean": float(mean), "std": float(std)}


def model_config() -> PatchTSTConfig:
    return PatchTSTConfig(num_input_channels=1, context_length=CONTEXT, prediction_length=HORIZON, patch_length=8,
                          patch_stride=8, d_model=128, num_attention_heads=4, num_hidden_layers=3, ffn_dim=512,
                          dropout=0.1, head_dropout=0.1, scaling="std")


def train(model: PatchTSTForPrediction, data: dict[str, torch.Tensor], epochs: int, seed: int, lr: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = data["past_train"].shape[0]
    steps = epochs * ((n + 63) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, 64):
            idx = order[start : start + 64]
            loss = model(past_values=data["past_train"][idx], future_values=data["future_train"][idx]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()


@torch.no_grad()
def evaluate(model: PatchTSTForPrediction, data: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    pred = model(past_values=data["past_test"]).prediction_outputs
    err = pred - data["future_test"]
    return {"MSE": float(err.square().mean()), "MAE": float(err.abs().mean())}


def main() -> None:
    parser = quality_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    data, stats = co2_windows()
    epochs = 1 if args.quick else args.epochs
    if args.quick:
        data = {k: v[:128] for k, v in data.items()}
    budget = {"epochs": epochs, "batch_size": 64, "optimizer": "AdamW + one-cycle", "lr": args.lr, "seed": args.seed,
              "context": CONTEXT, "horizon": HORIZON, "train_windows": int(data["past_train"].shape[0]),
              "test_windows": int(data["past_test"].shape[0]), "min_compress_size": 0}
    rows = []
    for p in [None, 4] if args.quick else FACTORS:
        torch.manual_seed(args.seed)  # the same initialisation for every variant
        model = PatchTSTForPrediction(model_config())
        if p is not None:
            quantize_model(model, TBNConfig(compression_factor=p, min_compress_size=0))
        start = time.time()
        train(model, data, epochs, args.seed, args.lr)
        seconds = time.time() - start
        if p is not None:
            pack_model(model)
        metrics = evaluate(model, data)
        rows.append(measure(p, model, metrics, seconds))
        print(f"co2 {rows[-1].variant}: MSE {metrics['MSE']:.4f} MAE {metrics['MAE']:.4f} "
              f"bits/weight {rows[-1].bits_converted:.3f} {seconds:.0f}s", flush=True)
    notes = (f"Series standardised with training mean {stats['mean']:.2f} ppm and std {stats['std']:.2f} ppm: "
             f"an MSE of 0.01 is an RMS error of {0.1 * stats['std']:.2f} ppm.")
    publish(Task("timeseries", "Mauna Loa CO2 forecasting (26 weeks), PatchTST from scratch", "MSE", False, budget,
                 rows, notes), args.out)


if __name__ == "__main__":
    main()
