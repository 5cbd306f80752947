"""hf-tbn: Tiled Bit Networks (sub-bit weights) for Hugging Face Transformers.

``import hf_tbn`` registers the ``"tbn"`` quantization method with transformers (as soon as
transformers loads its quantizers), the dense-to-tiled warm-up with every ``Trainer`` (as soon
as transformers loads its trainer; hf_tbn.warmup) and TBN's LoRA layers with peft (as soon as
peft is imported). Every public name (docs/foundation.md lists them) is imported on first use, so
the import stays light (``hf-tbn -h`` needs no torch).
"""

from __future__ import annotations

import importlib

from .import_hooks import after_import


def _import_on(trigger: str, module: str) -> None:
    """Import ``hf_tbn.<module>``, which registers itself with ``trigger``'s library as it loads, once ``trigger`` is.

    The module registers itself at its own end rather than being called from here: a user who imports it first (it
    imports ``trigger``) would otherwise have the hook call into the half-executed module.
    """
    after_import(trigger, lambda: importlib.import_module(f".{module}", __name__))


_import_on("transformers.quantizers.auto", "quantizer")
_import_on("transformers.trainer", "warmup")
_import_on("peft", "lora")

# public name -> module that defines it (imported on first access)
_LAZY = {
    "TBNConfig": "config",
    "TBNConv1d": "layers", "TBNConv2d": "layers", "TBNLayer": "layers", "TBNLinear": "layers",
    "convert_model": "convert", "pack_model": "convert", "plan_conversion": "convert", "set_backend": "convert",
    "tbn_layers": "convert", "to_latent_model": "convert",
    "TBNHfQuantizer": "quantizer", "quantize_model": "quantizer",
    "TBNLoraLinear": "lora",  # needs peft
}
# public submodules (``hf_tbn.hub.save_tbn(...)`` works without importing hf_tbn.hub first)
_SUBMODULES = {"distill", "embeddings", "hub", "qat", "tiling", "warmup"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    if name == "__version__":
        from .version import version

        return version()
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hf_tbn' has no attribute {name!r}")
