"""The compute paths of packed layers as one table, and the two entries the layers call.

=========  ==========================================  ==============================================
backend    linear                                      conv
=========  ==========================================  ==============================================
torch      :func:`.torch_path.tile_linear`             :func:`.conv.torch_conv`
native     :func:`.native.tile_linear` (C, CPU)        :func:`.conv.unfold_conv` over its linear
triton     :func:`.triton_tbn.tile_linear` (CUDA)      :func:`.conv.unfold_conv` over its linear
=========  ==========================================  ==============================================

``"auto"`` picks Triton for CUDA activations, the compiled CPU kernel for CPU linear layers
(convs stay on torch: through unfold the kernel was slower than ``F.conv2d``, docs/kernels.md),
and torch wherever the chosen kernel cannot take the input; a kernel asked for by name says
why it cannot.

The compiled kernels are torch custom ops (:mod:`.ops`: their fake implementations and their one
backward, gradients reaching the activations and the bias); torch has its own autograd. Eager
inference (no gradient wanted, not compiling) calls the launcher directly: the same computation
without the dispatcher's per-call cost (docs/kernels.md). Resolution is traceable: what needs the
file system, a compiler or an import (:func:`kernel_unavailable`, :func:`_triton_facts`) is
evaluated eagerly and cached, also while ``torch.compile`` traces, so a packed model compiles with
``fullgraph=True``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from . import native, ops, torch_path
from .conv import ConvGeometry, TileLinear, torch_conv, unfold_conv

logger = logging.getLogger(__name__)

LayerKind = str  # "linear" | "conv"


@dataclass(frozen=True)
class Backend:
    """One compute path: its launchers and why it cannot take a given input."""

    name: str
    linear: TileLinear  # (x (M, K), tile, alpha, bias, rows, row0) -> (M, p * rows), with autograd
    conv: Callable[..., torch.Tensor]  # (x, tile, alpha, bias, geometry) -> the conv output
    problem: Callable[[torch.Tensor, int], str | None]  # (x, values per tile row) -> why not, or None


def _differentiable(launcher: TileLinear, op: TileLinear) -> TileLinear:
    def linear(x, tile, alpha, bias, rows, row0=0):  # noqa: ANN001, ANN202
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if torch.compiler.is_compiling() or wants_grad:
            return op(x, tile, alpha, bias, rows, row0)
        return launcher(x, tile, alpha, bias, rows, row0)

    return linear


@functools.cache
def triton_available() -> bool:
    """Whether the optional ``triton`` package is installed (``pip install hf-tbn[triton]``)."""
    return importlib.util.find_spec("triton") is not None


def triton_module() -> ModuleType:
    """The Triton kernel module, imported on first use so that ``import hf_tbn`` never needs Triton."""
    return importlib.import_module(".triton_tbn", __package__)


@torch.compiler.assume_constant_result
def kernel_unavailable(name: str) -> str | None:
    """Why the compiled backend ``name`` cannot run in this process at all, or None (builds the CPU kernel)."""
    if name == "native":
        return native.native_error()
    return None if triton_available() else "needs the triton package (pip install 'hf-tbn[triton]')"


@torch.compiler.assume_constant_result
def _triton_facts() -> tuple[bool, tuple[torch.dtype, ...]]:
    """Whether Triton runs interpreted, and the activation dtypes of its kernel (imports it)."""
    kernels = triton_module()
    return kernels.INTERPRETED, kernels.DTYPES


@torch.compiler.assume_constant_result
def _note_fallback(reason: str) -> None:
    """Under ``"auto"``: warn once (eagerly, also while compiling) when the CPU kernel is unusable here."""
    if reason == native.native_error():
        _warn_native_unavailable(reason)


def _native_problem(x: torch.Tensor, row_length: int) -> str | None:
    if x.device.type != "cpu":
        return f"got a {x.device.type} tensor; it runs on CPU"
    if x.dtype not in native.DTYPES:
        return f"supports activations {native.DTYPES}, got {x.dtype}"
    if row_length % 8:
        return f"needs tile rows of a multiple of 8 values (whole bytes), got {row_length}"
    return kernel_unavailable("native")


def _triton_problem(x: torch.Tensor, row_length: int) -> str | None:
    reason = kernel_unavailable("triton")
    if reason is not None:
        return reason
    interpreted, dtypes = _triton_facts()
    if not x.is_cuda and not interpreted:
        return (
            f"got a {x.device.type} tensor; Triton runs on CUDA, or on CPU only in its interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported). Use backend='native', 'torch' or 'auto'"
        )
    if x.dtype not in dtypes:
        return f"supports activations {dtypes}, got {x.dtype}"
    return None


def _triton_linear(*args: object) -> torch.Tensor:
    return triton_module().tile_linear(*args)


def _compiled(
    name: str, launcher: TileLinear, op: TileLinear, problem: Callable[[torch.Tensor, int], str | None]
) -> Backend:
    linear = _differentiable(launcher, op)
    return Backend(name, linear, functools.partial(unfold_conv, linear=linear), problem)


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", torch_path.tile_linear, torch_conv, lambda x, row_length: None),
    "native": _compiled("native", native.tile_linear, ops.tile_linear_native, _native_problem),
    "triton": _compiled("triton", _triton_linear, ops.tile_linear_triton, _triton_problem),
}
BACKEND_NAMES: tuple[str, ...] = ("auto", *BACKENDS)


@functools.cache
def _warn_native_unavailable(reason: str) -> None:
    logger.warning("hf_tbn: the compiled CPU kernel is unavailable, packed layers use the torch path: %s", reason)


def resolve(requested: str, x: torch.Tensor, kind: LayerKind, row_length: int, layer_name: str) -> Backend:
    """The backend a packed ``kind`` layer with tile rows of ``row_length`` values runs ``x`` on.

    ValueError naming the layer when ``requested`` is unknown or a named kernel cannot take ``x``.
    """
    if requested == "auto":
        candidate = "triton" if x.is_cuda else "native" if kind == "linear" else "torch"
        backend = BACKENDS[candidate]
        reason = backend.problem(x, row_length)
        if reason is not None and candidate == "native":
            _note_fallback(reason)
        return backend if reason is None else BACKENDS["torch"]
    if requested not in BACKENDS:
        raise ValueError(f"{layer_name}: backend must be one of {BACKEND_NAMES}, got {requested!r}")
    backend = BACKENDS[requested]
    reason = backend.problem(x, row_length)
    if reason is not None:
        what = {"native": " (the compiled CPU kernel)"}.get(requested, "")
        raise ValueError(f"{layer_name}: backend={requested!r}{what} {reason}")
    return backend


def linear(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int, backend: str,
    layer_name: str,
) -> torch.Tensor:
    """A packed linear layer of ``rows = out/p`` tile rows: ``x`` ``(..., K)`` -> ``(..., out)``."""
    k = x.shape[-1]
    chosen = resolve(backend, x, "linear", k, layer_name)
    y = chosen.linear(x.reshape(-1, k), tile, alpha, bias, rows, 0)  # (M, out): the tile product done once
    return y.view(*x.shape[:-1], y.shape[-1])


def conv(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry,
    backend: str, layer_name: str,
) -> torch.Tensor:
    """A packed Conv1d / Conv2d layer on ``x`` (batched or not)."""
    row_length = math.prod(geometry.weight_shape[1:])
    return resolve(backend, x, "conv", row_length, layer_name).conv(x, tile, alpha, bias, geometry)
