"""The Tiled Bit Network math (docs/foundation.md), in one place.

Everything that tiles, binarizes, packs or computes with a tile goes through this module:
the layers, the kernels' references and the microcontroller exporter.

Conventions
-----------
A layer's weight is taken in its logical orientation ``(out, in[, k...])`` and split into ``p``
copies of the tile's shape, ``(p, *tile_shape)``, viewed as ``(p, L)`` with ``L = numel / p``.
The tile layout says along which dimension (:func:`to_copies`):

- ``"output"`` (the paper's): copy ``i`` is the block of output rows ``[i * out/p, (i + 1) * out/p)``,
  the tile an ``(out/p, in, k...)`` weight; ``p`` divides ``out``. Output block ``i`` is
  ``alpha_i * (T x)`` (:func:`tiled_outputs`).
- ``"input"``: copy ``i`` is the block of input columns (channels) ``[i * in/p, (i + 1) * in/p)``,
  the tile an ``(out, in/p, k...)`` weight; ``p`` divides ``in``. The output is
  ``T (sum_i alpha_i x_i)`` over the ``p`` input blocks ``x_i`` (:func:`combined_inputs`). A
  normalization after the layer (BatchNorm) cannot divide these scales out, as it does the
  output layout's (docs/quality.md).

Bit order of a packed tile (part of the checkpoint format): element ``j`` of the tile is
bit ``j % 8`` (least significant bit first) of byte ``j // 8``; a set bit is ``+1``, a clear
bit is ``-1``; the padding bits of the last byte are zero. A tile of length ``L`` takes
``ceil(L / 8)`` bytes (``torch.uint8``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

AlphaMode = Literal["per_tile", "per_layer"]
ALPHA_MODES: tuple[str, ...] = ("per_tile", "per_layer")
TileLayout = Literal["output", "input"]
TILE_LAYOUTS: tuple[str, ...] = ("output", "input")

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def tile_length(numel: int, p: int) -> int:
    """Length ``L = numel / p`` of the tile of a weight with ``numel`` elements."""
    return numel // p


def split_width(weight_shape: Sequence[int], layout: TileLayout) -> int:
    """The dimension the copies split: ``out`` (``"output"``) or ``in`` (``"input"``) of ``(out, in, k...)``."""
    return weight_shape[0] if layout == "output" else weight_shape[1]


def tile_shape(weight_shape: Sequence[int], p: int, layout: TileLayout) -> torch.Size:
    """The tile as a weight: ``(out/p, in, k...)`` (``"output"``) or ``(out, in/p, k...)`` (``"input"``)."""
    dim = 0 if layout == "output" else 1
    return torch.Size(n // p if i == dim else n for i, n in enumerate(weight_shape))


def to_copies(w: torch.Tensor, p: int, layout: TileLayout) -> torch.Tensor:
    """Logical weight ``(out, in, k...)`` -> its ``p`` copies ``(p, *tile_shape)`` (a view for ``"output"``)."""
    if layout == "output":
        return w.reshape(p, -1, *w.shape[1:])
    out, width, *kernel = w.shape
    return w.reshape(out, p, width // p, *kernel).transpose(0, 1)  # (p, out, in/p, k...)


def from_copies(copies: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Inverse of :func:`to_copies`: ``(p, *tile_shape)`` -> the logical ``(out, in, k...)`` weight."""
    if layout == "output":
        return copies.flatten(0, 1)
    return copies.transpose(0, 1).flatten(1, 2)


def aggregate_sign(w: torch.Tensor, p: int) -> torch.Tensor:
    """The tile ``t`` (values +-1, shape ``(L,)``): sign of the sum over the ``p`` copies.

    Zero maps to -1 (docs/foundation.md). No gradient: see :func:`tiled_sign`.
    """
    s = w.reshape(p, -1).sum(dim=0)
    return torch.where(s > 0, 1.0, -1.0).to(w.dtype)


