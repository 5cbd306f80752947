"""Swap the eligible layers of any torch module for TBN layers, and move models between forms."""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Collection, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import tiling
from .config import TBNConfig
from .layers import FORMS, AlphaParam, TBNConv1d, TBNConv2d, TBNLayer, TBNLinear, check_factor, check_weight

CONVERTIBLE = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d)


def name_matches(name: str, pattern: str) -> bool:
    """Module-name matching used by every pattern option of :class:`TBNConfig`.

    ``pattern`` matches ``name`` when equal, when ``name`` ends with ``"." + pattern``, or
    when the regular expression ``pattern`` fully matches ``name``. An invalid regular
    expression that is not a plain name is a ValueError naming it.
    """
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as err:
        raise ValueError(f"module-name pattern {pattern!r} is not a valid regular expression: {err}") from None


def relative_name(model: nn.Module, name: str) -> str:
    """``name`` relative to the base model (``bert.encoder...`` -> ``encoder...``), as transformers keys its weights."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return name.removeprefix(prefix + ".")
    return name


def absolute_name(model: nn.Module, name: str) -> str | None:
    """The module of ``model`` a base-relative ``name`` denotes, or None when ``model`` has no such module."""
    prefix = getattr(model, "base_model_prefix", "")
    names = dict(model.named_modules())
    if prefix and isinstance(getattr(model, prefix, None), nn.Module) and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    return name if name in names else None


def logical_weight(module: nn.Module) -> torch.Tensor:
    """A convertible module's weight in the logical ``(out, in, ...)`` orientation."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _groups(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def output_layer(module: nn.Module, candidates: dict[str, nn.Module]) -> str | None:
    """Name of the layer producing the model's outputs: transformers' output embeddings, else the last convertible."""
    get_output = getattr(module, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    for name, m in candidates.items():
        if m is head:
            return name
    return next(reversed(candidates), None) if head is None else None


def plan_conversion(module: nn.Module, config: TBNConfig, keep_dense: Collection[str] = ()) -> dict[str, int]:
    """Names (in ``module``) of the layers to convert and each one's own factor p'.

    With ``config.converted_layers`` set (a saved, resolved plan, named relative to the base
    model) that plan is used exactly; layers of a task head this model class lacks are skipped.
    Otherwise the rule of :func:`hf_tbn.tiling.resolve_factor` with the config's overrides; the
    output layer gets p = 1 (tiling it makes the logits scaled copies of one another), and an
    explicit p > 1 for it is warned about. ``keep_dense`` names further modules kept full precision
    (found by the caller, e.g. tied weights); unlike the config's patterns they need not match.
    """
    candidates = {name: m for name, m in module.named_modules() if name and isinstance(m, CONVERTIBLE)}
    if config.converted_layers is not None:
        return _saved_plan(module, config.converted_layers, candidates, config.tile_layout)
    unused = {("modules_to_not_convert", pat) for pat in config.modules_to_not_convert or ()}
    unused |= {("layer_compression_factors", pat) for pat in config.layer_compression_factors}
    head = output_layer(module, candidates)
    plan: dict[str, int] = {}
    reduced: dict[str, int] = {}  # layer -> the width its copies split, where p could not be kept
    for name, m in candidates.items():
        skipped = [pat for pat in config.modules_to_not_convert or () if name_matches(name, pat)]
        unused -= {("modules_to_not_convert", pat) for pat in skipped}
        overrides = {pat: p for pat, p in config.layer_compression_factors.items() if name_matches(name, pat)}
        unused -= {("layer_compression_factors", pat) for pat in overrides}
        if skipped or any(name_matches(name, key) for key in keep_dense):
            continue
        shape, groups, layout = tuple(logical_weight(m).shape), _groups(m), config.tile_layout
        if len(set(overrides.values())) > 1:
            raise ValueError(f"{name}: layer_compression_factors patterns {sorted(overrides)} give different factors")
        if overrides:
            plan[name] = check_factor(next(iter(overrides.values())), shape, name, groups, layout)
            if name == head and plan[name] > 1:
                warnings.warn(
                    f"{name}: the output layer tiled with p={plan[name]} makes its outputs {plan[name]} scaled copies "
                    "of one another (accuracy usually drops); p=1 or modules_to_not_convert keeps them independent",
                    stacklevel=2,
                )
        elif name == head:
            plan[name] = 1
        else:
            p = config.compression_factor
            plan[name] = tiling.resolve_factor(shape, p, config.min_compress_size, groups, layout)
            if plan[name] < p and math.prod(shape) >= config.min_compress_size:
                reduced[name] = tiling.split_width(shape, layout)
    if unused:
        field, pat = min(unused)
        raise ValueError(f"{field} pattern {pat!r} matches no convertible layer (Linear, Conv1D, Conv1d, Conv2d)")
    if reduced:
        examples = ", ".join(f"{name} (width {width}) -> p={plan[name]}" for name, width in list(reduced.items())[:3])
        warnings.warn(
            f"{len(reduced)} layer(s) get a smaller factor than compression_factor={config.compression_factor}, "
            "which must divide the width their tile copies split (and suit a grouped conv's groups; "
            f"docs/foundation.md, 'Per-layer factors'): {examples}{', ...' if len(reduced) > 3 else ''}. "
            "Choose a factor that divides these widths, or set one per layer with layer_compression_factors",
            stacklevel=2,
        )
    return plan


def _saved_plan(
    module: nn.Module, saved: dict[str, int], candidates: dict[str, nn.Module], layout: tiling.TileLayout
) -> dict[str, int]:
    base_only = getattr(module, "base_model", module) is module and bool(getattr(module, "base_model_prefix", ""))
    plan: dict[str, int] = {}
    for rel, p in saved.items():
        name = absolute_name(module, rel)
        if name is None and base_only:
            continue  # a layer of the task head this base model does not have (transformers skips its keys too)
        if name not in candidates:
            raise ValueError(f"converted_layers names {rel!r}: not a Linear/Conv1D/Conv1d/Conv2d of this model")
        m = candidates[name]
        plan[name] = check_factor(p, tuple(logical_weight(m).shape), name, _groups(m), layout)
    return plan


def tbn_from_dense(
    module: nn.Module, p: int, alpha_mode: tiling.AlphaMode, name: str, alpha_param: AlphaParam = "latent",
    tile_layout: tiling.TileLayout = "output",
) -> TBNLayer:
    """A latent TBN layer initialised from a dense Linear / Conv1D / Conv1d / Conv2d (alphas from its weight)."""
    weight = logical_weight(module)
    check_weight(weight, name)
    kwargs = {
        "bias": module.bias is not None, "compression_factor": p, "alpha_mode": alpha_mode,
        "alpha_param": alpha_param, "tile_layout": tile_layout, "device": weight.device, "dtype": weight.dtype,
        "name": name,
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
            copies = tiling.to_copies(weight.detach(), p, tile_layout)
            layer._set_latent_state(copies.clone(memory_format=torch.contiguous_format))
            if module.bias is not None:
                layer.bias.copy_(module.bias)
    for param in (layer.weight, getattr(layer, "alpha_weight", None)):
        if param is not None:
            param.requires_grad_(module.weight.requires_grad)
    return layer


def convert_model(module: nn.Module, config: TBNConfig | None = None) -> nn.Module:
    """Swap every eligible layer of ``module`` for a latent TBN layer, in place.

    Works on any torch module. The resolved per-layer factors are written to
    ``config.converted_layers`` (named relative to the base model; what :func:`tbn_layers` reports).
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
        layer = tbn_from_dense(
            module.get_submodule(name), p, config.alpha_mode, name, config.alpha_param, config.tile_layout
        )
        layer.backend = config.backend
        module.set_submodule(name, layer)
    config.converted_layers = {relative_name(module, name): p for name, p in plan.items()}
    if not getattr(module, "_hf_tbn_state_check", False):
        module.register_load_state_dict_pre_hook(_refuse_incomplete_state)
        module._hf_tbn_state_check = True
    return module


def _refuse_incomplete_state(model: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """``load_state_dict`` pre-hook: a state dict holding TBN tensors (Trainer resume) must hold all of them.

    transformers' Trainer resumes with ``strict=False``, which would keep a missing latent weight at its
    current value with one warning. A state dict of adapter weights (peft) holds no TBN tensor and is let
    through; one that holds the wrong tensors for a layer is refused by the layer itself.
    """
    tbn_keys = {f"{prefix}{name}.{key}" for name, layer in tbn_layers(model) for key in layer._state_keys()}
    if any(key in state_dict for key in tbn_keys):
        missing = sorted(tbn_keys - set(state_dict))
        if missing:
            raise ValueError(f"{missing[0]}: missing from the state dict; the TBN layer needs it "
                             f"({len(missing)} TBN tensors missing in all)")


def _shared_weights(module: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    return {pid for pid, n in counts.items() if n > 1}


def tbn_layers(model: nn.Module) -> Iterator[tuple[str, TBNLayer]]:
    """``(name, layer)`` for every TBN layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, TBNLayer):
            yield name, m


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Choose the packed-forward compute path of every TBN layer (a runtime preference, never saved)."""
    from .kernels.backends import BACKEND_NAMES

    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    for _, layer in tbn_layers(model):
        layer.backend = backend
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, TBNConfig):
        config.backend = backend
    return model


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
    from tqdm.auto import tqdm

    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    layers = list(tbn_layers(model))
    for _, layer in tqdm(layers, desc=f"hf_tbn: to {form} form", unit="layer", disable=len(layers) < 50 or None):
        if form == "packed":
            layer.pack()
        else:
            layer.to_latent()
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, TBNConfig):
        config.form = form
    return model
