"""The transformers ``HfQuantizer`` for TBN, registered as ``"tbn"`` when ``hf_tbn`` is imported.

Loading with ``from_pretrained(..., quantization_config=TBNConfig(...))`` swaps the eligible
layers for latent TBN layers on the meta device; the checkpoint's full-precision weights then
load into them by key (a GPT-2 ``Conv1D`` weight is transposed into the logical orientation by
:class:`TransposeOnLoad`). A saved TBN folder (latent or packed) reloads with a plain
``from_pretrained(dir)``: the saved ``layer_factors`` rebuild the same layers and the form of
each layer is read from the checkpoint's keys, which are checked against the layer shapes
before any weight is loaded.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.core_model_loading import ConversionOps
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .checkpoint import checkpoint_forms
from .config import QUANT_METHOD, TBNConfig
from .convert import convert_model, plan_conversion, set_form, tbn_layers


class TransposeOnLoad(ConversionOps):
    """Quantize-on-load op: a ``Conv1D`` checkpoint weight ``(in, out)`` -> the latent ``(out, in)``."""

    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        key = kwargs.get("full_layer_name") or target_patterns[0]
        value = next(iter(input_dict.values()))
        tensor = value[0] if isinstance(value, list) else value
        return {key: tensor.t().contiguous()}


class TBNHfQuantizer(HfQuantizer):
    """Tiled Bit Networks (Gorbett et al., CIKM 2024): sub-bit weights from one tiled binary vector per layer."""

    requires_calibration = False
    quantization_config: TBNConfig

    def __init__(self, quantization_config: TBNConfig, **kwargs: Any) -> None:
        # A private copy: the resolved layer_factors must not leak into the caller's config object.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self._transposed: set[str] = set()

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("TBN models cannot be offloaded to disk; use device_map 'cpu' or 'auto' without disk")

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        config = self.quantization_config
        if config.layer_factors is None:
            config.modules_to_not_convert = sorted(self._modules_to_not_convert(model))
        plan = plan_conversion(model, config)
        if not self.pre_quantized:
            self._transposed = {f"{name}.weight" for name in plan if isinstance(model.get_submodule(name), Conv1D)}
        forms = checkpoint_forms(model, plan, kwargs.get("checkpoint_files"), self.pre_quantized, self._transposed)
        config.layer_factors = {name: p for name, p in plan.items() if forms[name] is not None}
        convert_model(model, config)
        for name, layer in tbn_layers(model):
            if forms.get(name) == "packed":
                layer.pack()

    def _modules_to_not_convert(self, model: PreTrainedModel) -> set[str]:
        """The user's list, the model's fp32 modules and tied weights; by default also the output head."""
        user = self.quantization_config.modules_to_not_convert
        tied = model.all_tied_weights_keys
        keys = [*self.get_modules_to_not_convert(model, user, model._keep_in_fp32_modules), *tied, *tied.values()]
        return {key.removesuffix(".weight").removesuffix(".bias") for key in keys}

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        for _, layer in tbn_layers(model):
            layer.backend = self.quantization_config.backend
        return set_form(model, self.quantization_config.form)

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        return not self.pre_quantized and param_name in self._transposed

    def get_quantize_ops(self) -> ConversionOps:
        return TransposeOnLoad()

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Trainer may fine-tune the latent form directly (quantization-aware training)."""
        return self.quantization_config.form == "latent"

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
        """Swap every TBN layer for the dense module it replaced, holding ``W_hat``."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with torch.device("meta"):
            original = type(model)(copy.deepcopy(model.config))
        for name, layer in list(tbn_layers(model)):
            dense = layer.dense_module()
            if isinstance(original.get_submodule(name), Conv1D):
                dense = _as_conv1d(dense)
            model.set_submodule(name, dense.to(dtype) if dtype is not None else dense)
        return model


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
