"""Kernels and backend dispatch: the Triton kernel (interpreted on CPU) and the torch path against a float64 reference.

Triton decides whether to interpret when a kernel is decorated (and checks again at launch),
so ``TRITON_INTERPRET=1`` is set before the kernel module is imported; the error a CPU tensor
gets without the interpreter is checked in a fresh subprocess.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_reference import TOL, random_tile, reference, rel_err, strided_row_offset_output
from torch import nn

from hf_tbn import TBNConfig, TBNConv1d, TBNConv2d, TBNLinear, convert_model, pack_model, tiling
from hf_tbn.kernels import torch_path

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported; triton reads it at launch too
from hf_tbn.kernels import conv, triton_tbn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_is_interpreted() -> None:
    assert triton_tbn.INTERPRETED


# Ragged shapes: K = 37 / 45 (rows not byte-aligned), 72 / 150 (aligned, several K blocks);
# rows 5 / 19 / 33 (edges of the 32-row N block). Every p of the issue at every M.
@pytest.mark.parametrize("m", [1, 3, 64])
@pytest.mark.parametrize("p", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_writes_every_output_and_matches(m: int, p: int, dtype: torch.dtype) -> None:
    k, rows = [(37, 33), (72, 5), (150, 19), (45, 19), (72, 33)][[1, 2, 4, 8, 16].index(p)]
    bits, alpha, bias = random_tile(rows, k, p, seed=m * 100 + p)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(p)).to(dtype)
    buffer = torch.full((m, p * rows + 2), float("nan"), dtype=dtype)  # poisoned, one guard column each side
    out = buffer[:, 1:-1]
    assert triton_tbn.tile_linear(x, bits, alpha, bias, rows, out=out) is out
    assert not out.isnan().any(), "some outputs were never written"
    assert buffer[:, 0].isnan().all() and buffer[:, -1].isnan().all(), "the kernel wrote outside its output"
    assert rel_err(out, reference(x, bits, alpha, bias, rows)) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 5])  # the GEMV and the GEMM form
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernel_strided_input_no_bias_row_offset(dtype: torch.dtype, m: int) -> None:
    strided_row_offset_output(triton_tbn.tile_linear, dtype, rows=6, k=40, row0=3, p=2, m=m, seed=7)


@pytest.mark.parametrize("k", [37, 72])
def test_only_one_input_row_takes_the_gemv_form(k: int) -> None:  # so the M = 1 cases above test it
    bits, alpha, bias = random_tile(40, k, 4, seed=0)
    block_m = {m: triton_tbn._launch(torch.randn(m, k), bits, alpha, bias, 40, 0, None)[2]["BLOCK_M"] for m in (1, 2)}
    assert block_m[1] == 1 and block_m[2] > 1


def test_kernel_rejects_bad_arguments() -> None:
    bits, alpha, bias = random_tile(4, 16, 2, seed=0)
    with pytest.raises(ValueError, match="activations must be one of"):
        triton_tbn.tile_linear(torch.randn(2, 16, dtype=torch.float64), bits, alpha, bias, 4)
    with pytest.raises(ValueError, match="tile must be 1-D uint8 holding 80 values"):
        triton_tbn.tile_linear(torch.randn(2, 16), bits, alpha, bias, 5)
    with pytest.raises(ValueError, match="must be on one device, x is on meta"):
        triton_tbn.tile_linear(torch.randn(2, 16, device="meta"), bits, alpha, bias, 4)
    with pytest.raises(ValueError, match="bias has 8 values, expected p \\* rows = 6"):
        triton_tbn.tile_linear(torch.randn(2, 16), bits, alpha[:1].repeat(2), bias, 3)


@pytest.mark.parametrize("m", [1, 3, 64])
@pytest.mark.parametrize("k, rows", [(37, 5), (64, 40), (96, 200)])
def test_torch_path_matches(m: int, k: int, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both torch strategies (byte table for a few rows, expanded tile in row chunks) are exact in fp32."""
    monkeypatch.setattr(torch_path, "CHUNK_VALUES", 1000)  # several ragged chunks
    bits, alpha, bias = random_tile(rows, k, 4, seed=k + m)
    x = torch.randn(m, k)
    assert rel_err(torch_path.tile_linear(x, bits, alpha, bias, rows), reference(x, bits, alpha, bias, rows)) < 1e-5


