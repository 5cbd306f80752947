"""What the tile-product kernels' launchers share: their argument checks and their autograd op.

In the op, gradients reach ``x`` and the bias; the tile and the scales are fixed buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..tiling import unpack_range


def check_operands(
    name: str, x: torch.Tensor, bits: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int,
    row0: int,
) -> None:
    """ValueError (prefixed by the launcher's ``name``) unless ``bits`` holds tile rows ``row0 .. row0 + rows``
    of ``x``'s ``K`` values and ``bias`` has one value per output."""
    k, p = x.shape[1], alpha.numel()
    if bits.dtype != torch.uint8 or bits.numel() * 8 < (row0 + rows) * k:
        need = (row0 + rows) * k
        raise ValueError(f"{name}: bits must be uint8 holding {need} values, got {bits.dtype} {bits.numel()} bytes")
    if bias is not None and bias.numel() != p * rows:
        raise ValueError(f"{name}: bias has {bias.numel()} values, expected p * rows = {p * rows}")


class TileMatmul(torch.autograd.Function):
    """``kernel(x, bits, alpha, bias, rows, row0)`` as an autograd op, for any of the kernels' launchers.

    The backward, ``dL/dx = (sum_i alpha_i dL/dy_i) @ T``, reuses the tile too (computed with torch).
    """

    @staticmethod
    def forward(ctx, kernel: Callable[..., torch.Tensor], x, bits, alpha, bias, rows, row0):  # noqa: ANN001
        ctx.save_for_backward(bits, alpha)
        ctx.rows, ctx.row0, ctx.k = rows, row0, x.shape[1]
        return kernel(x, bits, alpha, bias, rows, row0)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        bits, alpha = ctx.saved_tensors
        rows, k, p = ctx.rows, ctx.k, alpha.numel()
        grad_x = grad_bias = None
        if ctx.needs_input_grad[1]:
            folded = (grad.reshape(-1, p, rows) * alpha.to(grad.dtype).view(1, p, 1)).sum(dim=1)
            grad_x = folded @ unpack_range(bits, ctx.row0 * k, rows * k, grad.dtype).view(rows, k)
        if ctx.needs_input_grad[4]:
            grad_bias = grad.sum(dim=0)
        return None, grad_x, None, None, grad_bias, None, None


def apply_tile_matmul(
    kernel: Callable[..., torch.Tensor],
    x: torch.Tensor,
    bits: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int,
    row0: int,
) -> torch.Tensor:
    """``kernel(...)`` through :class:`TileMatmul` when a gradient is wanted, directly otherwise (inference)."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return TileMatmul.apply(kernel, x, bits, alpha, bias, rows, row0)
    return kernel(x, bits, alpha, bias, rows, row0)
