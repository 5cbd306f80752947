"""A test-local TBN reference written literally from the steps in docs/foundation.md, independent of hf_tbn."""

from __future__ import annotations

import torch


def reference_tbn(
    w: torch.Tensor, p: int, alpha_mode: str = "per_tile", layout: str = "output"
) -> tuple[torch.Tensor, ...]:
    """(tile t of +-1, alphas (p,), W_hat) for a logical (out, in, ...) weight ``w``.

    ``layout`` "output": copy i is output rows [i out/p, (i+1) out/p), i.e. the row-major flattening viewed as
    (p, L); "input": copy i is input columns [i in/p, (i+1) in/p), the tile an (out, in/p, ...) weight.
    Differentiable w.r.t. ``w`` with the identity straight-through estimator on the sign step.
    """
    copies = torch.stack(w.chunk(p, dim=0 if layout == "output" else 1))  # 1. the p copies of the tile's shape
    view = copies.reshape(p, -1)  # (p, L)
    length = view.shape[1]
    s = view.sum(dim=0)  # 2. aggregate: sum over the p copies
    t = torch.where(s > 0, 1.0, -1.0).to(w.dtype)  # 3. binarize, zero -> -1
    tiled = t.repeat(p)  # 4. tile
    flat = view.reshape(-1)
    b = tiled + (flat - flat.detach())  # 6. identity straight-through (adds an exact zero)
    if alpha_mode == "per_tile":  # 5. scales from the latent weight
        alpha = view.abs().mean(dim=1)
    else:
        alpha = flat.abs().mean().repeat(p)
    w_hat_copies = (alpha.repeat_interleave(length) * b).view(copies.shape)
    w_hat = torch.cat(list(w_hat_copies), dim=0 if layout == "output" else 1)  # the copies back in place
    return t, alpha, w_hat
