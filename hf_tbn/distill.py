"""Distillation from a full-precision teacher during TBN quantization-aware training (docs/distillation.md).

The student is a latent TBN model; the teacher is the same architecture in full precision,
by default the checkpoint the student was converted from (:func:`load_teacher`). The loss is

    task_weight * task loss  +  w_kl(t) * T^2 * KL(teacher_T || student_T)  +  hidden_weight * hidden term

where ``*_T`` are the softmax of the logits divided by the temperature ``T`` and ``w_kl(t)``
follows :meth:`DistillConfig.kl_weight_at` (zero, then a linear ramp to ``kl_weight``). The
hidden term is the mean over the selected hidden states of ``|h_s - h_t|^2 / |h_t|^2``. With
``skip_teacher_mistakes`` (classification) the KL leaves out the examples whose label is not the
teacher's top class.

One line with Trainer::

    trainer = DistillationTrainer(model=student, args=args, train_dataset=data)  # teacher: the fp checkpoint
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .qat import TBNTrainer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DistillConfig:
    """Weights, temperature and schedule of the distillation loss.

    Args:
        kl_weight: final weight of the KL term on the logits.
        temperature: ``T``; the KL term is scaled by ``T^2`` so its gradients keep their size.
        task_weight: weight of the task loss (the model's own loss from ``labels``); 0 for pure distillation.
        kl_start: fraction of training with the task loss only (the KL weight is 0).
        kl_ramp: fraction of training, after ``kl_start``, over which the KL weight rises linearly to
            ``kl_weight``.
        hidden_weight: weight of the hidden-state term (0: off, the teacher's hidden states are not asked for).
        hidden_layers: indices into ``outputs.hidden_states`` (0 is the embedding output) the hidden term
            compares; ``None``: every one after the embeddings.
        skip_teacher_mistakes: classification (one class label per logit row): count the KL only where the
            label is the teacher's top class, so that the teacher's own mistakes on the training data never
            pull the student away from the label.
    """

    kl_weight: float = 1.0
    temperature: float = 1.0
    task_weight: float = 1.0
    kl_start: float = 0.0
    kl_ramp: float = 0.0
    hidden_weight: float = 0.0
    hidden_layers: tuple[int, ...] | None = None
    skip_teacher_mistakes: bool = False

    def __post_init__(self) -> None:
        for name in ("kl_weight", "task_weight", "hidden_weight", "kl_start", "kl_ramp"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"DistillConfig.{name} must be a non-negative number, got {value!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature must be positive, got {self.temperature!r}")
        if self.kl_start + self.kl_ramp > 1:
            raise ValueError(f"DistillConfig.kl_start + kl_ramp must be at most 1, got {self.kl_start + self.kl_ramp}")
        if not isinstance(self.skip_teacher_mistakes, bool):
            raise ValueError(f"DistillConfig.skip_teacher_mistakes must be True or False, "
                             f"got {self.skip_teacher_mistakes!r}")
        if self.task_weight == 0 and self.kl_weight == 0 and self.hidden_weight == 0:
            raise ValueError("DistillConfig: task_weight, kl_weight and hidden_weight are all 0: nothing to train")

    def kl_weight_at(self, progress: float) -> float:
        """The KL weight at ``progress`` (fraction of training done, 0..1)."""
        if progress < self.kl_start:
            return 0.0
        if self.kl_ramp == 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, (progress - self.kl_start) / self.kl_ramp)


# The DistillConfig fields a command line sets (hidden_layers stays a Python option).
OPTION_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DistillConfig) if f.type in ("float", "bool"))


def load_teacher(student: PreTrainedModel, source: str | Path | PreTrainedModel | None = None) -> PreTrainedModel:
    """The full-precision teacher of ``student``: frozen, in eval mode, on the student's device and dtype.

    ``source``: a model, or a folder / Hub id loaded with the student's class; ``None`` loads the
    folder the student was loaded from (``student.name_or_path``) without quantization, i.e. the
    checkpoint before conversion. A folder that is itself a TBN checkpoint, or one that leaves
    weights of the teacher uninitialised (a new task head), is refused: such a teacher would
    teach noise; fine-tune a full-precision model first and pass it.
    """
    if isinstance(source, nn.Module):
        teacher = source
    else:
        source = source if source is not None else student.name_or_path
        if not source:
            raise ValueError("load_teacher: the student has no name_or_path; pass the teacher model or its folder")
        if getattr(type(student.config).from_pretrained(source), "quantization_config", None) is not None:
            raise ValueError(f"load_teacher: {source} is a quantized checkpoint; the teacher must be full precision")
        config = copy.deepcopy(student.config)  # the student's labels and options, without quantization
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        teacher, info = type(student).from_pretrained(source, config=config, output_loading_info=True)
        untrained = sorted(info["missing_keys"])
        if untrained:
            raise ValueError(
                f"load_teacher: {source} does not hold the teacher's weights {untrained[:4]}"
                f"{' ...' if len(untrained) > 4 else ''} (a new head?): fine-tune a full-precision model "
                "on the task first and pass it as the teacher"
            )
    return freeze(teacher, like=student)


def freeze(teacher: nn.Module, like: nn.Module) -> nn.Module:
    """``teacher`` without gradients, in eval mode, on the device and float dtype of ``like``'s parameters."""
    reference = next((p for p in like.parameters() if p.is_floating_point()), None)
    if reference is not None:
        teacher.to(device=reference.device, dtype=reference.dtype)
    teacher.requires_grad_(False)
    return teacher.eval()


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over positions (``mask`` True: counted).

    Logits are ``(..., classes)``; ``mask`` has the leading shape.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return temperature**2 * masked_mean(per_position, mask)


def hidden_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                layers: tuple[int, ...] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over ``layers`` of ``|h_s - h_t|^2 / |h_t|^2`` per position (relative, so every layer weighs alike)."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}")
    chosen = layers if layers is not None else tuple(range(1, len(student_hidden)))
    bad = [i for i in chosen if not -len(student_hidden) <= i < len(student_hidden)]
    if bad or not chosen:
        raise ValueError(f"hidden_layers {chosen}: indices must lie in [0, {len(student_hidden)})")
    terms = []
    for i in chosen:
        s, t = student_hidden[i].float(), teacher_hidden[i].float()
        error = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)
        terms.append(masked_mean(error, mask))
    return torch.stack(terms).mean()


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or mask.shape != values.shape:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def teacher_right(labels: Any, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``mask`` (None: every row) narrowed to the rows of ``teacher_logits`` ``(..., classes)`` whose top class is
    the label; ``labels`` must hold one class index per row."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != teacher_logits.shape[:-1]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"DistillConfig.skip_teacher_mistakes needs one class label per logit row: labels {shape} "
                         f"against logits {tuple(teacher_logits.shape)}")
    right = teacher_logits.argmax(-1) == labels
    return right if mask is None else mask & right


