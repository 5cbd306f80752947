"""PEFT glue: LoRA adapters on TBN layers (QLoRA-style on packed tiles, or beside latent weights).

``import hf_tbn`` calls :func:`register_with_peft`, after which every ``LoraConfig`` (also one
read back by ``PeftModel.from_pretrained``) maps TBN linear layers to :class:`TBNLoraLinear`
through peft's custom-module dispatch, so users write plain ``get_peft_model(model, config)``.

Merging is refused: a LoRA delta is dense and cannot be absorbed by a binary tile without
changing the model, so ``merge_and_unload`` / ``merge_adapter`` raise a ``ValueError`` naming the
TBN layers before anything is merged. ``model.dequantize()`` first gives a dense model that
merges as usual.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .layers import TBNLinear, _TBNConvNd


class TBNLoraLinear(LoraLinear):
    """LoRA on a :class:`TBNLinear` in either form: ``tbn(x) + B(A(dropout(x))) * scaling``.

    The TBN layer stays the frozen base layer (packed: tile bits and alphas are buffers and
    never change; latent: the weight trains only if the user unfreezes it).
    """

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(
                f"{self.get_base_layer().layer_name}: {type(variant).__name__} needs a dense base weight; "
                "TBN layers support plain LoRA"
            )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(_merge_refusal([self.get_base_layer().layer_name]))

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        state = base_layer.weight if base_layer.form == "latent" else base_layer.alpha
        return state.device, state.dtype


def _refuse_conv(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module:
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    raise ValueError(f"{kwargs.get('target_name', base.layer_name)}: LoRA on {type(base).__name__} is not supported; "
                     "target TBN linear layers")


def _merge_refusal(names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"cannot merge LoRA adapters into TBN layers ({shown}): a dense delta does not fit a binary tile. "
        "Keep the adapters unmerged, or call model.dequantize() on the base model first to merge into dense weights."
    )


def _check_merge_allowed(self: LoraModel, original: Any) -> None:
    original(self)
    names = [m.get_base_layer().layer_name for m in self.model.modules() if isinstance(m, TBNLoraLinear)]
    if names:
        raise ValueError(_merge_refusal(names))


def _post_init(self: LoraConfig, original: Any) -> None:
    original(self)
    self._register_custom_module({TBNLinear: TBNLoraLinear, _TBNConvNd: _refuse_conv})


def register_with_peft() -> None:
    """Make peft's LoRA use TBN layers' adapters and refuse merges into tiles; idempotent."""
    if getattr(LoraConfig, "_hf_tbn_registered", False):
        return
    LoraConfig.__post_init__ = functools.partialmethod(_post_init, LoraConfig.__post_init__)
    LoraModel._check_merge_allowed = functools.partialmethod(_check_merge_allowed, LoraModel._check_merge_allowed)
    LoraConfig._hf_tbn_registered = True

