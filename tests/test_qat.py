"""The dense-to-tiled warm-up of hf_tbn.qat: the blended forward, its schedule, and Trainer runs with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import reference_tbn
from test_distill import Tokens, targs
from torch import nn
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, Trainer

from hf_tbn import TBNConfig, TBNConv2d, TBNLinear, convert_model, tbn_layers
from hf_tbn.demos.fashion_mnist import train
from hf_tbn.qat import QuantizationWarmup, TBNTrainer, set_blend
from hf_tbn.warmup import blend_at


def literal_w_hat(w: torch.Tensor, p: int) -> torch.Tensor:
    """W_hat written out: tile = sign of the sum over the p row blocks (0 -> -1), scales mean |W_i|."""
    rows = w.reshape(p, -1)
    tile = torch.where(rows.sum(0) > 0, 1.0, -1.0)
    return (rows.abs().mean(1, keepdim=True) * tile).reshape(w.shape)


@pytest.mark.parametrize("blend", [0.0, 0.3, 1.0])
def test_blended_linear_forward_and_gradient(blend: float) -> None:
    torch.manual_seed(0)
    layer = TBNLinear(12, 8, compression_factor=4)
    model = nn.Sequential(layer)
    x = torch.randn(5, 12)
    set_blend(model, blend)
    y = model(x)
    w = layer.weight.detach().reshape(layer.weight_shape)  # the latent weight may be held in the tiled view
    w_used = blend * literal_w_hat(w, 4) + (1 - blend) * w
    torch.testing.assert_close(y, F.linear(x, w_used, layer.bias), rtol=1e-5, atol=1e-6)
    # The tile's straight-through gradient is the identity, so dL/dW = blend * STE part + (1 - blend) * dense part:
    # for L = sum(y * g) the sign part gives blend * (x^T g) plus the scales' gradient, checked through autograd.
    g = torch.randn_like(y)
    (y * g).sum().backward()
    w_ref = w.clone().requires_grad_(True)
    rows = w_ref.reshape(4, -1)
    tile = torch.where(rows.detach().sum(0) > 0, 1.0, -1.0)
    ste = (rows - rows.detach()) + tile  # value tile, gradient identity
    w_hat = (rows.abs().mean(1, keepdim=True) * ste).reshape(w.shape)
    (F.linear(x, blend * w_hat + (1 - blend) * w_ref, layer.bias.detach()) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad.reshape(w.shape), w_ref.grad, rtol=1e-5, atol=1e-6)


def test_blended_conv_forward() -> None:
    torch.manual_seed(1)
    layer = TBNConv2d(3, 8, 3, padding=1, compression_factor=2)
    x = torch.randn(2, 3, 6, 6)
    set_blend(nn.Sequential(layer), 0.25)
    w = layer.weight.detach().reshape(layer.weight_shape)
    expected = F.conv2d(x, 0.25 * literal_w_hat(w, 2) + 0.75 * w, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_blended_conv_forward_in_the_input_layout() -> None:
    """The blend mixes W_hat with the dense latent weight in its logical place, whatever the tile layout."""
    torch.manual_seed(2)
    layer = TBNConv2d(8, 6, 3, padding=1, compression_factor=4, tile_layout="input")
    x = torch.randn(2, 8, 5, 5)
    set_blend(nn.Sequential(layer), 0.25)
    w = torch.cat(list(layer.weight.detach()), dim=1)  # copy i holds input channels [2i, 2i + 2)
    expected = F.conv2d(x, 0.25 * reference_tbn(w, 4, layout="input")[2] + 0.75 * w, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_blend_one_is_plain_tbn_and_packed_layers_are_left_alone() -> None:
    torch.manual_seed(2)
    model = convert_model(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), TBNConfig(min_compress_size=0))
    x = torch.randn(3, 16)
    plain = model(x)
    set_blend(model, 0.5)
    assert not torch.equal(model(x), plain)
    set_blend(model, 1.0)
    assert torch.equal(model(x), plain)
    tiled = model[0](x)
    model[0].pack()
    set_blend(model, 0.0)  # the packed layer has no dense weight: it stays TBN; the latent one turns dense
    torch.testing.assert_close(model[0](x), tiled)
    torch.testing.assert_close(model[2](x[:, :8]), F.linear(x[:, :8], model[2].weight.reshape(4, 8), model[2].bias))
    with pytest.raises(ValueError, match=r"blend must be a number in \[0, 1\], got 1.5"):
        set_blend(model, 1.5)


def test_schedule() -> None:
    assert [blend_at(s, 20, 0.25) for s in (0, 1, 4, 5, 19)] == pytest.approx([0, 0.2, 0.8, 1, 1])
    assert blend_at(0, 20, 0) == 1.0
    with pytest.raises(ValueError, match="fraction"):
        QuantizationWarmup(2)


def test_trainer_with_warmup_ends_as_plain_tbn_and_resumes_identically(tiny_llama_dir: Path, tmp_path: Path) -> None:
    def model() -> LlamaForCausalLM:
        return LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=TBNConfig(min_compress_size=0))

    warm = model()
    trainer = TBNTrainer(model=warm, args=targs(tmp_path / "a", steps=8, save_strategy="steps", save_steps=4),
                         train_dataset=Tokens(), warmup=0.5)
    trainer.train()
    assert all(layer.blend == 1.0 for _, layer in tbn_layers(warm))
    plain = model()
    Trainer(model=plain, args=targs(tmp_path / "b", steps=8), train_dataset=Tokens()).train()
    ids = Tokens().ids[:4]
    with torch.no_grad():
        assert not torch.equal(warm.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)

    resumed = model()
    TBNTrainer(model=resumed, args=targs(tmp_path / "a", steps=8), train_dataset=Tokens(),
               warmup=0.5).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    for (name, a), (_, b) in zip(warm.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def blends_seen(model: nn.Module) -> list[float]:
    """The blend of the first TBN layer at each training forward (recorded by a forward pre-hook)."""
    _, layer = next(iter(tbn_layers(model)))
    seen: list[float] = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.blend) if module.training else None)
    return seen


class Classes(Tokens):
    """Tokens, labelled by their first token mod 3: a task for a new classification head."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i][0] % 3}


