#!/usr/bin/env python
"""GPU check of the Triton TBN kernels: correctness, then speed against cuBLAS bf16 (< 5 min on an H200).

1. Correctness: every kernel configuration (fp32 / bf16 / fp16, rows byte-aligned or not,
   decode and GEMM block shapes, p = 1..16, with and without bias, tile row offsets) against
   a float64 torch reference on fresh random inputs, into a NaN-poisoned output (M = 1 runs the
   GEMV form, larger M the GEMM form); then packed
   Linear / Conv2d layers through backend "triton" against backend "torch". Tolerances:
   fp32 1e-5, bf16 / fp16 1e-2 relative to the largest output. Any FAIL exits non-zero.
2. Speed (CUDA only): the measured ceilings (device-to-device copy bandwidth, bf16 cuBLAS
   matmul at 8192^3), then for each shape (in x out), M and p the medians (triton's
   ``do_bench``, L2 flushed between runs) of torch's bf16 matmul on the dense equivalent, the
   TBN kernel, and our p = 1 binary kernel, with achieved GB/s (bytes actually moved) and
   TFLOP/s (dense-equivalent 2*M*in*out / time) and the issue's targets; beside them the torch
   backend on the same GPU (the tile expanded to bf16 signs, then cuBLAS on ``out/p`` rows).
   Decode sizes (M = 1, 16) again as chains of layers on distinct weights, each chain one CUDA
   graph: a single small call measures launch latency, and a repeated one reads a cached tile.
   At M = 1 beside them the GEMM form's decode blocks on the same call (what the GEMV form replaced).
3. A tiny Llama through a user's path on the device: ``from_pretrained`` with a ``TBNConfig``,
   ``Trainer`` steps, packed, saved, loaded again; logits of the "triton" backend against
   "torch", and ``generate``.
4. ``--sweep`` (CUDA only): each candidate block configuration timed per shape and M (bf16,
   p = 8; M = 1 in chains, at p = 1 and 8), printing the heuristic's time and the best three, to
   tune ``triton_tbn._blocks``.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set before
triton is imported); ``--quick`` uses tiny shapes so CI can run it on CPU. On a GPU machine
without network: ``USE_HUB_KERNELS=0 PYTHONPATH=. python scripts/bench_gpu.py`` (docs/kernels.md "GPU").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import triton  # noqa: E402

import hf_tbn  # noqa: E402
from hf_tbn import tiling  # noqa: E402
from hf_tbn.kernels import torch_path, triton_tbn  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SHAPES = [(4096, 4096), (4096, 14336), (8192, 28672)]  # (in, out): Llama-3-8B attention / MLP, Llama-70B MLP
CHAIN_BYTES = 256 << 20  # weights streamed per timed decode chain: over 4x the H200's 60 MB L2
# Candidate (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for --sweep: M = 1 (GEMV), M <= 16 and GEMM sizes.
DECODE_BLOCKS = [(16, n, k, w, s) for n in (16, 32, 64) for k in (128, 256, 512) for w, s in ((4, 3), (4, 4), (2, 3))]
GEMV_BLOCKS = [(1, n, k, w, 3) for n in (4, 8, 16) for k in (1024, 2048, 4096) if n * k <= 32768 for w in (2, 4, 8)]
GEMM_BLOCKS = [(bm, bn, k, w, s) for bm, bn in ((64, 64), (64, 128), (128, 64), (128, 128), (128, 256))
               for k in (64, 128) for w, s in ((4, 3), (8, 3), (8, 4))]


def random_case(m: int, k: int, rows: int, p: int, dtype: torch.dtype, device: str, row0: int = 0):
    bits = tiling.pack_bits(torch.randn((row0 + rows) * k, device=device))
    alpha = torch.rand(p, device=device) + 0.1
    bias = torch.randn(p * rows, device=device, dtype=dtype)
    return torch.randn(m, k, device=device).to(dtype), bits, alpha, bias


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest deviation from ``ref``, relative to ``ref``'s largest value (in float64)."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def reference(x, bits, alpha, bias, rows, row0=0):  # noqa: ANN001, ANN201
    k = x.shape[1]
    t = tiling.unpack_bits(bits, bits.numel() * 8, torch.float64)[row0 * k : (row0 + rows) * k].view(rows, k)
    b = None if bias is None else bias.double()
    return tiling.tiled_outputs(x.double() @ t.t(), alpha.double(), bias=b)


def check_kernels(device: str, quick: bool) -> list[str]:
    """Kernel vs float64 reference on every configuration; returns the failures."""
    ms = [1, 3, 64] if quick else [1, 3, 64, 300]
    ps = [1, 4, 8] if quick else [1, 2, 4, 8, 16]
    shapes = [(37, 19, 0), (64, 9, 2)] if quick else [(37, 19, 0), (64, 9, 2), (1000, 77, 5), (4096, 512, 0)]
    failures = []
    print(f"{'M':>4} {'K':>5} {'rows':>5} {'row0':>4} {'p':>3} {'dtype':>9} {'bias':>5} {'rel err':>9}  result")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in ms:
            for i, p in enumerate(ps):
                k, rows, row0 = shapes[(i + m) % len(shapes)]
                with_bias = (i + m) % 2 == 0
                x, bits, alpha, bias = random_case(m, k, rows, p, dtype, device, row0)
                bias = bias if with_bias else None
                out = torch.full((m, p * rows), float("nan"), device=device, dtype=dtype)
                triton_tbn.tile_linear(x, bits, alpha, bias, rows, row0, out=out)
                ref = reference(x, bits, alpha, bias, rows, row0)
                err = rel_err(out, ref)
                ok = not out.isnan().any().item() and err < TOL[dtype]
                name = f"{m:>4} {k:>5} {rows:>5} {row0:>4} {p:>3} {str(dtype)[6:]:>9} {str(with_bias):>5} {err:>9.2e}"
                print(f"{name}  {'ok' if ok else 'FAIL'}", flush=True)
                if not ok:
                    failures.append(name)
    return failures


def check_layers(device: str) -> list[str]:
    """Packed Linear / Conv2d layers: backend "triton" against backend "torch" on the same device."""
    torch.manual_seed(0)
    cases = [
        ("linear", hf_tbn.TBNLinear(96, 64, compression_factor=4), (2, 5, 96)),
        ("conv2d", hf_tbn.TBNConv2d(8, 16, 3, stride=2, padding=1, compression_factor=8), (2, 8, 9, 9)),
        ("conv2d-groups", hf_tbn.TBNConv2d(8, 8, 3, padding="same", groups=4, compression_factor=2), (1, 8, 6, 6)),
        ("conv1d", hf_tbn.TBNConv1d(6, 12, 5, dilation=2, compression_factor=4), (2, 6, 20)),
    ]
    failures = []
    for name, layer, shape in cases:
        layer = layer.pack().to(device)
        x = torch.randn(shape, device=device)
        outputs = {}
        with torch.no_grad():
            for backend in ("torch", "triton"):
                layer.backend = backend
                outputs[backend] = layer(x)
        err = rel_err(outputs["triton"], outputs["torch"])
        ok = err < TOL[torch.float32]
        print(f"layer {name:<14} triton vs torch rel err {err:.2e}  {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(name)
    return failures


def check_model(device: str) -> list[str]:
    """A tiny Llama through a user's path on ``device``: quantized load, Trainer, pack, save, load, generate."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 256, (16, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(cfg).save_pretrained(f"{folder}/fp")
        model = AutoModelForCausalLM.from_pretrained(
            f"{folder}/fp", quantization_config=hf_tbn.TBNConfig(compression_factor=4), device_map=device
        )
        args = TrainingArguments(f"{folder}/run", max_steps=4, per_device_train_batch_size=8, report_to=[],
                                 save_strategy="no", use_cpu=device == "cpu")
        loss = Trainer(model=model, args=args, train_dataset=data).train().training_loss
        hf_tbn.pack_model(model)
        model.save_pretrained(f"{folder}/packed")
        model = AutoModelForCausalLM.from_pretrained(f"{folder}/packed", device_map=device)
        x = ids[:2].to(device)
        with torch.no_grad():
            logits = {b: hf_tbn.set_backend(model, b)(x).logits for b in ("torch", "triton")}
            prompt = x[:, :4]
            tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        half = AutoModelForCausalLM.from_pretrained(f"{folder}/packed", device_map=device, dtype=torch.bfloat16)
        with torch.no_grad():
            half_logits = {b: hf_tbn.set_backend(half, b)(x).logits for b in ("torch", "triton")}
    err = rel_err(logits["triton"], logits["torch"])
    # bf16 logits: each backend rounds every layer's output to bf16, so they differ by more than one kernel call
    half_err = rel_err(half_logits["triton"], half_logits["torch"])
    ok = err < TOL[torch.float32] and half_err < 5e-2 and tokens.shape == (2, 10) and loss == loss
    print(f"model tiny Llama p=4 on {device}: Trainer loss {loss:.3f}, packed reload triton vs torch rel err "
          f"{err:.2e} (bf16 {half_err:.2e}), generate {tuple(tokens.shape)}  {'ok' if ok else 'FAIL'}")
    return [] if ok else ["model"]


