"""Which compute path a packed layer's forward takes: the Triton kernel, the compiled CPU kernel or torch.

``"auto"`` uses Triton for CUDA activations of a kernel dtype when Triton is installed; on
CPU, for linear layers, it uses the compiled lookup-table kernel (:mod:`.native`) when it
could be built and the tile rows start on bytes (row length ``K % 8 == 0``), and the torch
path otherwise (logged once when the kernel cannot be built). ``"torch"`` always takes the
torch path. ``"native"`` and ``"triton"`` always take their kernel and say clearly why they
cannot. Every path supports autograd through the activations and the bias (training
adapters on a packed model).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from collections.abc import Callable
from types import ModuleType

import torch

from . import native

logger = logging.getLogger(__name__)

TileLinear = Callable[..., torch.Tensor]  # (x, bits, alpha, bias, rows, row0=0) -> (M, p * rows)


@functools.cache
def triton_available() -> bool:
    """Whether the optional ``triton`` package is installed (``pip install hf-tbn[triton]``)."""
    return importlib.util.find_spec("triton") is not None


def triton_module() -> ModuleType:
    """The kernel module, imported on first use so that ``import hf_tbn`` never needs Triton."""
    return importlib.import_module(".triton_tbn", __package__)


@functools.cache
def _native_usable() -> bool:
    error = native.native_error()
    if error is not None:
        logger.warning("hf_tbn: the compiled CPU kernel is unavailable, packed layers use the torch path: %s", error)
    return error is None


def _native_problem(x: torch.Tensor, row_length: int) -> str | None:
    """Why the CPU kernel cannot take ``x`` for tile rows of ``row_length`` values, or None."""
    if x.device.type != "cpu":
        return f"got a {x.device.type} tensor; it runs on CPU"
    if x.dtype not in native.DTYPES:
        return f"supports activations {native.DTYPES}, got {x.dtype}"
    if row_length % 8:
        return f"needs tile rows of a multiple of 8 values (whole bytes), got {row_length}"
    return native.native_error()


def resolve_backend(
    requested: str, x: torch.Tensor, layer_name: str, row_length: int, auto_native: bool = True
) -> str:
    """``"torch"``, ``"native"`` or ``"triton"`` for a packed forward on ``x``; ValueError naming the layer otherwise.

    ``row_length`` is the number of values in a tile row (the input features a tile row sees);
    ``auto_native=False`` keeps ``"auto"`` off the CPU kernel (convs: see docs/kernels.md).
    """
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if x.is_cuda:
            usable = triton_available() and x.dtype in triton_module().DTYPES
            return "triton" if usable else "torch"
        usable = auto_native and x.device.type == "cpu" and x.dtype in native.DTYPES and row_length % 8 == 0
        return "native" if usable and _native_usable() else "torch"
    if requested == "native":
        problem = _native_problem(x, row_length)
        if problem is not None:
            raise ValueError(f"{layer_name}: backend='native' (the compiled CPU kernel) {problem}")
        return "native"
    if requested != "triton":
        from ..config import BACKENDS  # config imports the layers, which import this module

        raise ValueError(f"{layer_name}: backend must be one of {BACKENDS}, got {requested!r}")
    if not triton_available():
        raise ValueError(f"{layer_name}: backend='triton' needs the triton package (pip install 'hf-tbn[triton]')")
    kernels = triton_module()
    if not x.is_cuda and not kernels.INTERPRETED:
        raise ValueError(
            f"{layer_name}: backend='triton' got a {x.device.type} tensor; Triton runs on CUDA, or on CPU only in "
            "its interpreter (TRITON_INTERPRET=1 set before triton is imported). Use backend='native', 'torch' or "
            "'auto'."
        )
    if x.dtype not in kernels.DTYPES:
        raise ValueError(f"{layer_name}: backend='triton' supports activations {kernels.DTYPES}, got {x.dtype}")
    return "triton"


def tile_linear(backend: str) -> TileLinear:
    """The launcher of a kernel backend (``"native"`` or ``"triton"``), with autograd."""
    return native.lut_linear if backend == "native" else triton_module().tbn_linear
