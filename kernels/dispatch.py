"""Which compute path a packed layer's forward takes: the torch path or the Triton kernel.

``"auto"`` uses Triton for CUDA activations of a kernel dtype when Triton is installed, and
the torch path otherwise (CPU above all). ``"torch"`` always takes the torch path.
``"triton"`` always takes the kernel and says clearly why it cannot: Triton missing, a CPU
tensor without ``TRITON_INTERPRET=1``, or an unsupported dtype. Both paths support autograd
through the activations and the bias (training adapters on a packed model).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

import torch


@functools.cache
def triton_available() -> bool:
    """Whether the optional ``triton`` package is installed (``pip install hf-tbn[triton]``)."""
    return importlib.util.find_spec("triton") is not None


def triton_module() -> ModuleType:
    """The kernel module, imported on first use so that ``import hf_tbn`` never needs Triton."""
    return importlib.import_module(".triton_tbn", __package__)


def resolve_backend(requested: str, x: torch.Tensor, layer_name: str) -> str:
    """``"torch"`` or ``"triton"`` for a packed forward on ``x``; ValueError naming the layer otherwise."""
    if requested == "torch":
        return "torch"
    if requested == "auto":
        usable = x.is_cuda and triton_available()
        return "triton" if usable and x.dtype in triton_module().DTYPES else "torch"
    if requested != "triton":
        from ..config import BACKENDS  # config imports the layers, which import this module

        raise ValueError(f"{layer_name}: backend must be one of {BACKENDS}, got {requested!r}")
    if not triton_available():
        raise ValueError(f"{layer_name}: backend='triton' needs the triton package (pip install 'hf-tbn[triton]')")
    kernels = triton_module()
    if not x.is_cuda and not kernels.INTERPRETED:
        raise ValueError(
            f"{layer_name}: backend='triton' got a {x.device.type} tensor; Triton runs on CUDA, or on CPU only in "
            "its interpreter (TRITON_INTERPRET=1 set before triton is imported). Use backend='torch' or 'auto'."
        )
    if x.dtype not in kernels.DTYPES:
        raise ValueError(f"{layer_name}: backend='triton' supports activations {kernels.DTYPES}, got {x.dtype}")
    return "triton"