def median_ms(fn, rep: int = 100) -> float:  # noqa: ANN001
    return triton.testing.do_bench(fn, warmup=rep // 4, rep=rep, return_mode="median")


def ceilings() -> tuple[float, float]:
    """Measured device-to-device copy bandwidth (GB/s) and bf16 cuBLAS throughput (TFLOP/s)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_tflops = 2 * 8192**3 / median_ms(lambda: a @ a) / 1e9
    return copy_gbs, mm_tflops


def chain_ms(calls: list[Callable[[], object]]) -> float:
    """ms per call of ``calls`` (each on its own weights) replayed as one CUDA graph: no launch gaps, no L2 reuse."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:  # compiles and warms up outside the capture
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_ms(graph.replay) / len(calls)


def distinct_tiles(d_in: int, rows: int) -> list[torch.Tensor]:
    """Packed tiles of ``rows x d_in`` bits on distinct memory, enough for one decode chain (at least 4)."""
    tile_bytes = rows * d_in // 8
    n = min(4096, max(4, -(-CHAIN_BYTES // tile_bytes)))
    return [torch.randint(0, 256, (tile_bytes,), dtype=torch.uint8, device="cuda") for _ in range(n)]


def tbn_chain_ms(x: torch.Tensor, tiles: list[torch.Tensor], alpha: torch.Tensor, rows: int,
                 blocks: triton_tbn.Blocks | None = None) -> float:
    """:func:`chain_ms` of the TBN kernel over ``tiles``, with ``blocks`` in place of ``_blocks``' choice if given."""
    calls = [lambda t=t: triton_tbn.tile_linear(x, t, alpha, None, rows) for t in tiles]
    if blocks is None:
        return chain_ms(calls)
    with mock.patch.object(triton_tbn, "_blocks", lambda *_: blocks):  # the launches are recorded in the capture
        return chain_ms(calls)


def decode_table(shapes: list[tuple[int, int]], ms: list[int], ps: list[int]) -> list[str]:
    """Markdown table of decode-sized calls timed in chains on distinct weights; returns the target line."""
    print(f"\ndecode, chained: ms per call, each timed call one CUDA graph of layers on distinct weights "
          f"(>= {CHAIN_BYTES >> 20} MB, over 4x the L2)")
    print("| in x out | M | p | cuBLAS bf16 ms | TBN ms | x cuBLAS | cuBLAS GB/s | TBN GB/s | GEMM form ms (M = 1) |")
    print("|---|---|---|---|---|---|---|---|---|")
    targets = []
    for d_in, d_out in shapes:
        for m in ms:
            x = torch.randn(m, d_in, device="cuda", dtype=torch.bfloat16)
            n = max(4, -(-CHAIN_BYTES // (2 * d_in * d_out)))
            weights = [torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
            dense = chain_ms([lambda w=w: x @ w.t() for w in weights])  # noqa: B023
            del weights
            for p in ps:
                rows = d_out // p
                tiles = distinct_tiles(d_in, rows)
                alpha = torch.rand(p, device="cuda")
                tbn = tbn_chain_ms(x, tiles, alpha, rows)
                gemm = "-"
                if m == 1:
                    gemm = f"{tbn_chain_ms(x, tiles, alpha, rows, triton_tbn._blocks(2, d_in, rows, x.dtype)):.4f}"
                io = 2 * m * (d_in + d_out)
                print(f"| {d_in}x{d_out} | {m} | {p} | {dense:.4f} | {tbn:.4f} | {dense / tbn:.2f} | "
                      f"{(2 * d_in * d_out + io) / dense / 1e6:.0f} | {(tiles[0].numel() + io) / tbn / 1e6:.0f} | "
                      f"{gemm} |", flush=True)
                if (d_in, d_out, m, p) == (4096, 14336, 1, 8):
                    targets.append(f"M=1 p=8 4096x14336, chained: x{dense / tbn:.2f} cuBLAS bf16 (target >= 5)")
    return targets


def speed_table(shapes: list[tuple[int, int]], ms: list[int], ps: list[int]) -> list[str]:
    """Markdown table of cuBLAS bf16 vs the TBN kernel; returns the target lines."""
    copy_gbs, mm_tflops = ceilings()
    print(f"\nceilings: copy {copy_gbs:.0f} GB/s, bf16 cuBLAS matmul {mm_tflops:.0f} TFLOP/s (8192^3)")
    print("| in x out | M | p | cuBLAS bf16 ms | TBN ms | x cuBLAS | x p=1 kernel | TBN GB/s | TBN TFLOP/s dense-eq "
          "| torch backend ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    targets = []
    for d_in, d_out in shapes:
        w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, d_in, device="cuda", dtype=torch.bfloat16)
            dense = median_ms(lambda: x @ w.t())  # noqa: B023
            times, torch_times = {}, {}
            for p in sorted(set(ps) | {1}):
                rows = d_out // p
                bits = tiling.pack_bits(torch.randn(rows * d_in, device="cuda"))
                alpha = torch.rand(p, device="cuda")
                times[p] = median_ms(lambda: triton_tbn.tile_linear(x, bits, alpha, None, rows))  # noqa: B023
                torch_times[p] = median_ms(lambda: torch_path.tile_linear(x, bits, alpha, None, rows))  # noqa: B023
            for p in ps:
                moved = 2 * m * d_in + d_in * d_out // (8 * p) + 2 * m * d_out
                flops = 2 * m * d_in * d_out
                print(f"| {d_in}x{d_out} | {m} | {p} | {dense:.4f} | {times[p]:.4f} | {dense / times[p]:.2f} | "
                      f"{times[1] / times[p]:.2f} | {moved / times[p] / 1e6:.0f} | {flops / times[p] / 1e9:.1f} | "
                      f"{torch_times[p]:.4f} |", flush=True)
                if (d_in, d_out, m, p) == (4096, 14336, 1, 8):
                    targets.append(f"M=1 p=8 4096x14336: x{dense / times[p]:.2f} cuBLAS bf16 (target >= 5)")
                if m == 2048 and p == 8:
                    goal = f"target >= {0.6 * p:.1f}"
                    targets.append(f"M=2048 p=8 {d_in}x{d_out}: x{dense / times[p]:.2f} cuBLAS bf16 ({goal})")
    return targets


def sweep(shapes: list[tuple[int, int]], ms: list[int], p: int) -> None:
    """Times every candidate block configuration (bf16) per shape and M; prints the heuristic's and the best three.

    M = 1 (the GEMV form) is timed in decode chains at p = 1 and ``p``; other M as single calls at ``p``.
    """
    print("\nblock sweep, bf16: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) ms")
    for d_in, d_out in shapes:
        for m in ms:
            x = torch.randn(m, d_in, device="cuda", dtype=torch.bfloat16)
            for q in (1, p) if m == 1 else (p,):
                rows = d_out // q
                alpha = torch.rand(q, device="cuda")
                current = triton_tbn._blocks(m, d_in, rows, x.dtype)
                candidates = GEMV_BLOCKS if m == 1 else DECODE_BLOCKS if m <= 16 else GEMM_BLOCKS
                if m == 1:
                    tiles = distinct_tiles(d_in, rows)
                else:
                    tiles = [tiling.pack_bits(torch.randn(rows * d_in, device="cuda"))]
                timed = {}
                for blocks in dict.fromkeys([current, *candidates]):
                    try:
                        if m == 1:
                            timed[blocks] = tbn_chain_ms(x, tiles, alpha, rows, blocks)
                        else:
                            with mock.patch.object(triton_tbn, "_blocks", lambda *_, b=blocks: b):
                                timed[blocks] = median_ms(
                                    lambda: triton_tbn.tile_linear(x, tiles[0], alpha, None, rows), 40)  # noqa: B023
                    except triton.runtime.errors.OutOfResources:
                        continue
                best = sorted(timed, key=timed.get)[:3]
                print(f"{d_in}x{d_out} M={m} p={q}: heuristic {current} {timed[current]:.4f}; best "
                      + ", ".join(f"{b} {timed[b]:.4f}" for b in best), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny correctness shapes (CI on CPU), small table")
    parser.add_argument("--sweep", action="store_true", help="also time candidate block shapes (CUDA only)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter"
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}")
    failures = check_kernels(device, args.quick) + check_layers(device)
    failures += check_model(device)
    print(f"correctness: {'all ok' if not failures else f'{len(failures)} FAIL'}")
    if device == "cuda":
        shapes, ms = (SHAPES[:1], [1, 2048]) if args.quick else (SHAPES, [1, 16, 128, 2048])
        for line in speed_table(shapes, ms, [1, 4, 8]) + decode_table(shapes, [1, 16], [1, 4, 8]):
            print("target:", line)
        if args.sweep:
            sweep(shapes, ms, 8)
    else:
        print("speed table: skipped (needs a CUDA GPU; interpreted timings mean nothing)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
