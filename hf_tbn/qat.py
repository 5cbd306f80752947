"""Quantization-aware training of TBN models with transformers' ``Trainer``.

Any ``Trainer`` already trains a latent TBN model with the dense-to-tiled warm-up the model's
``TBNConfig(warmup=...)`` asks for (:mod:`hf_tbn.warmup`, docs/quality.md); :class:`TBNTrainer`
sets the fraction per run instead. The warm-up names are re-exported here.
:func:`end_process_group` ends a data-parallel run (docs/peft-and-distributed.md).
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from transformers import Trainer

from .warmup import DEFAULT_WARMUP, QuantizationWarmup, check_fraction, model_warmup, set_blend

__all__ = ["DEFAULT_WARMUP", "QuantizationWarmup", "TBNTrainer", "end_process_group", "model_warmup", "set_blend"]


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


def end_process_group() -> None:
    """End a data-parallel run (``accelerate launch``, ``torchrun``): wait for every process, free the finished
    Trainers' DDP wrappers, then destroy the process group. Nothing to do in a single process.

    Call it once no Trainer of the run is referenced any more (``del trainer``). A rank freeing a DDP wrapper
    after its group was destroyed hung at exit (4 launches in 23 on a busy machine); a rank exiting with the
    group alive once aborted ("terminate called without an active exception"). docs/peft-and-distributed.md.
    """
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()  # no process still in a collective (an evaluation's gather) when groups go
    gc.collect()  # in case reference cycles still hold a wrapper
    torch.distributed.destroy_process_group()
