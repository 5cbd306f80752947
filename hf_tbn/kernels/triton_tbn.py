"""Triton tile-reuse GEMM / GEMV for packed TBN layers (imported only when Triton is used).

Each program reads the packed bits of a ``BLOCK_N x K`` slice of the tile, expands them to
+-1 in registers, accumulates the ``out/p`` products once in float32 and then writes the
``p`` scaled copies plus bias from that same accumulator: the dense layer's ``N``
multiply-adds become ``N/p`` and the weight read is ``N/(8p)`` bytes. Two forms of the
products in one kernel: for ``M > 1`` they go through ``tl.dot``; for one input row (decoding)
the signs are applied to ``x`` and summed along K, with no padding of M to a 16-row dot and no
layout conversion of the expanded bits (1.4-3.8x faster at M = 1 on an H200, docs/kernels.md "GPU").

Bit order (hf_tbn.tiling): tile element ``j`` is bit ``j % 8`` of byte ``j // 8``, set = +1.
Tile row ``n`` (of ``K`` values) starts at element ``n * K``; with ``K % 8 == 0`` every row
starts on a byte, so a block loads ``BLOCK_K / 8`` bytes per row and shifts them out
(``ALIGNED``); otherwise each value's byte is gathered by its own index.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, CompiledKernel, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from ..tiling import check_tile_operands

_knobs = getattr(triton, "knobs", None)
# Triton decides interpretation when a kernel is decorated, i.e. when this module is imported.
INTERPRETED: bool = bool(_knobs.runtime.interpret) if _knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"

DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tile_linear_kernel(
    x_ptr, tile_ptr, alpha_ptr, bias_ptr, out_ptr,
    M, K, ROWS, P, ROW0,
    stride_xm, stride_xk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < ROWS
    row_start = (ROW0 + rn).to(tl.int64) * K  # tile element index of each row's first value
    if BLOCK_M == 1:  # one input row (decoding)
        acc = _row_products(x_ptr + tl.program_id(0) * stride_xm, stride_xk, tile_ptr, row_start, n_ok, K, ALIGNED,
                            BLOCK_N, BLOCK_K)[None, :]
    else:
        acc = _block_products(x_ptr, stride_xm, stride_xk, tile_ptr, rm, m_ok, row_start, n_ok, K, ALIGNED, IEEE,
                              UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = m_ok[:, None] & n_ok[None, :]
    for i in range(P):  # the p copies of the block, from the one accumulator
        y = acc * tl.load(alpha_ptr + i).to(tl.float32)
        col = i * ROWS + rn
        if HAS_BIAS:
            y += tl.load(bias_ptr + col, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm[:, None] * stride_om + col[None, :] * stride_on
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_products(x_ptr, stride_xm, stride_xk, tile_ptr, rm, m_ok, row_start, n_ok, K,
                    ALIGNED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(BLOCK_M, BLOCK_N)`` float32 products of ``x`` rows ``rm`` with tile rows at ``row_start``, by ``tl.dot``."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: a @jit library function, which
    # the interpreter cannot call if triton.language was imported before TRITON_INTERPRET was set
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x_mask = m_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk, mask=x_mask, other=0.0)
        if ALIGNED:
            bit = tl.trans(tl.reshape(_aligned_bits(tile_ptr, row_start, n_ok, k0, K, BLOCK_K), (BLOCK_N, BLOCK_K)))
        else:
            j = row_start[None, :] + k[:, None]  # (BLOCK_K, BLOCK_N) element indices
            bit = _gathered_bits(tile_ptr, j, k_ok[:, None] & n_ok[None, :])
        if UPCAST:  # interpreter only: its tl.dot multiplies bf16 operands as raw uint16 integers
            x = x.to(tl.float32)
        w = (bit * 2 - 1).to(x.dtype)  # +-1 is exact in every activation dtype
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _row_products(x_row, stride_xk, tile_ptr, row_start, n_ok, K,
                  ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(BLOCK_N,)`` float32 products of one input row with tile rows at ``row_start``: the signs applied to
    ``x`` and summed along K (no padding to a 16-row dot, no layout change of the expanded bits)."""
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if ALIGNED:  # x as (BLOCK_K / 8, 8), beside the bits' (BLOCK_N, BLOCK_K / 8, 8)
            rb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            x = tl.load(x_row + (rb[:, None] * 8 + tl.arange(0, 8)[None, :]) * stride_xk, mask=(rb < K // 8)[:, None],
                        other=0.0)
            bit = _aligned_bits(tile_ptr, row_start, n_ok, k0, K, BLOCK_K)
            xs = x.to(tl.float32)[None, :, :]
            acc += tl.reduce(tl.reduce(tl.where(bit != 0, xs, -xs), 2, _add), 1, _add)
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(x_row + k * stride_xk, mask=k_ok, other=0.0)
            j = row_start[:, None] + k[None, :]  # (BLOCK_N, BLOCK_K) element indices
            bit = _gathered_bits(tile_ptr, j, n_ok[:, None] & k_ok[None, :])
            xs = x.to(tl.float32)[None, :]
            acc += tl.reduce(tl.where(bit != 0, xs, -xs), 1, _add)
    return acc


@triton.jit
def _aligned_bits(tile_ptr, row_start, n_ok, k0, K, BLOCK_K: tl.constexpr):
    """``(BLOCK_N, BLOCK_K / 8, 8)`` bits (0 / 1) of values ``k0 ..`` of the tile rows starting (on bytes) at
    ``row_start``: ``BLOCK_K / 8`` bytes of each row, each shifted out into its 8 bits."""
    rb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    byte = tl.load(tile_ptr + row_start[:, None] // 8 + rb[None, :], mask=n_ok[:, None] & (rb[None, :] < K // 8),
                   other=0)
    return (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1


@triton.jit
def _gathered_bits(tile_ptr, j, mask):
    """Bits (0 / 1) of tile elements ``j`` (any shape), each from its own byte."""
    byte = tl.load(tile_ptr + j // 8, mask=mask, other=0)
    return (byte.to(tl.int32) >> (j % 8).to(tl.int32)) & 1


@triton.jit
def _add(a, b):  # tl.reduce's combine: tl.sum is a @jit library function, like tl.zeros above
    return a + b


Blocks = tuple[int, int, int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
FILL_PROGRAMS = 128  # programs that keep a large GPU busy (an H200 has 132 multiprocessors)


def _blocks(m: int, k: int, rows: int, dtype: torch.dtype) -> Blocks:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` for ``M`` inputs of ``K`` values and ``rows`` tile rows.

    Chosen from sweeps on an H200 (bf16, docs/kernels.md "GPU"). ``BLOCK_M == 1`` (one input
    row) selects the GEMV form: 4 tile rows a program, K steps of up to 4096 (at most 9% behind
    the best of 25 configurations on each shape swept, p = 1 and 8). Otherwise the
    largest blocks that still give ``FILL_PROGRAMS`` programs. Small M (``<= 16``) is latency bound:
    16-row N blocks, and 512-long K blocks (fewer serial steps) while the rows give fewer than
    ``2 * FILL_PROGRAMS`` programs. Larger M: 128 x 128, else 128 x 64, else 64 x 64 blocks with a
    longer K step (M = 128 ran twice as fast with them as with 128 x 128).
    """
    if m == 1:
        return 1, 4, min(4096, triton.next_power_of_2(k)), 4, 3
    block_k = 32 if dtype == torch.float32 else 64
    if m <= 16:
        long_k = triton.cdiv(rows, 16) < 2 * FILL_PROGRAMS
        return 16, 16, (8 if long_k else 4) * block_k, 4, 3
    if triton.cdiv(m, 128) * triton.cdiv(rows, 128) >= FILL_PROGRAMS:
        return 128, 128, block_k, 8, 3
    if triton.cdiv(m, 128) * triton.cdiv(rows, 64) >= FILL_PROGRAMS:
        return 128, 64, 2 * block_k, 8, 3
    return 64, 64, 2 * block_k, 8, 4


Launch = tuple[tuple[int, int], tuple, dict]  # (grid, positional arguments, keyword arguments) of a kernel launch


def _launch(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int, row0: int,
    out: torch.Tensor | None,
) -> Launch:
    """The checked launch of :func:`tile_linear` (what :func:`compile_ahead` compiles without launching)."""
    m, k = x.shape
    p = alpha.numel()
    if x.dtype not in DTYPES:
        raise ValueError(f"triton tile_linear: activations must be one of {DTYPES}, got {x.dtype}")
    check_tile_operands("triton tile_linear", x, tile, alpha, bias, rows, row0)
    if any(t.device != x.device for t in (tile, alpha, bias) if t is not None):
        raise ValueError(f"triton tile_linear: x, tile, alpha and bias must be on one device, x is on {x.device}")
    if out is None:
        out = x.new_empty(m, p * rows)
    elif out.shape != (m, p * rows):
        raise ValueError(f"triton tile_linear: out has shape {tuple(out.shape)}, expected {(m, p * rows)}")
    block_m, block_n, block_k, warps, stages = _blocks(m, k, rows, x.dtype)
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    grid = (triton.cdiv(m, block_m), triton.cdiv(rows, block_n))
    args = (
        x, tile, alpha.contiguous(), bias.contiguous() if bias is not None else alpha, out,
        m, k, rows, p, row0,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
    )
    constants = {
        "HAS_BIAS": bias is not None, "ALIGNED": k % 8 == 0, "IEEE": x.dtype == torch.float32 or upcast,
        "UPCAST": upcast, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps,
        "num_stages": stages,
    }
    return grid, args, constants


def tile_linear(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int, row0: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(M, p * rows)``: block ``i`` is ``alpha_i * x @ T.T`` (+ bias), ``T`` = tile rows ``row0 .. row0+rows``.

    ``x`` is ``(M, K)`` (any strides); ``tile`` the packed tile whose rows have ``K`` values;
    ``alpha`` the ``p`` scales of these copies; ``bias`` ``(p * rows,)`` or None; ``out`` an
    optional ``(M, p * rows)`` destination (any strides). fp32 runs the dot in IEEE fp32. No autograd
    (see :mod:`.ops`).
    """
    grid, args, constants = _launch(x, tile, alpha, bias, rows, row0, out)
    _tile_linear_kernel[grid](*args, **constants)
    return args[4]


def compile_ahead(
    target: GPUTarget, x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
    rows: int, row0: int = 0,
) -> CompiledKernel:
    """The kernel :func:`tile_linear` would launch for these operands, compiled for ``target`` without a GPU.

    ``target`` e.g. ``GPUTarget("cuda", 90, 32)``; the operands may be CPU tensors of the dtypes, shapes
    and alignment to compile for. The arguments are specialized by Triton's own launch binder (integer
    values of 1, 16-byte alignment), so the result is what a GPU would compile: its ``asm`` holds every
    stage down to ``cubin`` (ptxas ships with Triton). Uses Triton internals (``create_function_from_signature``,
    ``JITFunction._pack_args``, as of Triton 3.6-3.9); needs ``TRITON_INTERPRET`` unset when Triton is imported.
    """
    if not isinstance(_tile_linear_kernel, JITFunction):
        raise RuntimeError("compile_ahead: the kernel is interpreted (TRITON_INTERPRET=1); run it in a process without")
    _, args, constants = _launch(x, tile, alpha, bias, rows, row0, None)
    backend = make_backend(target)
    kernel = _tile_linear_kernel
    bound, specialization, extra = create_function_from_signature(kernel.signature, kernel.params, backend)(
        *args, **constants
    )
    options, signature, constexprs, attrs = kernel._pack_args(backend, constants, bound, specialization, extra)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)
