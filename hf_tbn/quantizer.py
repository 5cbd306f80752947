"""The transformers ``HfQuantizer`` for TBN, registered as ``"tbn"`` when this module loads (``import hf_tbn`` loads it
as soon as transformers loads its quantizers).

Loading with ``from_pretrained(..., quantization_config=TBNConfig(...))`` swaps the eligible
layers for latent TBN layers on the meta device; the checkpoint's full-precision weights then
load into them by key, reshaped into the latent ``(p, *tile_shape)`` copies (and transposed for GPT-2
``Conv1D``) by :class:`TiledViewOnLoad`. A saved TBN folder (latent or packed) reloads with a plain
``from_pretrained(dir)``: the saved ``converted_layers`` rebuild the same layers, each layer's
form is read from the checkpoint, which is checked against the layers before any weight loads
(:mod:`hf_tbn.checkpoint`, where the checkpoint format is described).
"""

from __future__ import annotations

import copy
import re
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightRenaming
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from . import tiling
from .checkpoint import FORMAT_VERSION, LAYOUT_KEY, NEEDS_HF_TBN, checkpoint_forms, checkpoint_state_dict
from .config import QUANT_METHOD, TBNConfig
from .convert import convert_model, plan_conversion, relative_name, set_backend, set_form, tbn_layers
from .embeddings import compress_dense_modules, decompress_dense_modules, init_compressed_modules
from .layers import alpha_sources
from .version import version

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# Module names of vision patch embeddings whose forward reads ``.weight.dtype`` (transformers' ViT family, CLIP).
PATCH_PROJECTIONS = ("patch_embeddings.projection", "patch_embedding")


class TiledViewOnLoad(ConversionOps):
    """Quantize-on-load op: a dense checkpoint weight -> the latent ``(p, *tile_shape)`` copies of its TBN layer, plus
    the alpha state its ``alpha_param`` keeps, initialised from that weight (the checkpoint has none)."""

    def __init__(self, quantizer: TBNHfQuantizer) -> None:
        self.quantizer = quantizer

    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        key = kwargs.get("full_layer_name") or target_patterns[0]
        value = next(iter(input_dict.values()))
        tensor = value[0] if isinstance(value, list) else value
        name = key.removesuffix(".weight")
        if name in self.quantizer._conv1d:
            tensor = tensor.t()  # Conv1D stores (in, out)
        config = self.quantizer.quantization_config
        latent = tiling.to_copies(tensor, self.quantizer._factors[name], config.tile_layout).contiguous()
        return {key: latent, **{f"{name}.{k}": v for k, v in alpha_sources(latent, config.alpha_param).items()}}


