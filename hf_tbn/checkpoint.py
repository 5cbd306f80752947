"""Checks a checkpoint against the TBN layers it must fill, before any weight is loaded.

transformers' loader reports a wrong shape as a "mismatched key" and fills a missing one with a
fresh initialisation; for a TBN layer either would give a silently wrong model. Reading only the
checkpoint headers, :func:`checkpoint_forms` finds each layer's form (``tile``/``alpha`` keys:
packed, ``weight``: latent) and refuses any tensor whose shape or dtype disagrees with the layer,
and any unreadable (e.g. truncated) file, so a bad checkpoint never yields a half-loaded model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .convert import logical_weight
from .tiling import packed_nbytes

# key -> (shape, dtype name as safetensors writes it, e.g. "F32", "U8")
Header = dict[str, tuple[tuple[int, ...], str]]

_TORCH_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def read_header(files: Sequence[str | Path]) -> Header:
    """Shapes and dtypes of every tensor in ``files`` (safetensors headers; other formats via torch.load)."""
    header: Header = {}
    for file in files:
        if str(file).endswith(".safetensors"):
            try:
                with safe_open(str(file), "pt") as f:
                    for key in f.keys():
                        s = f.get_slice(key)
                        header[key] = (tuple(s.get_shape()), s.get_dtype())
            except SafetensorError as e:
                raise ValueError(f"{file}: not a complete safetensors file ({e})") from e
        else:
            state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
            header.update({
                k: (tuple(v.shape), _TORCH_DTYPE_NAMES.get(v.dtype, str(v.dtype))) for k, v in state.items()
            })
    return header


def checkpoint_forms(
    model: nn.Module,
    plan: dict[str, int],
    files: Sequence[str | Path] | None,
    pre_quantized: bool,
    transposed: set[str],
) -> dict[str, str | None]:
    """Each planned layer's form in the checkpoint (``"latent"`` or ``"packed"``), validated.

    ``model`` still holds the dense modules (on any device, meta included); ``transposed``
    names the weight keys stored ``(in, out)`` (GPT-2 ``Conv1D`` in a full-precision checkpoint).
    In a full-precision checkpoint a layer may be absent (a new head, initialised by
    transformers): its form is ``None`` and it stays dense. A TBN checkpoint must hold every
    layer. Without checkpoint files (a model converted in memory) every layer is latent.
    """
    if not files:
        return dict.fromkeys(plan, "latent")
    header = read_header(files)
    prefix = getattr(model, "base_model_prefix", "")
    forms: dict[str, str | None] = {}
    for name, p in plan.items():
        shape = tuple(logical_weight(model.get_submodule(name)).shape)
        find = _finder(header, prefix)
        tile_key, alpha_key, weight_key = find(f"{name}.tile"), find(f"{name}.alpha"), find(f"{name}.weight")
        if tile_key or alpha_key:
            if not pre_quantized:
                raise ValueError(f"{name}: checkpoint holds packed tensors but has no TBN quantization_config")
            if weight_key:
                raise ValueError(f"{name}: checkpoint holds both a latent weight and packed tensors")
            nbytes = packed_nbytes(math.prod(shape) // p)
            _check(name, shape, p, header, tile_key, f"{name}.tile", (nbytes,), ("U8",))
            _check(name, shape, p, header, alpha_key, f"{name}.alpha", (p,), ("F32", "F16", "BF16", "F64"))
            forms[name] = "packed"
        elif weight_key is None and not pre_quantized:
            forms[name] = None
        else:
            stored = shape[::-1] if f"{name}.weight" in transposed else shape
            _check(name, shape, p, header, weight_key, f"{name}.weight", stored, ("F32", "F16", "BF16", "F64"))
            forms[name] = "latent"
    return forms


def _finder(header: Header, prefix: str):  # noqa: ANN202
    """Checkpoint key of a model key, allowing for the base-model prefix being added or dropped."""

    def find(key: str) -> str | None:
        candidates = [key, f"{prefix}.{key}"] + ([key.removeprefix(prefix + ".")] if prefix else [])
        return next((k for k in candidates if k in header), None)

    return find


def _check(
    layer: str,
    weight_shape: tuple[int, ...],
    p: int,
    header: Header,
    key: str | None,
    wanted_key: str,
    shape: tuple[int, ...],
    dtypes: tuple[str, ...],
) -> None:
    needs = f"{tuple(shape)} {'/'.join(dtypes)}"
    where = f"{layer} (weight {weight_shape}, p={p})"
    if key is None:
        raise ValueError(f"{where}: checkpoint has no {wanted_key!r}; the layer needs {needs}")
    got_shape, got_dtype = header[key]
    if tuple(got_shape) != tuple(shape) or got_dtype not in dtypes:
        raise ValueError(f"{where}: checkpoint {key!r} has {tuple(got_shape)} {got_dtype}, the layer needs {needs}")
