"""The compiled launchers as torch custom ops, with fake implementations and the one backward they share.

- ``hf_tbn::tile_linear_native``: :func:`.native.tile_linear`, the C kernel (CPU).
- ``hf_tbn::tile_linear_triton``: :func:`.triton_tbn.tile_linear`, the Triton launch (CUDA; CPU interpreted).
- ``hf_tbn::int8_rows_linear``: :func:`.native.int8_linear`, the compressed heads' int8 kernel (no autograd:
  the heads use it only when no gradient is wanted).

Both take ``(x (M, K), tile, alpha, bias | None, rows, row0)`` and return ``(M, p * rows)`` in
``x``'s dtype (:mod:`.backends` documents the product). To ``torch.compile`` and ``torch.export`` each
is one opaque node whose output shape comes from :func:`_fake`: dynamo never traces into ctypes or a
Triton launch, so a packed model compiles with ``fullgraph=True``. Autograd: :func:`_backward`,
``dL/dx = (sum_i alpha_i dL/dy_i) @ T`` (the tile reused too, computed with torch) and
``dL/dbias = sum_m dL/dy``; tile and alphas are fixed buffers (no gradient). AOTAutograd traces this
backward with fake tensors, so :func:`hf_tbn.tiling.sign_table` builds its table anew while compiling.
"""

from __future__ import annotations

import importlib

import torch

from ..tiling import unpack_range
from . import native


@torch.library.custom_op("hf_tbn::tile_linear_native", mutates_args=())
def tile_linear_native(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int, row0: int
) -> torch.Tensor:
    """:func:`.native.tile_linear` as a custom op."""
    return native.tile_linear(x, tile, alpha, bias, rows, row0)


@torch.library.custom_op("hf_tbn::tile_linear_triton", mutates_args=())
def tile_linear_triton(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int, row0: int
) -> torch.Tensor:
    """:func:`.triton_tbn.tile_linear` as a custom op (Triton imported on first use)."""
    return importlib.import_module(".triton_tbn", __package__).tile_linear(x, tile, alpha, bias, rows, row0)


@torch.library.custom_op("hf_tbn::int8_rows_linear", mutates_args=())
def int8_rows_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`.native.int8_linear` as a custom op."""
    return native.int8_linear(x, codes, scale)


@int8_rows_linear.register_fake
def _int8_fake(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


def _fake(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int, row0: int
) -> torch.Tensor:
    return x.new_empty(x.shape[0], alpha.shape[0] * rows)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, tile, alpha, _, rows, row0 = inputs
    ctx.save_for_backward(tile, alpha)
    ctx.rows, ctx.row0, ctx.k = rows, row0, x.shape[1]


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    tile, alpha = ctx.saved_tensors
    rows, k, p = ctx.rows, ctx.k, alpha.numel()
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        folded = (grad.reshape(-1, p, rows) * alpha.to(grad.dtype).view(1, p, 1)).sum(dim=1)  # (M, rows)
        grad_x = folded @ unpack_range(tile, ctx.row0 * k, rows * k, grad.dtype).view(rows, k)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.sum(dim=0)
    return grad_x, None, None, grad_bias, None, None


for _op in (tile_linear_native, tile_linear_triton):
    _op.register_fake(_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)
