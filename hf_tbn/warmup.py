"""The dense-to-tiled warm-up of quantization-aware training: from the dense latent weight to ``W_hat``.

Right after conversion a TBN model has lost what its pretrained weights computed (a tile with
p > 1 is the sign of a sum over p unrelated blocks of rows): with p = 8 or 16 a fine-tune then
spends its budget relearning from near chance, and a new task head learns on broken features.
The warm-up starts from the dense latent weight ``W`` (the pretrained model) and blends
towards the tiled weight,

    W_used = blend * W_hat + (1 - blend) * W,   blend = 0 -> 1 over the first ``fraction`` of training,

so that the model is exactly TBN (``blend = 1``) for the rest of training and at the end. Why
and what it measured: docs/quality.md ("Stable training at large p").

Every transformers ``Trainer`` runs it once hf_tbn is imported: :func:`register_with_trainer`
adds :class:`QuantizationWarmup` to transformers' default callbacks, and it takes its fraction
from the model's ``TBNConfig(warmup=...)`` (``"auto"``: :data:`DEFAULT_WARMUP`, except for models
that generate, ``can_generate()``: language models, whose head is already trained, get none). It
does nothing for a model without latent TBN layers. ``hf_tbn.qat.TBNTrainer(warmup=...)``
overrides the fraction. This module imports no ``transformers.trainer`` (about a second): it
registers once something else has.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainingArguments
from transformers.trainer_callback import TrainerCallback, TrainerControl, TrainerState

from .config import QUANT_METHOD, TBNConfig
from .convert import tbn_layers
from .import_hooks import after_import

# "auto" warms up every model but generative ones: on BBC (a new classification head) it lifted p = 4
# from 1.2 points below fp to above it and stopped p = 8 collapsing; on SmolLM2 (a pretrained LM head)
# it made QAT far worse (docs/quality.md).
DEFAULT_WARMUP = 0.3


def set_blend(model: nn.Module, blend: float) -> None:
    """Every latent TBN layer of ``model`` computes with ``blend * W_hat + (1 - blend) * W`` (1: plain TBN)."""
    if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not 0 <= blend <= 1:
        raise ValueError(f"blend must be a number in [0, 1], got {blend!r}")
    for _, layer in tbn_layers(model):
        if layer.form == "latent":
            layer.blend = float(blend)


def model_warmup(model: nn.Module) -> float:
    """The warm-up fraction ``model`` asks for: its TBNConfig's ``warmup`` (``"auto"`` resolved), 0 without
    latent TBN layers. A model converted without a config (``convert_model``) counts as ``"auto"``."""
    latent = [layer for _, layer in tbn_layers(model) if layer.form == "latent"]
    if not latent:
        return 0.0
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD:
        config = TBNConfig.from_dict(config)
    warmup = config.warmup if isinstance(config, TBNConfig) else "auto"
    if warmup == "auto":
        generates = getattr(model, "can_generate", None)
        return 0.0 if callable(generates) and generates() else DEFAULT_WARMUP
    return float(warmup)


def blend_at(step: int, max_steps: int, fraction: float) -> float:
    """The blend at the start of optimizer step ``step`` of ``max_steps``: 0 -> 1 over the first ``fraction``."""
    if not fraction or max_steps <= 0:
        return 1.0
    return min(1.0, step / (fraction * max_steps))


def check_fraction(fraction: object) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"QuantizationWarmup fraction must be a number in [0, 1], got {fraction!r}")


class QuantizationWarmup(TrainerCallback):
    """Trainer callback: the blend rises linearly from 0 to 1 over the first ``fraction`` of the training steps.

    ``fraction`` None (the default callback every Trainer gets): the model's own (:func:`model_warmup`).
    Set from the global step at each step, so a resumed run continues the same schedule.
    """

    def __init__(self, fraction: float | None = None) -> None:
        if fraction is not None:
            check_fraction(fraction)
        self.fraction = fraction
        self._active = 0.0  # the fraction of the current training run

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self._active = 0.0 if model is None else self.fraction if self.fraction is not None else model_warmup(model)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and self._active:
            set_blend(model, blend_at(state.global_step, state.max_steps, self._active))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and self._active:
            set_blend(model, 1.0)


def register_with_trainer() -> None:
    """Add :class:`QuantizationWarmup` (fraction from the model) to the callbacks every ``Trainer`` starts with."""
    from transformers import trainer

    if QuantizationWarmup not in trainer.DEFAULT_CALLBACKS:
        trainer.DEFAULT_CALLBACKS.append(QuantizationWarmup)


after_import("transformers.trainer", register_with_trainer)
