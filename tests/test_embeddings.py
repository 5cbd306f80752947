"""Compressed embeddings and heads (hf_tbn.embeddings): codes, lookups, heads, ties, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_layers import AllocationRecorder
from torch import nn
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_tbn import embeddings
from hf_tbn.embeddings import (
    EMBEDDING_FORMATS,
    CompressedEmbedding,
    CompressedLinear,
    TiedCompressedLinear,
    compress_dense_modules,
    dequantize,
    init_compressed_modules,
    quantize,
)

INT_FORMATS = ["int8", "int4"]


def weight_with_edge_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random rows of varied magnitude, plus a row of zeros and a row of tiny values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.2
    w[0] = 0
    w[1] *= 1e-6
    return w


def step(scale: torch.Tensor, fmt: str, cols: int) -> torch.Tensor:
    """Each weight's quantization step (its row's or group's scale), as a ``(rows, cols)`` float32 tensor."""
    if fmt == "int8":
        return scale.float().unsqueeze(-1).expand(-1, cols)
    return scale.float().repeat_interleave(cols // scale.shape[1], dim=1)


@pytest.mark.parametrize("fmt", EMBEDDING_FORMATS)
def test_codes_round_trip(fmt: str) -> None:
    w = weight_with_edge_rows(48, 64, seed=0)
    codes, scale = quantize(w, fmt, group_size=16)
    module = CompressedEmbedding(48, 64, fmt, group_size=16)
    for key, (shape, dtype) in module.expected_tensors().items():
        stored = codes if key == "weight" else scale
        assert (tuple(stored.shape), stored.dtype) == (shape, dtype), key
    deq = dequantize(codes, scale, fmt, 64)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    # Exact round trip: the dequantized weight quantizes to the very same codes and scales.
    codes2, scale2 = quantize(deq, fmt, group_size=16)
    assert torch.equal(codes2, codes)
    assert scale is None or torch.equal(scale2, scale)
    if fmt in INT_FORMATS:
        assert torch.all((w - deq).abs() <= step(scale, fmt, 64) / 2 * (1 + 1e-6))
        assert deq[1].abs().max() > 0  # a row far below float16's normal range is not zeroed
        assert torch.equal(deq[0], torch.zeros(64))
    else:
        assert torch.equal(deq, w.to(getattr(torch, fmt)).float())


def test_int4_nibbles_exact() -> None:
    """Every code -7..7 in both nibbles: unpacking gives back exactly code * scale."""
    codes = torch.arange(-7, 8).repeat(32)[: 16 * 24].view(16, 24).float()
    codes[:, 0::8] = 7  # every group of 8 holds a 7, so its scale is exactly its row's s
    s = torch.linspace(0.5, 2.0, 16).half().float().view(16, 1)
    w = codes * s
    packed, scale = quantize(w, "int4", group_size=8)
    assert torch.equal(scale.float(), s.expand(16, 3))
    low, high = packed.view(16, 12) & 15, packed.view(16, 12) >> 4
    assert torch.equal(low.float() - 8, codes[:, 0::2]) and torch.equal(high.float() - 8, codes[:, 1::2])
    assert torch.equal(dequantize(packed, scale, "int4", 24), w)


def is_view(op: str) -> bool:
    """Whether the op named ``"aten.<name>.<overload>"`` returns a view (allocates nothing)."""
    _, name, overload = op.split(".")
    return getattr(getattr(torch.ops.aten, name), overload).is_view


@pytest.mark.parametrize("fmt", EMBEDDING_FORMATS)
def test_lookup_dequantizes_only_the_rows_read(fmt: str) -> None:
    emb = CompressedEmbedding(4096, 64, fmt, group_size=32).compress_(torch.randn(4096, 64))
    ids = torch.tensor([[5, 4095, 5], [0, 17, 300]])
    with AllocationRecorder() as rec:
        out = emb(ids)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float32
    assert torch.equal(out, emb.dequantized()[ids])
    created = [(op, n) for op, n in rec.sizes if not is_view(op)]
    # only the rows read (int4: two nibble planes of them), never the table (views of it are free)
    assert max(n for _, n in created) <= 2 * ids.numel() * 64, created


@pytest.mark.parametrize("fmt", EMBEDDING_FORMATS)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_tied_head_matches_linear_on_dequantized_embedding(fmt: str, m: int) -> None:
    torch.manual_seed(m)
    emb = CompressedEmbedding(160, 64, fmt, group_size=32).compress_(torch.randn(160, 64) * 0.1)
    bias = nn.Parameter(torch.randn(160))
    head = TiedCompressedLinear(emb, bias)
    x = torch.randn(2, m, 64)
    expected = F.linear(x, emb.dequantized(), bias)
    with torch.no_grad():
        got = head(x)
    kernel = fmt in INT_FORMATS and 2 * m <= embeddings.KERNEL_MAX_ROWS
    # bf16/fp16 formats and the weight-only kernels take 16-bit activations; blocks are float32
    tol = 1e-2 if kernel or fmt not in INT_FORMATS else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())

    # gradients reach the activations and the bias (through the blocked path for int formats)
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(expected)
    (head(xg) * grad).sum().backward()
    xr = x.clone().requires_grad_()
    (F.linear(xr, emb.dequantized(), bias.detach()) * grad).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=tol, atol=tol * xr.grad.abs().max().item())
    torch.testing.assert_close(bias.grad, grad.sum((0, 1)))


