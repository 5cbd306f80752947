"""Packed Conv1d / Conv2d: every conv path of every backend, in one place.

- :func:`torch_conv`: the torch backend. The ``out/p``-channel tile is expanded once and
  applied with ``F.convNd``; :func:`hf_tbn.tiling.tiled_outputs` writes the ``p`` scaled copies.
- :func:`unfold_conv`: a compiled backend's linear launcher over the unfolded input (im2col).
  The input is padded and unfolded into a ``(B * positions, C * prod(kernel))`` matrix whose
  column order (channel, then kernel offsets, row-major) is exactly the order of a tile row of
  shape ``(C / groups, *kernel)``, so the linear launcher applies the tile unchanged. The
  unfolded matrix costs ``prod(kernel)`` times the input's memory. Conv1d runs as a Conv2d of
  height 1.

Groups: group ``g`` produces output channels ``[g * out/groups, (g + 1) * out/groups)``.
Copy ``i`` of the tile covers channels ``[i * R, (i + 1) * R)`` with ``R = out / p``, and
``p`` and ``groups`` divide one another, so a group either spans several whole copies
(``groups < p``) or lies inside one copy (``groups >= p``, rows ``row0 ..`` of the tile).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..tiling import tiled_outputs, unpack_bits

# (x (M, K), tile, alpha (p,), bias (p * rows,) | None, rows, row0) -> (M, p * rows)
TileLinear = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ConvGeometry:
    """What a conv forward needs besides the tile: the dense weight shape and ``nn.ConvNd``'s arguments."""

    weight_shape: tuple[int, ...]  # (out, in / groups, *kernel)
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        """``F.conv1d`` / ``F.conv2d`` with this geometry and ``groups``."""
        fn = F.conv1d if len(self.kernel) == 1 else F.conv2d
        return fn(x, weight, bias, self.stride, self.padding, self.dilation, groups)


def group_blocks(out_channels: int, p: int, groups: int) -> list[tuple[int, int, int, int]]:
    """Per group: ``(first_copy, copies, row0, rows)`` of the tile that produce its output channels."""
    per_group, tile_rows = out_channels // groups, out_channels // p
    copies, rows = max(per_group // tile_rows, 1), min(per_group, tile_rows)
    return [(g * per_group // tile_rows, copies, g * per_group % tile_rows, rows) for g in range(groups)]


def torch_conv(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry
) -> torch.Tensor:
    """The packed conv on torch: the ``out/p``-channel tile applied once (per group block), ``p`` scaled copies."""
    p, (out_channels, in_per_group, *kernel) = alpha.numel(), geometry.weight_shape
    tile_shape = (out_channels // p, in_per_group, *kernel)
    weights = unpack_bits(tile, math.prod(tile_shape), x.dtype).view(tile_shape)
    channel_dim = -1 - len(kernel)  # counted from the end: batched or not
    if geometry.groups == 1:
        return tiled_outputs(geometry.conv(x, weights, None, 1), alpha, channel_dim, bias)
    # Grouped: each copy reads its own input channels, so only the tile's memory is reused.
    groups_per_copy = max(geometry.groups // p, 1)
    copies_per_group = max(p // geometry.groups, 1)
    blocks = []
    for i in range(p):
        first = (i // copies_per_group) * groups_per_copy * in_per_group
        xs = x.narrow(channel_dim, first, groups_per_copy * in_per_group)
        blocks.append(geometry.conv(xs, weights, None, groups_per_copy) * alpha[i].to(x.dtype))
    y = torch.cat(blocks, dim=channel_dim)
    if bias is not None:
        y = y + bias.to(y.dtype).view(-1, *([1] * len(kernel)))
    return y


def _pads(padding: str | tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding of each spatial dim, resolving ``"same"`` / ``"valid"`` like torch."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(q, q) for q in padding]


def unfold_conv(
    x: torch.Tensor,
    tile: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: ConvGeometry,
    linear: TileLinear,
) -> torch.Tensor:
    """The packed conv (batched or not) as the linear launcher ``linear`` over the unfolded input."""
    if x.dim() == len(geometry.weight_shape) - 1:
        return unfold_conv(x.unsqueeze(0), tile, alpha, bias, geometry, linear)[0]
    out_channels, groups = geometry.weight_shape[0], geometry.groups
    kernel, stride, dilation = geometry.kernel, geometry.stride, geometry.dilation
    pads = _pads(geometry.padding, kernel, dilation)
    if len(kernel) == 1:  # Conv1d as a Conv2d of height 1
        x, kernel, stride, dilation, pads = x.unsqueeze(-2), (1, *kernel), (1, *stride), (1, *dilation), [(0, 0), *pads]
    flat_pads = [q for before_after in reversed(pads) for q in before_after]
    if any(flat_pads):
        x = F.pad(x, flat_pads)
    batch, spatial = x.shape[0], x.shape[2:]
    out_spatial = [(n - d * (k - 1) - 1) // s + 1 for n, k, d, s in zip(spatial, kernel, dilation, stride, strict=True)]
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)
    cols = cols.reshape(-1, x.shape[1] * math.prod(kernel))  # (B * positions, C * prod(kernel))
    k_group = cols.shape[1] // groups
    per_group = out_channels // groups
    blocks = [
        linear(
            cols[:, g * k_group : (g + 1) * k_group], tile, alpha[first : first + copies],
            bias[g * per_group : (g + 1) * per_group] if bias is not None else None, rows, row0,
        )
        for g, (first, copies, row0, rows) in enumerate(group_blocks(out_channels, alpha.numel(), groups))
    ]
    out = blocks[0] if groups == 1 else torch.cat(blocks, dim=1)
    y = out.view(batch, *out_spatial, out_channels).movedim(-1, 1)
    return (y.squeeze(2) if len(geometry.weight_shape) == 3 else y).contiguous()
