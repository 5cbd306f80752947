"""Swap the eligible layers of any torch module for TBN layers, and move models between forms."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import tiling
from .config import TBNConfig
from .layers import FORMS, TBNConv1d, TBNConv2d, TBNLayer, TBNLinear, check_factor, check_weight

CONVERTIBLE = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d)


def name_matches(name: str, pattern: str) -> bool:
    """Module-name matching used by every pattern option of :class:`TBNConfig`.

    ``pattern`` matches ``name`` when equal, when ``name`` ends with ``"." + pattern``, or
    when the regular expression ``pattern`` fully matches ``name``.
    """
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def logical_weight(module: nn.Module) -> torch.Tensor:
    """A convertible module's weight in the logical ``(out, in, ...)`` orientation."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _groups(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def plan_conversion(module: nn.Module, config: TBNConfig) -> dict[str, int]:
    """Names of the layers to convert and each one's own factor p'.

    With ``config.layer_factors`` set (a saved, resolved plan) that plan is used exactly;
    otherwise the rule of :func:`hf_tbn.tiling.resolve_factor` with the config's overrides.
    """
    candidates = {name: m for name, m in module.named_modules() if name and isinstance(m, CONVERTIBLE)}
    if config.layer_factors is not None:
        for name, p in config.layer_factors.items():
            if name not in candidates:
                raise ValueError(f"layer_factors names {name!r}: not a Linear/Conv1D/Conv1d/Conv2d of this model")
            check_factor(p, logical_weight(candidates[name]).shape[0], name, _groups(candidates[name]))
        return dict(config.layer_factors)

    unused = set(config.layer_compression_factors)
    plan: dict[str, int] = {}
    for name, m in candidates.items():
        if any(name_matches(name, pat) for pat in config.modules_to_not_convert or ()):
            continue
        overrides = {pat: p for pat, p in config.layer_compression_factors.items() if name_matches(name, pat)}
        unused -= set(overrides)
        out, numel = logical_weight(m).shape[0], m.weight.numel()
        if len(set(overrides.values())) > 1:
            raise ValueError(f"{name}: layer_compression_factors patterns {sorted(overrides)} give different factors")
        if overrides:
            plan[name] = check_factor(next(iter(overrides.values())), out, name, _groups(m))
        else:
            p = tiling.resolve_factor(out, numel, config.compression_factor, config.min_compress_size, _groups(m))
            plan[name] = p
    if unused:
        raise ValueError(f"layer_compression_factors patterns {sorted(unused)} match no convertible layer")
    return plan


def tbn_from_dense(module: nn.Module, p: int, alpha_mode: tiling.AlphaMode, name: str) -> TBNLayer:
    """A latent TBN layer initialised from a dense Linear / Conv1D / Conv1d / Conv2d."""
    weight = logical_weight(module)
    check_weight(weight, name)
    kwargs = {
        "bias": module.bias is not None, "compression_factor": p, "alpha_mode": alpha_mode,
        "device": weight.device, "dtype": weight.dtype, "name": name,
    }
    if isinstance(module, (nn.Linear, Conv1D)):
        layer: TBNLayer = TBNLinear(weight.shape[1], weight.shape[0], **kwargs)
    else:
        if module.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode {module.padding_mode!r} is not supported, only 'zeros'")
        cls = TBNConv1d if isinstance(module, nn.Conv1d) else TBNConv2d
        layer = cls(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, **kwargs,
        )
    if weight.device.type != "meta":
        with torch.no_grad():
            layer.weight.copy_(weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
    layer.weight.requires_grad_(module.weight.requires_grad)
    return layer


def convert_model(module: nn.Module, config: TBNConfig | None = None) -> nn.Module:
    """Swap every eligible layer of ``module`` for a latent TBN layer, in place.

    Works on any torch module. The resolved per-layer factors are written to
    ``config.layer_factors`` (and are what :func:`tbn_layers` reports afterwards).
    Layers whose weight is shared with another module (tied weights) are refused: converting
    one would silently untie them; list them in ``modules_to_not_convert``.
    """
    config = config if config is not None else TBNConfig()
    plan = plan_conversion(module, config)
    shared = _shared_weights(module)
    for name in plan:
        if id(module.get_submodule(name).weight) in shared:
            raise ValueError(f"{name}: weight is shared with another module (tied); add it to modules_to_not_convert")
    for name, p in plan.items():
        layer = tbn_from_dense(module.get_submodule(name), p, config.alpha_mode, name)
        layer.backend = config.backend
        module.set_submodule(name, layer)
    config.layer_factors = plan
    return module


def _shared_weights(module: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    return {pid for pid, n in counts.items() if n > 1}


def tbn_layers(model: nn.Module) -> Iterator[tuple[str, TBNLayer]]:
    """``(name, layer)`` for every TBN layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, TBNLayer):
            yield name, m


def pack_model(model: nn.Module) -> nn.Module:
    """Latent -> packed for every TBN layer of ``model``, in place (exact)."""
    return set_form(model, "packed")


def to_latent_model(model: nn.Module) -> nn.Module:
    """Packed -> latent for every TBN layer, in place (``W = W_hat``), for further fine-tuning."""
    return set_form(model, "latent")


def set_form(model: nn.Module, form: str) -> nn.Module:
    """Bring every TBN layer to ``form``; a transformers model's saved TBNConfig records it too.

    Keeping ``model.config.quantization_config.form`` in step makes ``save_pretrained`` /
    ``from_pretrained`` round-trip the form and tells Trainer whether the model can train.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    for _, layer in tbn_layers(model):
        if form == "packed":
            layer.pack()
        else:
            layer.to_latent()
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, TBNConfig):
        config.form = form
    return model
