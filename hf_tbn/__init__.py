"""hf-tbn: Tiled Bit Networks (sub-bit weights) for Hugging Face Transformers.

``import hf_tbn`` registers the ``"tbn"`` quantization method with transformers.
"""

from .config import TBNConfig
from .convert import convert_model, pack_model, plan_conversion, tbn_layers, to_latent_model
from .layers import TBNConv1d, TBNConv2d, TBNLayer, TBNLinear

__all__ = [
    "TBNConfig",
    "TBNConv1d",
    "TBNConv2d",
    "TBNLayer",
    "TBNLinear",
    "convert_model",
    "pack_model",
    "plan_conversion",
    "tbn_layers",
    "to_latent_model",
]
