"""Random packed tiles and the float64 reference every tile-product kernel is checked against."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_tbn import tiling

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def random_tile(rows: int, k: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed bits of a ``rows x k`` tile, ``p`` positive scales and a ``p * rows`` bias."""
    g = torch.Generator().manual_seed(seed)
    bits = tiling.pack_bits(torch.randn(rows * k, generator=g))
    return bits, torch.rand(p, generator=g) + 0.1, torch.randn(p * rows, generator=g)


def reference(
    x: torch.Tensor, bits: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int, row0: int = 0
) -> torch.Tensor:
    """``(M, p * rows)`` in float64: tile rows ``row0 .. row0 + rows`` applied to ``x``, ``p`` scaled copies."""
    k = x.shape[1]
    t = tiling.unpack_bits(bits, bits.numel() * 8, torch.float64)[: bits.numel() * 8 // k * k].view(-1, k)
    t = t[row0 : row0 + rows]
    return tiling.tiled_outputs(x.double() @ t.t(), alpha.double(), bias=None if bias is None else bias.double())


def strided_row_offset_output(launcher: Callable[..., torch.Tensor], dtype: torch.dtype, rows: int, k: int, row0: int,
                              p: int, m: int, seed: int) -> torch.Tensor:
    """``launcher`` on a non-contiguous ``(m, k)`` input, tile rows from ``row0``, no bias; checked against the
    reference, returned for further checks."""
    bits, alpha, _ = random_tile(row0 + rows + 2, k, p, seed=seed)
    x = torch.randn(k, m).to(dtype).t()  # (m, K), not contiguous
    y = launcher(x, bits, alpha, None, rows, row0)
    assert rel_err(y, reference(x, bits, alpha, None, rows, row0)) < TOL[dtype]
    return y