@pytest.mark.parametrize(("task", "config", "expected"), [
    ("classify", {"compression_factor": 4}, [0, 0.4167, 0.8333, 1, 1, 1, 1, 1]),  # "auto": 30% of 8 steps
    ("classify", {"compression_factor": 8, "warmup": 0}, [1] * 8),
    ("generate", {"compression_factor": 8}, [1] * 8),  # "auto": a language model gets none
    ("generate", {"compression_factor": 4, "warmup": 0.5}, [0, 0.25, 0.5, 0.75, 1, 1, 1, 1]),
])
def test_plain_trainer_gets_the_models_warmup(task: str, config: dict, expected: list[float], tiny_llama_dir: Path,
                                              tmp_path: Path) -> None:
    """Once hf_tbn is imported every Trainer runs the warm-up the model's TBNConfig asks for."""
    tbn = TBNConfig(min_compress_size=0, **config)
    if task == "classify":
        model = LlamaForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=3, pad_token_id=0,
                                                               quantization_config=tbn)
        data = Classes()
    else:
        model, data = LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=tbn), Tokens()
    seen = blends_seen(model)
    Trainer(model=model, args=targs(tmp_path, steps=8), train_dataset=data).train()
    assert seen == pytest.approx(expected, abs=1e-4)
    assert all(layer.blend == 1.0 for _, layer in tbn_layers(model))  # plain TBN after training
    reloaded = TBNConfig.from_dict(model.config.quantization_config.to_dict())
    assert reloaded.warmup == tbn.warmup  # saved with the model


def test_tbn_trainer_overrides_the_models_warmup(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=TBNConfig(min_compress_size=0,
                                                                                           warmup=0.5))
    seen = blends_seen(model)
    trainer = TBNTrainer(model=model, args=targs(tmp_path, steps=4), train_dataset=Tokens(), warmup=0)
    assert sum(isinstance(cb, QuantizationWarmup) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert seen == [1.0] * 4


def test_blend_in_evaluation_reuses_nothing_stale() -> None:
    """Under no_grad the blended weight is cached; changing the blend must change the output."""
    torch.manual_seed(3)
    layer = TBNLinear(16, 8, compression_factor=4)
    x = torch.randn(2, 16)
    w = layer.weight.detach().reshape(layer.weight_shape)
    with torch.no_grad():
        tiled = layer(x)
        layer.blend = 0.0
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias))
        layer.blend = 1.0
        assert torch.equal(layer(x), tiled)


def test_bad_warmup_values_are_refused() -> None:
    for bad in (1.5, -0.1, "yes", True):
        with pytest.raises(ValueError, match="warmup must be 'auto' or a number in"):
            TBNConfig(warmup=bad)
    with pytest.raises(ValueError, match="fraction must be a number"):
        TBNTrainer(model=nn.Linear(2, 2), warmup=2)


def test_own_training_loop_warms_up_over_its_steps_and_ends_as_plain_tbn() -> None:
    """``hf_tbn.demos.fashion_mnist.train(warmup=f)`` (the quality scripts' loop) blends like the Trainer callback."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    convert_model(model, TBNConfig(compression_factor=4, min_compress_size=0, modules_to_not_convert=["3"]))
    blends: list[float] = []
    model[1].register_forward_pre_hook(lambda layer, args: blends.append(layer.blend))
    train(model, torch.randn(40, 4, 4), torch.randint(0, 3, (40,)), epochs=2, seed=0, batch_size=10, warmup=0.5)
    assert blends == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1, 1, 1])  # 8 steps, the first 4 warm up
    assert model[1].blend == 1.0
