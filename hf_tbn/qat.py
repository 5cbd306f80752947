"""Stable quantization-aware training of TBN models: a warm-up from the dense latent weight to ``W_hat``.

Right after conversion a TBN model has lost what its pretrained weights computed (a tile with
p > 1 is the sign of a sum over p unrelated blocks of rows): with p = 8 or 16 a fine-tune then
spends its budget relearning from near chance, and a new task head learns on broken features.
The warm-up starts from the dense latent weight ``W`` (the pretrained model) and blends
towards the tiled weight,

    W_used = blend * W_hat + (1 - blend) * W,   blend = 0 -> 1 over the first ``fraction`` of training,

so that the model is exactly TBN (``blend = 1``) for the rest of training and at the end. Why
and what it measured: docs/quality.md ("Stable training at large p").

The blend is applied by a forward hook on each latent TBN layer, which adds ``(1 - blend) *``
the dense layer output to ``blend *`` the tiled one (the same as the weight blend above, since
the layers are linear in the weight); at ``blend = 1`` the hook returns the output unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .convert import tbn_layers
from .layers import TBNLayer

DEFAULT_WARMUP = 0.3


def set_blend(model: nn.Module, blend: float) -> None:
    """Every latent TBN layer of ``model`` computes with ``blend * W_hat + (1 - blend) * W`` (1: plain TBN)."""
    if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not 0 <= blend <= 1:
        raise ValueError(f"blend must be a number in [0, 1], got {blend!r}")
    for _, layer in tbn_layers(model):
        if layer.form != "latent":
            continue
        layer.blend = float(blend)
        if "_blend_hook" not in layer.__dict__:
            layer._blend_hook = layer.register_forward_hook(_blended_output)


def _blended_output(layer: TBNLayer, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    blend = layer.blend
    if blend >= 1 or layer.form != "latent":
        return output
    dense = layer._apply_weight(args[0], layer.weight.reshape(layer.weight_shape), layer.bias)
    return output * blend + dense * (1 - blend) if blend else dense


class QuantizationWarmup(TrainerCallback):
    """Trainer callback: the blend rises linearly from 0 to 1 over the first ``fraction`` of the training steps.

    Set from the global step at each step, so a resumed run continues the same schedule.
    """

    def __init__(self, fraction: float = DEFAULT_WARMUP) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"QuantizationWarmup fraction must be a number in [0, 1], got {fraction!r}")
        self.fraction = fraction

    def blend_at(self, step: int, max_steps: int) -> float:
        """The blend at the start of optimizer step ``step`` of ``max_steps``."""
        if self.fraction == 0 or max_steps <= 0:
            return 1.0
        return min(1.0, step / (self.fraction * max_steps))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None:
            set_blend(model, self.blend_at(state.global_step, state.max_steps))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None:
            set_blend(model, 1.0)


class TBNTrainer(Trainer):
    """``Trainer`` with the TBN training defaults: :class:`QuantizationWarmup` (``warmup`` = its fraction, 0: off)."""

    def __init__(self, *args: Any, warmup: float = DEFAULT_WARMUP, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if warmup:
            self.add_callback(QuantizationWarmup(warmup))
