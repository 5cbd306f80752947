"""hf-tbn: Tiled Bit Networks (sub-bit weights) for Hugging Face Transformers.

``import hf_tbn`` registers the ``"tbn"`` quantization method with transformers.
"""

from .config import TBNConfig
from .convert import convert_model, pack_model, plan_conversion, tbn_layers, to_latent_model
from .layers import TBNConv1d, TBNConv2d, TBNLayer, TBNLinear
from .lora import TBNLoraLinear, register_with_peft
from .quantizer import TBNHfQuantizer, quantize_model, register

register()
register_with_peft()

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
