"""A test-local TBN reference written literally from the steps in docs/foundation.md, independent of hf_tbn."""

from __future__ import annotations

import torch


def reference_tbn(w: torch.Tensor, p: int, alpha_mode: str = "per_tile") -> tuple[torch.Tensor, ...]:
    """(tile t of +-1, alphas (p,), W_hat) for a logical (out, in, ...) weight ``w``.

    Differentiable w.r.t. ``w`` with the identity straight-through estimator on the sign step.
    """
    flat = w.reshape(-1)
    n = flat.numel()
    length = n // p
    view = flat.view(p, length)  # 1. flatten row-major, view (p, L)
    s = view.sum(dim=0)  # 2. aggregate: sum over the p rows
    t = torch.where(s > 0, 1.0, -1.0).to(w.dtype)  # 3. binarize, zero -> -1
    tiled = t.repeat(p)  # 4. tile
    b = tiled + (flat - flat.detach())  # 6. identity straight-through (adds an exact zero)
    if alpha_mode == "per_tile":  # 5. scales from the latent weight
        alpha = view.abs().mean(dim=1)
    else:
        alpha = flat.abs().mean().repeat(p)
    w_hat = (alpha.repeat_interleave(length) * b).view(w.shape)
    return t, alpha, w_hat
