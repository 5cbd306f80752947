"""peft's LoRA on TBN layers, as one backend file (like peft's ``tuners/lora/hqq.py``).

:class:`TBNLoraLinear` is LoRA on a :class:`TBNLinear` in either form (QLoRA-style on packed
tiles, or beside latent weights) and :func:`dispatch_tbn` is its dispatcher, returning None for
any other layer. peft has no public registry of dispatchers, so :func:`register_with_peft` (run
when this module loads, which ``import hf_tbn`` makes happen as soon as peft is imported) wraps
three ``LoraModel`` methods (the dispatch, the merge check, the device placement of new adapters);
each wrapper calls peft's own method unchanged unless TBN layers are involved. The trade-off
against the alternatives is written in docs/peft-and-distributed.md.

Merging is refused: a LoRA delta is dense and cannot be absorbed by a binary tile without
changing the model, so ``merge_and_unload`` / ``merge_adapter`` raise a ``ValueError`` naming the
TBN layers before anything is merged. ``model.dequantize()`` first gives a dense model that
merges as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layers import TBNLayer, TBNLinear


class TBNLoraLinear(LoraLinear):
    """LoRA on a :class:`TBNLinear`: ``tbn(x) + B(A(dropout(x))) * scaling``.

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
        return base_layer.device, base_layer.dtype


def dispatch_tbn(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module | None:
    """The LoRA layer for a TBN ``target``; None when it is not a TBN layer (peft's other dispatchers decide)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, TBNLinear):
        return TBNLoraLinear(target, adapter_name, config=config, **kwargs)
    if isinstance(base, TBNLayer):
        raise ValueError(f"{kwargs.get('target_name', base.layer_name)}: LoRA on {type(base).__name__} is not "
                         "supported; target TBN linear layers")
    return None


def _merge_refusal(names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"cannot merge LoRA adapters into TBN layers ({shown}): a dense delta does not fit a binary tile. "
        "Keep the adapters unmerged, or call model.dequantize() on the base model first to merge into dense weights."
    )


def register_with_peft() -> None:
    """Let ``get_peft_model`` / ``PeftModel.from_pretrained`` use :func:`dispatch_tbn` and refuse merges; idempotent."""
    if getattr(LoraModel, "_hf_tbn_registered", False):
        return
    create, check_merge = LoraModel._create_new_module, LoraModel._check_merge_allowed
    replace = LoraModel._replace_module

    def _create_new_module(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        module = dispatch_tbn(target, adapter_name, lora_config, **kwargs)
        return module if module is not None else create(lora_config, adapter_name, target, **kwargs)

    def _check_merge_allowed(self: LoraModel) -> None:
        check_merge(self)
        names = [m.get_base_layer().layer_name for m in self.model.modules() if isinstance(m, TBNLoraLinear)]
        if names:
            raise ValueError(_merge_refusal(names))

    def _replace_module(self: LoraModel, parent: nn.Module, name: str, new_module: nn.Module, child: nn.Module) -> None:
        base = child.base_layer if hasattr(child, "base_layer") else child
        if not isinstance(base, TBNLayer):
            return replace(self, parent, name, new_module, child)
        # peft finds the device from the child's weight, which a packed layer does not have
        setattr(parent, name, new_module)
        for path, module in new_module.named_modules():
            if self.prefix in path and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(base.device)
        return None

    LoraModel._create_new_module = staticmethod(_create_new_module)
    LoraModel._check_merge_allowed = _check_merge_allowed
    LoraModel._replace_module = _replace_module
    LoraModel._hf_tbn_registered = True


register_with_peft()
