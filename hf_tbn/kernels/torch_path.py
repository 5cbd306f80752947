"""The torch backend of packed linear layers: ``out/p`` outputs computed once, written ``p`` times.

The fallback wherever neither compiled kernel applies (:mod:`.backends`). Nothing dense is cached: the tile is
expanded from its bits on every call, through the 256 x 8 table of signs of
:func:`hf_tbn.tiling.sign_table` (one pass over the ``L = N/p`` tile values). For a few input
rows (decoding) even that is skipped: the product is read from per-byte partial sums of the
input (:func:`_byte_table_matmul`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tiling import check_tile_operands, sign_table, tiled_outputs, unpack_range

# Rows of x up to which the byte-table product beats expanding the tile (timed side by side
# on 384..4096-wide layers: clearly ahead at M = 1, about even at M = 4, behind at M = 16).
BYTE_TABLE_MAX_ROWS = 4
# Tile values expanded at once in the GEMM path: large tiles are expanded and multiplied in
# row chunks so the expanded signs stay in cache and big allocations are not page-faulted.
CHUNK_VALUES = 1 << 20
# On a GPU chunks only bound the expanded temporary. They were not what made this path slow there (an H200:
# 20 ms for an 8192 x 28672 tile, M = 16, in 224 chunks, 17.9 ms in 4, against 0.23 ms for the Triton kernel).
GPU_CHUNK_VALUES = 1 << 26

_GROUP_OFFSETS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _byte_table_matmul(x: torch.Tensor, tile_bytes: torch.Tensor, rows: int) -> torch.Tensor:
    """``x @ T.T`` for a tile whose rows start on byte boundaries (``K % 8 == 0``), without expanding it.

    For every group of 8 inputs, the 256 possible signed sums are tabulated once; output
    ``n`` is then the sum over groups of the entry its tile byte selects: ``L/8`` lookups
    per input row instead of ``L`` multiply-adds. Sums are taken in float32.
    """
    m, k = x.shape
    groups = k // 8
    signs = sign_table(torch.float32, x.device)
    x32 = x if x.dtype == torch.float32 else x.float()
    table = (x32.reshape(m, groups, 8) @ signs.t()).view(m, groups * 256)
    key = (groups, x.device)
    if key not in _GROUP_OFFSETS:
        _GROUP_OFFSETS[key] = torch.arange(0, groups * 256, 256, dtype=torch.int32, device=x.device)
    index = (tile_bytes.view(rows, groups) + _GROUP_OFFSETS[key]).view(-1)
    y = table.index_select(1, index).view(m, rows, groups).sum(dim=2)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _expanded_matmul(x: torch.Tensor, tile: torch.Tensor, rows: int, row0: int) -> torch.Tensor:
    """``x @ T.T`` expanding the tile to ``x.dtype`` signs, in row chunks of about ``CHUNK_VALUES`` (on CPU)."""
    k = x.shape[1]
    step = max(1, (CHUNK_VALUES if x.device.type == "cpu" else GPU_CHUNK_VALUES) // k)
    parts = []
    for r in range(row0, row0 + rows, step):
        n = min(step, row0 + rows - r)
        parts.append(F.linear(x, unpack_range(tile, r * k, n * k, x.dtype).view(n, k)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def tile_matmul(x: torch.Tensor, tile: torch.Tensor, rows: int, row0: int = 0) -> torch.Tensor:
    """``(M, rows)`` products of ``x`` ``(M, K)`` with tile rows ``row0 .. row0 + rows``: the work done once."""
    m, k = x.shape
    if m <= BYTE_TABLE_MAX_ROWS and k % 8 == 0 and 32 * m < rows:
        first = row0 * k // 8
        return _byte_table_matmul(x, tile[first : first + rows * k // 8], rows)
    return _expanded_matmul(x, tile, rows, row0)


def tile_linear(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int, row0: int = 0
) -> torch.Tensor:
    """``(M, p * rows)``: block ``i`` is ``alpha_i * x @ T.T`` (+ bias), ``T`` = tile rows ``row0 .. row0+rows``.

    ``x`` is ``(M, K)``; differentiable through torch's own autograd.
    """
    check_tile_operands("torch tile_linear", x, tile, alpha, bias, rows, row0)
    return tiled_outputs(tile_matmul(x, tile, rows, row0), alpha, dim=-1, bias=bias)
