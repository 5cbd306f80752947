"""Unit tests of hf_tbn.tiling against the paper's formulas (docs/foundation.md)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_tbn

from hf_tbn import tiling

FACTORS = [1, 2, 4, 8, 16]
MODES = ["per_tile", "per_layer"]


def random_weight(p: int, seed: int, trailing: tuple[int, ...] = (37,)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = p * int(torch.randint(1, 6, (1,), generator=g))
    return torch.randn(out, *trailing, generator=g)


@pytest.mark.parametrize("p", FACTORS)
@pytest.mark.parametrize("mode", MODES)
def test_effective_weight_bit_exact(p: int, mode: str) -> None:
    for seed in range(3):
        w = random_weight(p, seed)
        t_ref, a_ref, w_ref = reference_tbn(w, p, mode)
        assert torch.equal(tiling.aggregate_sign(w, p), t_ref)
        assert torch.equal(tiling.alpha(w, p, mode), a_ref)
        assert torch.equal(tiling.effective_weight(w, p, mode), w_ref)


def test_zero_sum_maps_to_minus_one() -> None:
    w = torch.tensor([[1.0, -2.0, 0.0], [-1.0, 3.0, 0.0]])  # column sums 0, 1, 0
    assert tiling.aggregate_sign(w, 2).tolist() == [-1.0, 1.0, -1.0]


@pytest.mark.parametrize("p", FACTORS)
@pytest.mark.parametrize("mode", MODES)
def test_gradient_matches_reference_and_formula(p: int, mode: str) -> None:
    w = random_weight(p, seed=p).requires_grad_()
    g = torch.randn(w.shape)
    (tiling.effective_weight(w, p, mode) * g).sum().backward()
    ours = w.grad.clone()

    w.grad = None
    (reference_tbn(w, p, mode)[2] * g).sum().backward()
    torch.testing.assert_close(ours, w.grad, rtol=1e-6, atol=1e-7)

    # The closed form of docs/foundation.md, step 6: alpha_i G_ij + sign(W_ij) * sum_k G_ik t_k / L.
    wv, gv = w.detach().reshape(p, -1), g.reshape(p, -1)
    t = tiling.aggregate_sign(w.detach(), p)
    length = wv.shape[1]
    if mode == "per_tile":
        alpha = wv.abs().mean(1, keepdim=True)
        formula = alpha * gv + wv.sign() * (gv * t).sum(1, keepdim=True) / length
    else:
        formula = wv.abs().mean() * gv + wv.sign() * (gv * t).sum() / wv.numel()
    torch.testing.assert_close(ours.reshape(p, -1), formula, rtol=1e-5, atol=1e-6)


def test_sign_step_is_identity_straight_through() -> None:
    w = torch.randn(8, 5, requires_grad=True)
    g = torch.randn(4, 10)
    (tiling.tiled_sign(w, 4) * g).sum().backward()
    assert torch.equal(w.grad, g.reshape(8, 5))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_pack_unpack_roundtrip(bits: list[bool]) -> None:
    tile = torch.tensor([1.0 if b else -1.0 for b in bits])
    packed = tiling.pack_bits(tile)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(bits) / 8)
    assert torch.equal(tiling.unpack_bits(packed, len(bits)), tile)


@given(st.lists(st.booleans(), min_size=1, max_size=64))
def test_bit_order_lsb_first_and_zero_padding(bits: list[bool]) -> None:
    packed = tiling.pack_bits(torch.tensor(bits)).tolist()
    for j, b in enumerate(bits):
        assert (packed[j // 8] >> (j % 8)) & 1 == int(b)
    assert packed[-1] >> (len(bits) - 8 * (len(packed) - 1)) == 0


def test_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="3 bytes.*needs 2"):
        tiling.unpack_bits(torch.zeros(3, dtype=torch.uint8), 16)


@pytest.mark.parametrize("p", FACTORS)
def test_tiled_outputs_is_the_compute_reuse_identity(p: int) -> None:
    w = random_weight(p, seed=7, trailing=(24,))
    x = torch.randn(3, 24)
    t = tiling.aggregate_sign(w, p).view(w.shape[0] // p, 24)
    alpha = tiling.alpha(w, p)
    reused = tiling.tiled_outputs(x @ t.T, alpha)
    dense = x @ tiling.dequantize(t.flatten(), alpha, w.shape).T
    torch.testing.assert_close(reused, dense)


def test_bits_per_weight_formula() -> None:
    n, p = 4096 * 1024, 4
    assert tiling.bits_per_weight(n, p) == 1 / p + 32 * p / n
    assert tiling.bits_per_weight(10, 1) == (16 + 32) / 10  # 10 bits stored in 2 bytes


@pytest.mark.parametrize(
    ("shape", "p", "minimum", "groups", "layout", "expected"),
    [
        ((384, 384), 4, 64000, 1, "output", 4),
        ((384, 384), 16, 64000, 1, "output", 16),
        ((30, 1000), 4, 0, 1, "output", 3),  # 4 does not divide 30: largest divisor <= 4 is 3
        ((7, 1000), 8, 0, 1, "output", 7),
        ((384, 2, 1), 4, 64000, 1, "output", 1),  # under the minimum size: binary
        ((12, 1000), 4, 0, 6, "output", 3),  # grouped: 4 and 6 do not divide one another, 3 does
        ((30, 1000), 4, 0, 1, "input", 4),  # the input layout splits the 1000 inputs
        ((64, 30, 3, 3), 4, 0, 1, "input", 3),
        ((12, 1000), 4, 0, 6, "input", 1),  # grouped convolutions are not tiled along their inputs
    ],
)
def test_resolve_factor(shape: tuple[int, ...], p: int, minimum: int, groups: int, layout: str, expected: int) -> None:
    assert tiling.resolve_factor(shape, p, minimum, groups, layout) == expected


def test_input_layout_copies_are_the_input_column_blocks() -> None:
    w = torch.randn(6, 8, 3)
    copies = tiling.to_copies(w, 4, "input")
    assert copies.shape == (4, *tiling.tile_shape(w.shape, 4, "input")) == (4, 6, 2, 3)
    for i in range(4):
        assert torch.equal(copies[i], w[:, 2 * i : 2 * i + 2])
    assert torch.equal(tiling.from_copies(copies, "input"), w)
    assert torch.equal(tiling.to_copies(w, 3, "output")[1], w[2:4])


def test_combined_inputs_reproduce_the_dense_product() -> None:
    """``W_hat x = T (sum_i alpha_i x_i)`` for the input layout, also along a channel dim."""
    w, alpha = torch.randn(5, 12), torch.rand(3) + 0.5
    t = tiling.aggregate_sign(tiling.to_copies(w, 3, "input"), 3)
    w_hat = tiling.dequantize(t, alpha, w.shape, "input")
    x = torch.randn(7, 12)
    torch.testing.assert_close(tiling.combined_inputs(x, alpha) @ t.view(5, 4).T, x @ w_hat.T)
    images = torch.randn(2, 12, 4, 4)
    expected = sum(a * images[:, 4 * i : 4 * i + 4] for i, a in enumerate(alpha))
    torch.testing.assert_close(tiling.combined_inputs(images, alpha, dim=1), expected)


def test_unknown_alpha_mode() -> None:
    with pytest.raises(ValueError, match="per_row"):
        tiling.alpha(torch.ones(4, 4), 2, "per_row")