@pytest.mark.parametrize("m", [1, 16])
def test_torch_path_bf16(m: int) -> None:
    bits, alpha, bias = random_tile(40, 64, 2, seed=m)
    x = torch.randn(m, 64).bfloat16()
    y = torch_path.tile_linear(x, bits, alpha, bias, 40)
    assert y.dtype == torch.bfloat16 and rel_err(y, reference(x, bits, alpha, bias, 40)) < 1e-2


def test_unpack_range_matches_unpack_bits() -> None:
    bits = tiling.pack_bits(torch.randn(61))
    for start, length in [(0, 61), (3, 50), (8, 16), (13, 1)]:
        expected = tiling.unpack_bits(bits, 61)[start : start + length]
        assert torch.equal(tiling.unpack_range(bits, start, length, torch.float32), expected)


def packed_layers() -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Packed layers of every kind with the options the conv paths treat differently."""
    torch.manual_seed(0)
    cases = [
        ("linear", TBNLinear(40, 24, compression_factor=4), torch.randn(2, 3, 40)),
        ("linear-nobias-aligned", TBNLinear(64, 48, bias=False, compression_factor=8), torch.randn(5, 64)),
        ("conv2d", TBNConv2d(6, 8, 3, stride=2, padding=1, compression_factor=4), torch.randn(2, 6, 7, 9)),
        ("conv2d-dilated-same", TBNConv2d(4, 8, (3, 2), padding="same", dilation=(2, 1), compression_factor=2),
         torch.randn(1, 4, 6, 5)),
        ("conv2d-groups<p", TBNConv2d(4, 8, 3, groups=2, compression_factor=4), torch.randn(2, 4, 5, 5)),
        ("conv2d-groups>p", TBNConv2d(8, 8, 1, groups=4, compression_factor=2), torch.randn(1, 8, 3, 4)),
        ("conv2d-unbatched", TBNConv2d(3, 4, 2, compression_factor=2), torch.randn(3, 4, 4)),
        ("conv1d", TBNConv1d(5, 12, 3, padding=2, compression_factor=3), torch.randn(2, 5, 11)),
        # Tile rows of whole bytes (8 * 3 * 3 and 8 * 2 values): the compiled CPU kernel takes these too.
        ("conv2d-bytes", TBNConv2d(8, 16, 3, padding=1, compression_factor=4), torch.randn(2, 8, 5, 6)),
        ("conv1d-bytes-groups", TBNConv1d(16, 12, 2, groups=2, compression_factor=4), torch.randn(3, 16, 7)),
        # The input layout: the alpha-weighted input blocks through one (out, in/p, ...) tile.
        ("linear-input", TBNLinear(40, 24, compression_factor=4, tile_layout="input"), torch.randn(2, 3, 40)),
        ("linear-input-bytes", TBNLinear(64, 12, compression_factor=8, tile_layout="input"), torch.randn(5, 64)),
        ("conv2d-input", TBNConv2d(8, 6, 3, stride=2, padding=1, compression_factor=4, tile_layout="input"),
         torch.randn(2, 8, 7, 9)),
        ("conv2d-input-unbatched", TBNConv2d(4, 3, 2, compression_factor=2, tile_layout="input"), torch.randn(4, 4, 4)),
        ("conv1d-input-bytes", TBNConv1d(16, 5, 4, compression_factor=2, tile_layout="input"), torch.randn(3, 16, 9)),
    ]
    return [(name, layer.pack(), x) for name, layer, x in cases]


def backends_for(layer: nn.Module) -> tuple[str, ...]:
    """Every backend that runs ``layer`` on CPU: the compiled kernel only for tile rows of whole bytes."""
    return ("torch", "triton", "native") if math.prod(layer.tile_shape[1:]) % 8 == 0 else ("torch", "triton")


@pytest.mark.parametrize("name, layer, x", packed_layers(), ids=lambda v: v if isinstance(v, str) else "")
def test_layers_agree_across_backends(name: str, layer: nn.Module, x: torch.Tensor) -> None:
    expected = layer.dense_module()(x).detach()  # the dense layer holding W_hat
    outputs = {}
    for backend in backends_for(layer):
        layer.backend = backend
        outputs[backend] = layer(x).detach()
        assert outputs[backend].shape == expected.shape, backend
        assert rel_err(outputs[backend], expected.double()) < 1e-5, backend
    for backend, y in outputs.items():
        torch.testing.assert_close(y, outputs["torch"], rtol=1e-5, atol=1e-5, msg=backend)


@pytest.mark.parametrize("name, layer, x", packed_layers()[::2], ids=lambda v: v if isinstance(v, str) else "")
def test_gradients_agree_across_backends(name: str, layer: nn.Module, x: torch.Tensor) -> None:
    """Training through a packed layer (e.g. adapters before it) gets the same grads on both paths."""
    grads = {}
    grad_out = torch.randn_like(layer(x))
    for backend in backends_for(layer):
        layer.backend = backend
        xg = x.clone().requires_grad_()
        layer.zero_grad()
        (layer(xg) * grad_out).sum().backward()
        grads[backend] = (xg.grad, None if layer.bias is None else layer.bias.grad.clone())
    for backend, (grad_x, grad_bias) in grads.items():
        torch.testing.assert_close(grad_x, grads["torch"][0], rtol=1e-5, atol=1e-5, msg=backend)
        if layer.bias is not None:
            torch.testing.assert_close(grad_bias, grads["torch"][1], rtol=1e-5, atol=1e-5, msg=backend)


def test_group_blocks_cover_every_channel_once() -> None:
    for out, p, groups in [(8, 4, 2), (8, 2, 4), (12, 3, 3), (16, 16, 1), (16, 1, 16)]:
        rows = out // p
        channels = [(first + c) * rows + row0 + r for first, copies, row0, n in conv.group_blocks(out, p, groups)
                    for c in range(copies) for r in range(n)]
        assert sorted(channels) == list(range(out)), (out, p, groups)


def test_backend_from_config_and_bad_value() -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    convert_model(model, TBNConfig(compression_factor=2, min_compress_size=0, backend="torch"))
    pack_model(model)
    assert model[0].backend == "torch"
    model[0].backend = "cuda"
    with pytest.raises(ValueError, match="0: backend must be one of .* got 'cuda'"):
        model(torch.randn(1, 16))


def run_python(code: str, env_update: dict[str, str | None], cwd: Path) -> subprocess.CompletedProcess:
    """``python -c code`` from an empty folder (the repository root would shadow the ``kernels`` name)."""
    env = {k: v for k, v in os.environ.items() if k not in env_update}
    env.update({k: v for k, v in env_update.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(tmp_path: Path) -> None:
    code = (
        "import torch, hf_tbn\n"
        "layer = hf_tbn.TBNLinear(16, 8, compression_factor=2, name='fc').pack()\n"
        "layer.backend = 'auto'; layer(torch.randn(1, 16))\n"  # auto on CPU: the torch path, no error
        "layer.backend = 'triton'\n"
        "try:\n    layer(torch.randn(1, 16))\nexcept ValueError as e:\n    print(e)\n"
    )
    result = run_python(code, {"TRITON_INTERPRET": None}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fc: backend='triton' got a cpu tensor" in result.stdout and "TRITON_INTERPRET=1" in result.stdout


def test_hf_tbn_works_without_triton(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # as if triton were not installed
        "import torch, hf_tbn\n"
        "layer = hf_tbn.TBNLinear(16, 8, compression_factor=2, name='fc').pack()\n"
        "layer(torch.randn(1, 16))\n"
        "layer.backend = 'triton'\n"
        "try:\n    layer(torch.randn(1, 16))\nexcept ValueError as e:\n    print(e)\n"
        "assert 'triton' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
    )
    result = run_python(code, {}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fc: backend='triton' needs the triton package" in result.stdout


@pytest.mark.parametrize("script", ["bench_cpu.py", "bench_gpu.py"])
def test_bench_scripts_quick(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--quick"], capture_output=True, text=True, timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAIL" not in result.stdout
