"""hf-tbn: Tiled Bit Networks (sub-bit weights) for Hugging Face Transformers.

``import hf_tbn`` registers the ``"tbn"`` quantization method with transformers.
"""

from .config import TBNConfig
from .convert import convert_model, pack_model, plan_conversion, tbn_layers, to_latent_model
from .layers import TBNConv1d, TBNConv2d, TBNLayer, TBNLinear
from .peft_hook import register_with_peft_on_import
from .quantizer import TBNHfQuantizer, quantize_model, register

register()
register_with_peft_on_import()

__all__ = [
    "TBNConfig",
    "TBNHfQuantizer",
    "TBNConv1d",
    "TBNConv2d",
    "TBNLayer",
    "TBNLinear",
    "TBNLoraLinear",
    "convert_model",
    "pack_model",
    "plan_conversion",
    "quantize_model",
    "tbn_layers",
    "to_latent_model",
]


def __getattr__(name: str) -> object:
    # The LoRA layer needs peft, imported only on first use (see hf_tbn.peft_hook).
    if name == "TBNLoraLinear":
        from .lora import TBNLoraLinear

        return TBNLoraLinear
    raise AttributeError(f"module 'hf_tbn' has no attribute {name!r}")
