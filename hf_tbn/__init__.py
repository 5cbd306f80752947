"""hf-tbn: Tiled Bit Networks (sub-bit weights) for Hugging Face Transformers.

``import hf_tbn`` registers the ``"tbn"`` quantization method with transformers.
"""

from .config import TBNConfig
from .convert import convert_model, pack_model, plan_conversion, tbn_layers, to_latent_model
from .layers import TBNConv1d, TBNConv2d, TBNLayer, TBNLinear
from .quantizer import TBNHfQuantizer, quantize_model, register

register()

__all__ = [
    "TBNConfig",
    "TBNHfQuantizer",
    "TBNConv1d",
    "TBNConv2d",
    "TBNLayer",
    "TBNLinear",
    "convert_model",
    "pack_model",
    "plan_conversion",
    "quantize_model",
    "tbn_layers",
    "to_latent_model",
]
