"""Quantization-aware training of TBN models with transformers' ``Trainer``.

Any ``Trainer`` already trains a latent TBN model with the dense-to-tiled warm-up the model's
``TBNConfig(warmup=...)`` asks for (:mod:`hf_tbn.warmup`, docs/quality.md); :class:`TBNTrainer`
sets the fraction per run instead. The warm-up names are re-exported here.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from .warmup import DEFAULT_WARMUP, QuantizationWarmup, check_fraction, model_warmup, set_blend

__all__ = ["DEFAULT_WARMUP", "QuantizationWarmup", "TBNTrainer", "model_warmup", "set_blend"]


class TBNTrainer(Trainer):
    """``Trainer`` whose warm-up fraction is ``warmup`` (0: off) instead of the model's ``TBNConfig.warmup``."""

    def __init__(self, *args: Any, warmup: float | None = None, **kwargs: Any) -> None:
        if warmup is not None:
            check_fraction(warmup)
        super().__init__(*args, **kwargs)
        if warmup is not None:
            while self.callback_handler.pop_callback(QuantizationWarmup) is not None:
                pass
            self.add_callback(QuantizationWarmup(warmup))