class _TiledSign(torch.autograd.Function):
    """``B = tile(t, p)`` with the identity straight-through backward (authors' code)."""

    @staticmethod
    def forward(ctx, w_view: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        p = w_view.shape[0]
        return aggregate_sign(w_view, p).expand(p, -1).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def tiled_sign(w: torch.Tensor, p: int) -> torch.Tensor:
    """``B`` as a ``(p, L)`` tensor of +-1 whose gradient flows to ``w`` unchanged."""
    return _TiledSign.apply(w.reshape(p, -1))


def alpha(w: torch.Tensor, p: int, mode: AlphaMode = "per_tile") -> torch.Tensor:
    """The ``p`` scales computed from the latent weight (differentiable).

    ``per_tile``: ``alpha_i = mean(|W_i|)`` over copy ``i``; ``per_layer``: one
    ``mean(|W|)`` repeated ``p`` times, so both modes store and apply ``p`` scales.
    """
    if mode == "per_tile":
        return w.reshape(p, -1).abs().mean(dim=1)
    if mode == "per_layer":
        return w.reshape(-1).abs().mean().expand(p)
    raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {mode!r}")


def tiled_weight(w: torch.Tensor, p: int, alpha_values: torch.Tensor) -> torch.Tensor:
    """``W_hat = alpha_i * t`` in ``w``'s shape for the given ``p`` alphas; differentiable w.r.t. ``w``
    (straight-through) and ``alpha_values``."""
    return (alpha_values.unsqueeze(1) * tiled_sign(w, p)).reshape(w.shape)


def effective_weight(w: torch.Tensor, p: int, mode: AlphaMode = "per_tile") -> torch.Tensor:
    """``W_hat`` in ``w``'s shape with the alphas computed from ``w`` itself (the paper's form)."""
    return tiled_weight(w, p, alpha(w, p, mode))


def dequantize(
    tile: torch.Tensor, alpha_values: torch.Tensor, shape: Sequence[int], layout: TileLayout = "output"
) -> torch.Tensor:
    """Dense logical ``W_hat`` of ``shape`` from a +-1 tile ``(L,)`` and the ``p`` alphas (no gradient path)."""
    p = alpha_values.numel()
    copies = alpha_values.unsqueeze(1) * tile.to(alpha_values.dtype).unsqueeze(0)  # (p, L)
    return from_copies(copies.reshape(p, *tile_shape(shape, p, layout)), layout)


def pack_bits(tile: torch.Tensor) -> torch.Tensor:
    """Pack a +-1 (or boolean, True = +1) vector into ``ceil(L / 8)`` uint8, LSB first."""
    bits = (tile > 0).to(torch.uint8).flatten()
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    shifts = _BIT_SHIFTS.to(bits.device)
    return (bits.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def sign_table(dtype: torch.dtype, device: torch.device, cached: bool = True) -> torch.Tensor:
    """``(256, 8)`` table: row ``b`` holds the 8 signs byte ``b`` encodes in the tile bit order.

    Cached per dtype and device; ``cached=False`` builds it anew (while torch.compile or
    AOTAutograd trace with fake tensors, a cached real tensor cannot enter the graph).
    """
    key = (dtype, device)
    if key not in _SIGN_TABLES or not cached:
        bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
        table = (bits * 2 - 1).to(dtype=dtype)
        if not cached:
            return table
        _SIGN_TABLES[key] = table
    return _SIGN_TABLES[key]


def unpack_range(packed: torch.Tensor, start: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Tile values ``start .. start + length`` as +-1 in ``dtype``, one table lookup per byte."""
    first, stop = start // 8, (start + length + 7) // 8
    used = packed if first == 0 and stop == packed.numel() else packed[first:stop]
    traced = type(packed) is not torch.Tensor or torch.compiler.is_compiling()  # fake or functional tensors
    values = sign_table(dtype, packed.device, cached=not traced).index_select(0, used.int()).view(-1)
    return values if start % 8 == 0 and length == values.numel() else values[start % 8 : start % 8 + length]


def unpack_bits(packed: torch.Tensor, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the whole tile of ``length`` values of +-1 in ``dtype``."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed tile must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(length):
        need = packed_nbytes(length)
        raise ValueError(f"packed tile has {packed.numel()} bytes, a tile of {length} bits needs {need}")
    return unpack_range(packed, 0, length, dtype)


def packed_nbytes(length: int) -> int:
    """Bytes of a packed tile of ``length`` bits."""
    return math.ceil(length / 8)


def bits_per_weight(numel: int, p: int, scale_bits: int = 32) -> float:
    """Storage cost of a tiled layer: ``1/p`` for the tile plus ``p`` scales over ``numel``.

    Counts the tile in whole bytes, as it is stored; the paper's ``1/p + 32p/N`` is the
    same up to the at most 7 padding bits.
    """
    return (8 * packed_nbytes(tile_length(numel, p)) + scale_bits * p) / numel


def resolve_factor(
    weight_shape: Sequence[int], p: int, min_compress_size: int, groups: int = 1, layout: TileLayout = "output"
) -> int:
    """The layer's own factor: the largest ``p' <= p`` dividing the width the copies split (:func:`split_width`).

    Layers with fewer than ``min_compress_size`` weights get ``p' = 1`` (binary), as in the
    paper; keeping ``p'`` a divisor keeps every tile copy a block of whole rows (columns), the
    case the compute-reuse forward needs. For grouped convolutions ``p'`` and ``groups`` must
    also divide one another, so a copy spans whole groups or lies inside one; the input layout
    does not tile grouped convolutions (``p' = 1``).
    """
    width = split_width(weight_shape, layout)
    if math.prod(weight_shape) < min_compress_size or (layout == "input" and groups > 1):
        return 1
    return max(d for d in range(1, min(p, width) + 1) if width % d == 0 and (groups % d == 0 or d % groups == 0))


def tiled_outputs(
    y_tile: torch.Tensor, alpha: torch.Tensor, dim: int = -1, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The compute-reuse identity: ``T.x`` computed once, written ``p`` times scaled.

    ``y_tile`` holds the ``out/p`` outputs of the tile along ``dim``; the result holds the
    ``out`` outputs, block ``i`` being ``alpha_i * y_tile`` (plus ``bias``, ``(out,)``, added
    in the same pass).
    """
    dim = dim % y_tile.dim()
    p = alpha.numel()
    trailing = (1,) * (y_tile.dim() - dim - 1)
    scale = (alpha if alpha.dtype == y_tile.dtype else alpha.to(y_tile.dtype)).view((p, 1, *trailing))
    if bias is None:
        y = y_tile.unsqueeze(dim) * scale
    else:
        bias = bias if bias.dtype == y_tile.dtype else bias.to(y_tile.dtype)
        y = torch.addcmul(bias.view((p, -1, *trailing)), y_tile.unsqueeze(dim), scale)
    return y.flatten(dim, dim + 1)


def combined_inputs(x: torch.Tensor, alpha: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The input layout's compute-reuse identity: ``sum_i alpha_i x_i`` over the ``p`` blocks of ``dim``.

    ``W_hat x = T (sum_i alpha_i x_i)``: the ``in/p``-wide result goes through the tile once.
    """
    dim = dim % x.dim()
    p, lead = alpha.numel(), x.shape[:dim]
    blocks = x.reshape(math.prod(lead), p, -1)  # (n, p, K): the p blocks of every leading index
    scale = alpha if alpha.dtype == x.dtype else alpha.to(x.dtype)
    y = torch.bmm(scale.expand(blocks.shape[0], 1, p), blocks)  # (n, 1, K): one batched product, no (n, p, K) temp
    return y.view(*lead, x.shape[dim] // p, *x.shape[dim + 1 :])


def check_alpha_finite(where: str, alpha_values: torch.Tensor) -> None:
    """ValueError (prefixed by ``where``, e.g. the checkpoint key) unless every alpha is finite."""
    if not torch.isfinite(alpha_values).all():
        raise ValueError(f"{where}: alphas must be finite, got {alpha_values.tolist()[:8]}")


def check_tile_operands(
    name: str, x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int,
    row0: int,
) -> None:
    """ValueError (prefixed by the caller's ``name``) unless ``tile`` holds tile rows ``row0 .. row0 + rows`` of
    ``x``'s ``K`` values and ``bias`` has one value per output: what every tile-product kernel relies on."""
    k, p = x.shape[1], alpha.numel()
    for field, value, least in (("rows", rows, 1), ("row0", row0, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: {field} must be an int >= {least}, got {value!r}")
    if tile.dtype != torch.uint8 or tile.dim() != 1 or tile.numel() * 8 < (row0 + rows) * k:
        need = (row0 + rows) * k
        raise ValueError(
            f"{name}: tile must be 1-D uint8 holding {need} values (rows {row0} .. {row0 + rows} of {k} values), "
            f"got {tile.dtype} {tuple(tile.shape)}"
        )
    if alpha.dim() != 1 or p == 0:
        raise ValueError(f"{name}: alpha must be a non-empty 1-D tensor, got shape {tuple(alpha.shape)}")
    if bias is not None and bias.numel() != p * rows:
        raise ValueError(f"{name}: bias has {bias.numel()} values, expected p * rows = {p * rows}")
