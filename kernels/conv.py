"""Packed Conv1d / Conv2d on a tile-product kernel (Triton or the compiled CPU one), through unfold (im2col).

The input is padded and unfolded into a ``(B * positions, C * prod(kernel))`` matrix whose
column order (channel, then kernel offsets, row-major) is exactly the order of a tile row
of shape ``(C / groups, *kernel)``, so the linear kernel applies the tile unchanged. The
unfolded matrix costs ``prod(kernel)`` times the input's memory; an implicit-GEMM kernel
would avoid it and is the natural next step. Conv1d is run as a Conv2d of height 1.

Groups: group ``g`` produces output channels ``[g * out/groups, (g + 1) * out/groups)``.
Copy ``i`` of the tile covers channels ``[i * R, (i + 1) * R)`` with ``R = out / p``, and
``p`` and ``groups`` divide one another, so a group either spans several whole copies
(``groups < p``) or lies inside one copy (``groups >= p``, rows ``row0 ..`` of the tile);
each group is one kernel launch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import TileLinear


def _pads(padding: str | tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding of each spatial dim, resolving ``"same"`` / ``"valid"`` like torch."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(q, q) for q in padding]


def group_blocks(out_channels: int, p: int, groups: int) -> list[tuple[int, int, int, int]]:
    """Per group: ``(first_copy, copies, row0, rows)`` of the tile that produce its output channels."""
    per_group, tile_rows = out_channels // groups, out_channels // p
    copies, rows = max(per_group // tile_rows, 1), min(per_group, tile_rows)
    return [(g * per_group // tile_rows, copies, g * per_group % tile_rows, rows) for g in range(groups)]


def packed_conv(
    x: torch.Tensor,
    bits: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor | None,
    weight_shape: tuple[int, ...],
    stride: tuple[int, ...],
    padding: str | tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    linear: TileLinear,
) -> torch.Tensor:
    """A packed ``ConvNd`` forward (N = 1 or 2 spatial dims, batched or not) on the kernel launcher ``linear``."""
    if x.dim() == len(weight_shape) - 1:
        args = (bits, alpha, bias, weight_shape, stride, padding, dilation, groups, linear)
        return packed_conv(x.unsqueeze(0), *args)[0]
    out_channels, kernel = weight_shape[0], tuple(weight_shape[2:])
    pads = _pads(padding, kernel, dilation)
    if len(kernel) == 1:  # Conv1d as a Conv2d of height 1
        x, kernel, stride, dilation, pads = x.unsqueeze(-2), (1, *kernel), (1, *stride), (1, *dilation), [(0, 0), *pads]
    flat_pads = [q for before_after in reversed(pads) for q in before_after]
    if any(flat_pads):
        x = F.pad(x, flat_pads)
    batch, spatial = x.shape[0], x.shape[2:]
    out_spatial = [(n - d * (k - 1) - 1) // s + 1 for n, k, d, s in zip(spatial, kernel, dilation, stride, strict=True)]
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)
    cols = cols.reshape(-1, x.shape[1] * math.prod(kernel))
    k_group = cols.shape[1] // groups
    per_group = out_channels // groups
    blocks = [
        linear(
            cols[:, g * k_group : (g + 1) * k_group], bits, alpha[first : first + copies],
            bias[g * per_group : (g + 1) * per_group] if bias is not None else None, rows, row0,
        )
        for g, (first, copies, row0, rows) in enumerate(group_blocks(out_channels, alpha.numel(), groups))
    ]
    out = blocks[0] if groups == 1 else torch.cat(blocks, dim=1)
    y = out.view(batch, *out_spatial, out_channels).movedim(-1, 1)
    return (y.squeeze(2) if len(weight_shape) == 3 else y).contiguous()