def test_int8_kernel_with_unaligned_operands() -> None:
    """Codes mapped from a file and activation views may start anywhere; torch's kernel needs 16 bytes."""
    torch.manual_seed(0)
    emb = CompressedEmbedding(128, 64, "int8").compress_(torch.randn(128, 64))
    storage = torch.empty(emb.weight.numel() + 8, dtype=torch.int8)
    emb.weight = storage[8:].copy_(emb.weight)
    hidden = torch.randn(8 * 64 + 3, dtype=torch.bfloat16)[3:].view(8, 64)  # bf16 model: no converting copy
    assert emb.weight.data_ptr() % 16 and hidden.data_ptr() % 16
    with torch.no_grad():
        y = TiedCompressedLinear(emb)(hidden)
    ref = F.linear(hidden.float(), emb.dequantized())
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("cols", [64, 72])  # torch's int8 kernel gives garbage for 72 (not a multiple of 16)
@pytest.mark.parametrize("compiler", [True, False])
def test_int8_head_on_both_kernels(compiler: bool, cols: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled kernel (float32 activations) and torch's fallback (bfloat16 ones) compute the same head."""
    from hf_tbn.kernels import native

    if not compiler:
        monkeypatch.setattr(native, "native_error", lambda: "no C compiler found")
        monkeypatch.setattr(native, "int8_linear", None)  # must not be called
    torch.manual_seed(0)
    lin = CompressedLinear(cols, 40, "int8").compress_(torch.randn(40, cols))
    x = torch.randn(3, cols)
    with torch.no_grad():
        y = lin(x)
    ref = F.linear(x, lin.dequantized())
    tol = 1e-6 if compiler else 1e-2  # bfloat16 activations on torch's kernel
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_int4_kernel_operands_built_in_blocks() -> None:
    """4144 rows: the kernel copy is converted 4096 rows at a time; it must equal the plain layout."""
    torch.manual_seed(0)
    lin = CompressedLinear(64, 4144, "int4", group_size=32).compress_(torch.randn(4144, 64))
    x = torch.randn(1, 64)
    with torch.no_grad():
        y = lin(x)
    assert lin._operands is not None  # the kernel path ran
    ref = F.linear(x, lin.dequantized())
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_cast_changes_compute_dtype_not_storage() -> None:
    emb = CompressedEmbedding(32, 64, "int4").compress_(torch.randn(32, 64))
    head = CompressedLinear(64, 32, "float16", bias=True).compress_(torch.randn(32, 64))
    model = nn.ModuleDict({"emb": emb, "head": head}).to(torch.bfloat16)
    assert emb.weight.dtype == torch.uint8 and emb.weight_scale.dtype == torch.float16
    assert head.weight.dtype == torch.float16 and head.bias.dtype == torch.bfloat16
    assert emb(torch.tensor([1, 2])).dtype == torch.bfloat16
    assert head(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    model.float()
    assert emb(torch.tensor([1])).dtype == torch.float32 and head.weight.dtype == torch.float16


def tiny_llama(folder: Path, tied: bool) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fmt", EMBEDDING_FORMATS)
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_save_reload(fmt: str, tied: bool, tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = tiny_llama(tmp_path / "fp", tied) if tied else tiny_llama_dir
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    assert compress_dense_modules(model, fmt, 32) == ["model.embed_tokens", "lm_head"]
    head = model.get_output_embeddings()
    assert isinstance(model.get_input_embeddings(), CompressedEmbedding)
    assert isinstance(head, TiedCompressedLinear if tied else CompressedLinear)
    assert tied == (head.__dict__.get("embedding") is model.get_input_embeddings())
    with torch.no_grad():
        logits = model(ids).logits
    model.tie_weights()  # transformers' own re-tie (recomputed mapping) leaves the compressed pair alone
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)

    model.save_pretrained(tmp_path / "out")
    stored = load_file(tmp_path / "out" / "model.safetensors")
    expected = embeddings.checkpoint_tensors(model)
    assert {k for k in stored if k.startswith(("model.embed_tokens.", "lm_head."))} == set(expected)
    assert all((tuple(stored[k].shape), stored[k].dtype) == spec for k, spec in expected.items())
    assert ("lm_head.weight" in stored) == (not tied)

    # reload: empty compressed modules, then the checkpoint by key
    fresh = LlamaForCausalLM(model.config).eval()
    init_compressed_modules(fresh, fmt, 32)
    fresh.load_state_dict(stored, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)

    # against the dense model holding the dequantized weights
    embeddings.decompress_dense_modules(fresh)
    assert type(fresh.lm_head) is nn.Linear and (fresh.lm_head.weight is fresh.model.embed_tokens.weight) == tied
    with torch.no_grad():
        dense = fresh(ids).logits
    tol = 2e-2 if fmt in INT_FORMATS else 1e-2  # decode-size inputs: kernels with 16-bit activations
    torch.testing.assert_close(logits, dense, rtol=tol, atol=tol * dense.abs().max().item())


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_plain_transformers_refuses_int_codes(fmt: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Without hf_tbn, transformers must raise on the codes, never load them as floats or re-initialise."""
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    compress_dense_modules(model, fmt)
    model.save_pretrained(tmp_path / "out")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LlamaForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_minilm_state_dict_through_safetensors(fmt: str, minilm_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(["Compressed embeddings keep the meaning.", "A second, longer sentence about markets."],
                padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
    names = compress_dense_modules(model, fmt)
    assert names == ["embeddings.word_embeddings", "embeddings.position_embeddings",
                     "embeddings.token_type_embeddings"]
    words = model.embeddings.word_embeddings
    per_weight = 1 if fmt == "int8" else 0.5 + 2 / 32
    assert words.storage_bytes() == pytest.approx(30522 * 384 * per_weight, rel=0.01)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    pooled = [(h * mask).sum(1) / mask.sum(1) for h in (out, reference)]  # sentence embeddings (mean pooling)
    cosine = F.cosine_similarity(*pooled, dim=-1)
    assert cosine.min() > (0.9995 if fmt == "int8" else 0.99), cosine

    save_file(model.state_dict(), tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "embeddings.word_embeddings.weight_scale" in f.keys()
    fresh = AutoModel.from_pretrained(minilm_dir).eval()
    init_compressed_modules(fresh, fmt)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, out)


def test_bad_options_and_checkpoints_name_the_culprit() -> None:
    with pytest.raises(ValueError, match="embedding_format .*'int3'"):
        embeddings.check_embedding_options("int3", 32)
    with pytest.raises(ValueError, match="embedding_group_size .*0"):
        embeddings.check_embedding_options("int4", 0)
    with pytest.raises(ValueError, match="vocab: int4 group size 32 does not divide the row length 48"):
        CompressedEmbedding(10, 48, "int4", 32, name="vocab")

    class Scaled(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 2

    model = nn.ModuleDict({"emb": Scaled(10, 8), "plain": nn.Embedding(10, 8)})
    with pytest.raises(ValueError, match="emb: Scaled changes the lookup"):
        compress_dense_modules(model, "int8")

    tied = nn.ModuleDict({"emb": nn.Embedding(10, 8), "head": nn.Linear(8, 10, bias=False)})
    tied.head.weight = tied.emb.weight
    with pytest.raises(ValueError, match="head is tied to emb: compress both or neither"):
        compress_dense_modules(tied, "int8", names=["emb"])
    assert compress_dense_modules(tied, "int8", names=["emb", "head"]) == ["emb", "head"]
    assert isinstance(tied.head, TiedCompressedLinear)
    assert tied.state_dict().keys() == {"emb.weight", "emb.weight_scale"}

    emb = CompressedEmbedding(10, 8, "int8", name="words")
    state = {"weight": torch.zeros(10, 8, dtype=torch.int8), "weight_scale": torch.zeros(10, dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"weight: checkpoint has \(10, 8\) torch.int8, words \(int8"):
        emb.load_state_dict(state)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tied", [True, False])
def test_through_tbn_config_quantize_pack_reload(fmt: str, tied: bool, tmp_path: Path, tiny_llama_dir: Path) -> None:
    """TBNConfig(embedding_format=...): quantize on load, pack, save_pretrained, plain from_pretrained, dequantize."""
    import hf_tbn

    folder = tiny_llama(tmp_path / "fp", tied) if tied else tiny_llama_dir
    config = hf_tbn.TBNConfig(min_compress_size=0, embedding_format=fmt)
    model = hf_tbn.pack_model(LlamaForCausalLM.from_pretrained(folder, quantization_config=config)).eval()
    assert isinstance(model.get_input_embeddings(), CompressedEmbedding) and list(hf_tbn.tbn_layers(model))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "out")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.quantization_config.embedding_format == fmt
    assert isinstance(again.get_output_embeddings(), TiedCompressedLinear if tied else CompressedLinear)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
        plain = again.dequantize()
        assert type(plain.get_input_embeddings()) is nn.Embedding and not list(hf_tbn.tbn_layers(plain))
        torch.testing.assert_close(plain(ids).logits, logits, rtol=5e-2, atol=5e-2 * logits.abs().max().item())