class TBNHfQuantizer(HfQuantizer):
    """Tiled Bit Networks (Gorbett et al., CIKM 2024): sub-bit weights from one tiled binary vector per layer."""

    requires_calibration = False
    quantization_config: TBNConfig

    def __init__(self, quantization_config: TBNConfig, **kwargs: Any) -> None:
        # A private copy: the resolved converted_layers must not leak into the caller's config object.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self._conv1d: set[str] = set()  # converted layers that were GPT-2 Conv1D (dequantize restores them)
        self._factors: dict[str, int] = {}  # layers quantized on load -> their p
        self._packed: list[str] = []  # packed layers being loaded, named relative to the base model
        self._model: weakref.ref | None = None  # the model this quantizer serves (for the training check)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("TBN models cannot be offloaded to disk; use device_map 'cpu' or 'auto' without disk")

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        config = self.quantization_config
        plan = plan_conversion(model, config, self._modules_to_keep_dense(model))
        self._conv1d = {name for name in plan if isinstance(model.get_submodule(name), Conv1D)}
        forms = checkpoint_forms(model, plan, kwargs.get("checkpoint_files"), config, self._conv1d, self.pre_quantized)
        config.converted_layers = {relative_name(model, name): p for name, p in plan.items() if forms[name] is not None}
        ignored = model._keys_to_ignore_on_load_unexpected or set()
        model._keys_to_ignore_on_load_unexpected = {*ignored, re.escape(NEEDS_HF_TBN)}
        convert_model(model, config)
        if config.embedding_format is not None and self.pre_quantized:
            init_compressed_modules(model, config.embedding_format, config.embedding_group_size)
        for name, layer in tbn_layers(model):
            if forms.get(name) == "packed":
                layer.pack()
                layer._hf_loading = True  # until the weights are in (see TBNLayer.__getattr__)
                self._packed.append(relative_name(model, name))
            elif not self.pre_quantized:
                self._factors[name] = layer.compression_factor

    def _modules_to_keep_dense(self, model: PreTrainedModel) -> set[str]:
        """The model's fp32 modules, its tied weights, (transformers' rule) its output head, and the vision
        patch projections whose ``weight.dtype`` the model's forward reads (ViT, CLIP, DINOv2)."""
        tied = model.all_tied_weights_keys
        keys = [*self.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules), *tied, *tied.values()]
        patches = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.endswith(PATCH_PROJECTIONS)]
        return {key.removesuffix(".weight").removesuffix(".bias") for key in keys} | set(patches)

    def get_weight_conversions(self) -> list[WeightRenaming]:
        """A packed layer's tile is stored under ``weight`` (a dense layer cannot load it): load it into ``tile``.

        One exact renaming per packed layer (with or without the base-model prefix), applied after the model's own.
        """
        return [WeightRenaming(rf"(?<![^.]){re.escape(name)}\.weight$", f"{name}.tile") for name in self._packed]

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The checkpoint: packed tiles under ``weight``; the hf_tbn version, format and tile layout in the
        safetensors metadata."""
        metadata = {"hf_tbn_version": version(), "hf_tbn_format": FORMAT_VERSION,
                    LAYOUT_KEY: self.quantization_config.tile_layout}
        return checkpoint_state_dict(model), metadata

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        from .hub import tag_model

        config = self.quantization_config
        if config.embedding_format is not None and not self.pre_quantized:
            compress_dense_modules(model, config.embedding_format, config.embedding_group_size)
        self._model = weakref.ref(model)
        for _, layer in tbn_layers(model):
            layer.__dict__.pop("_hf_loading", None)
        set_backend(model, self.quantization_config.backend)
        return set_form(tag_model(model), self.quantization_config.form)

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        return not self.pre_quantized and param_name.removesuffix(".weight") in self._factors

    def get_quantize_ops(self) -> ConversionOps:
        return TiledViewOnLoad(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Trainer may fine-tune the latent form directly (quantization-aware training), not the packed one.

        transformers asks this only when validating a model for training; a packed model without
        adapters gets a refusal that says what to do instead of transformers' generic one.
        """
        if self.quantization_config.form == "latent":
            return True
        model = self._model() if self._model is not None else None
        if model is not None and not _has_adapters(model):
            raise ValueError(
                "this TBN model is in the packed form (tile bits + alphas), which has nothing to train: call "
                "hf_tbn.to_latent_model(model) for quantization-aware training, or attach LoRA adapters with peft"
            )
        return False

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
        """Swap every TBN layer for the dense module it replaced, holding ``W_hat``."""
        from tqdm.auto import tqdm

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        layers = list(tbn_layers(model))
        for name, layer in tqdm(layers, desc="hf_tbn: dequantize", unit="layer", disable=len(layers) < 50 or None):
            dense = layer.dense_module()
            if name in self._conv1d:
                dense = _as_conv1d(dense)
            model.set_submodule(name, dense.to(dtype) if dtype is not None else dense)
        decompress_dense_modules(model)
        return model


def _has_adapters(model: nn.Module) -> bool:
    """Whether peft put adapter layers into ``model``."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is not None and any(isinstance(m, tuners.BaseTunerLayer) for m in model.modules())


def _as_conv1d(linear: nn.Linear) -> Conv1D:
    out = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight.t())
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def quantize_model(model: PreTrainedModel, config: TBNConfig | None = None) -> PreTrainedModel:
    """Convert an already loaded transformers model in place, exactly as quantize-on-load would.

    Unlike a bare :func:`hf_tbn.convert_model`, the model then carries its quantizer and config,
    so ``save_pretrained``, ``Trainer`` and ``dequantize`` treat it as a TBN model.
    """
    quantizer = TBNHfQuantizer(config if config is not None else TBNConfig(), pre_quantized=False)
    quantizer.preprocess_model(model)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model


def register() -> None:
    """Register the config and the quantizer with transformers; a second call is a no-op."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TBNConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TBNHfQuantizer)


register()
