"""The kernels as torch custom ops: registration checks, and packed models under ``torch.compile(fullgraph=True)``.

``fullgraph=True`` turns any graph break into an error, so a test that compiles with it proves there
is none. Inductor compiles take minutes on 2 shared cores: the whole-model inductor runs are marked
slow, one model each; the other checks use the ``aot_eager`` backend (dynamo and AOTAutograd with
the fake implementations, no code generation). SmolLM2 is compiled by ``scripts/bench_cpu.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from kernel_reference import random_tile, rel_err
from torch import nn
from transformers import AutoModel, AutoTokenizer, LlamaForCausalLM

from hf_tbn import TBNConfig, convert_model, pack_model

os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernel module is first imported (as tests/test_kernels.py)
from hf_tbn.kernels import backends, ops  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test compiles from scratch: the parametrized tests compile the same layer forwards, and dynamo's
    per-code-object cache would otherwise reach its recompile limit (8) and fail a fullgraph compile."""
    torch._dynamo.reset()


def packed(model: nn.Module, backend: str = "auto", p: int = 4, layout: str = "output") -> nn.Module:
    convert_model(model, TBNConfig(compression_factor=p, min_compress_size=0, backend=backend, tile_layout=layout))
    return pack_model(model).eval()


@pytest.mark.parametrize("op", [ops.tile_linear_native, ops.tile_linear_triton], ids=["native", "triton"])
@pytest.mark.parametrize("bias", [True, False])
def test_custom_ops_pass_torch_opcheck(op: torch.library.CustomOpDef, bias: bool) -> None:
    """Schema, fake implementation, autograd registration and AOT dispatch, as torch itself checks them."""
    tile, alpha, b = random_tile(12, 16, 2, seed=3)
    x = torch.randn(3, 16, requires_grad=True)
    torch.library.opcheck(op, (x, tile, alpha, b[:10].clone().requires_grad_() if bias else None, 5, 7))


def test_gradients_through_the_op_match_the_torch_path() -> None:
    tile, alpha, bias = random_tile(9, 24, 4, seed=1)
    grads = {}
    for name in ("native", "torch"):
        x, b = torch.randn(5, 24, generator=torch.Generator().manual_seed(0), requires_grad=True), bias[:20].clone()
        b.requires_grad_()
        y = backends.BACKENDS[name].linear(x, tile, alpha, b, 5, 4)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        grads[name] = (x.grad, b.grad)
    for got, want in zip(grads["native"], grads["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 5 * 5, 32), nn.ReLU(), nn.Linear(32, 8)
    )


@pytest.mark.parametrize("layout", ["output", "input"])
@pytest.mark.parametrize("backend", ["auto", "torch", "native", "triton"])
def test_packed_net_compiles_whole_with_gradients(backend: str, layout: str) -> None:
    """Forward and backward of convs and linears on each backend and tile layout, one graph each way (aot_eager)."""
    net = packed(small_net(), backend, p=2, layout=layout)
    x = torch.randn(2, 16, 5, 5)
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = net(eager_x)
    expected.square().sum().backward()
    eager_grads = [eager_x.grad] + [param.grad.clone() for param in net.parameters()]
    net.zero_grad()
    got = torch.compile(net, fullgraph=True, backend="aot_eager")(compiled_x)
    got.square().sum().backward()
    assert rel_err(got, expected) < 1e-5
    compiled_grads = [compiled_x.grad] + [param.grad for param in net.parameters()]
    for eager_grad, grad in zip(eager_grads, compiled_grads, strict=True):
        assert rel_err(grad, eager_grad) < 1e-5


def test_resolution_is_not_traced_and_auto_warns_once_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The availability checks run eagerly (not in the graph) also while compiling, with the fallback warning."""
    monkeypatch.setattr(backends.native, "native_error", lambda: "no C compiler found (test)")
    warned = []
    monkeypatch.setattr(backends, "_warn_native_unavailable", warned.append)
    layer = packed(nn.Sequential(nn.Linear(16, 8)), p=2)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))
    assert warned[0] == "no C compiler found (test)"


@pytest.mark.slow
def test_tiny_llama_compiles_whole_logits_match(tiny_llama_dir: Path) -> None:
    model = packed(LlamaForCausalLM.from_pretrained(tiny_llama_dir))
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, fullgraph=True)(ids).logits
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize(("fmt", "tol"), [("int8", 1e-5), ("int4", 1e-2)])  # int4 eager: bfloat16 activations
def test_compressed_head_compiles_whole(fmt: str, tol: float, tiny_llama_dir: Path) -> None:
    """A compressed embedding and tied head (hf_tbn.embeddings) compile too: the int8 kernel as a custom op,
    int4 on the blocked torch path; decoding (1 token) and a prompt."""
    from hf_tbn.embeddings import compress_dense_modules

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    convert_model(model, TBNConfig(min_compress_size=0, modules_to_not_convert=["lm_head"]))
    pack_model(model).eval()
    compress_dense_modules(model, fmt)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for shape in [(1, 1), (2, 11)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert rel_err(compiled(ids).logits, model(ids).logits) < tol


@pytest.mark.slow
def test_minilm_compiles_whole_outputs_match(minilm_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = packed(AutoModel.from_pretrained(minilm_dir))
    sentences = ["a packed sentence", "and a second, longer one to pad the first"]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        got = torch.compile(model, fullgraph=True)(**batch).last_hidden_state
    assert rel_err(got, expected) < 1e-5