def position_mask(inputs: dict[str, Any], leading_shape: torch.Size) -> torch.Tensor | None:
    """Positions that count: labels not ``-100`` for token-level labels, else the attention mask, else all."""
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == leading_shape:
        return labels != IGNORE_INDEX
    attention = inputs.get("attention_mask")
    if isinstance(attention, torch.Tensor) and attention.shape == leading_shape:
        return attention.bool()
    return None


class DistillationTrainer(TBNTrainer):
    """``Trainer`` whose loss adds distillation from a full-precision teacher (see the module docstring).

    Args:
        teacher: the teacher model, its folder or Hub id; ``None``: the checkpoint the student was loaded from
            (:func:`load_teacher`). Loaded once, frozen, in eval mode, on the student's device and dtype.
        distill: weights, temperature and schedule; the default is :class:`DistillConfig`'s.
        *args, **kwargs: as for :class:`hf_tbn.qat.TBNTrainer`: ``warmup`` None (the default) takes the model's
            ``TBNConfig.warmup`` ("auto": none for language models, where it made distilled QAT worse, 0.3 for
            the rest; docs/distillation.md).

    Works under ``accelerate launch`` (DDP): each process runs its own teacher copy on its own batch.
    """

    # The loss is a mean over this micro-batch; Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, teacher: str | Path | PreTrainedModel | None = None,
                 distill: DistillConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distill = distill if distill is not None else DistillConfig()
        self.model_accepts_loss_kwargs = False  # the task loss stays a per-batch mean, like the other terms
        if self.distill.skip_teacher_mistakes and self.model.can_generate():
            raise ValueError(f"DistillConfig.skip_teacher_mistakes: {type(self.model).__name__} generates text, and "
                             "its labels are shifted inside the model, so they cannot be compared with the teacher's "
                             "top classes; it is meant for classification")
        self.teacher = load_teacher(self.model, teacher)
        self.distill_log: dict[str, float] = {}

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not model.training:  # evaluation scores the task alone (eval_loss, perplexity)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        cfg = self.distill
        if cfg.hidden_weight:
            inputs = {**inputs, "output_hidden_states": True}
        task, outputs = super().compute_loss(model, inputs, return_outputs=True)
        progress = self.state.global_step / self.state.max_steps if self.state.max_steps else 1.0
        kl_weight = cfg.kl_weight_at(progress)
        if kl_weight or cfg.hidden_weight:  # the teacher runs only while one of its terms counts
            with torch.no_grad():
                teacher_out = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"})
        student_logits = outputs["logits"]
        loss = cfg.task_weight * task
        terms = {"task_loss": task}
        if kl_weight:
            mask = position_mask(inputs, student_logits.shape[:-1])
            if cfg.skip_teacher_mistakes:
                mask = teacher_right(inputs.get("labels"), teacher_out["logits"], mask)
            terms["kl_loss"] = kl_loss(student_logits, teacher_out["logits"], cfg.temperature, mask)
            loss = loss + kl_weight * terms["kl_loss"]
        if cfg.hidden_weight:
            hidden = outputs["hidden_states"]
            mask = position_mask(inputs, hidden[0].shape[:-1])
            terms["hidden_loss"] = hidden_loss(hidden, teacher_out["hidden_states"], cfg.hidden_layers, mask)
            loss = loss + cfg.hidden_weight * terms["hidden_loss"]
        self.distill_log = {k: float(v.detach()) for k, v in terms.items()} | {"kl_weight": kl_weight}
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's log with the last training step's loss terms and KL weight added."""
        if "loss" in logs:
            logs = {**logs, **self.distill_log}
        super().log(logs, *args, **kwargs)
