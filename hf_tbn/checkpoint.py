"""The TBN checkpoint format, and its check against the layers it must fill before any weight loads.

Format (``hf_tbn_format`` "2" and the tile layout, :data:`LAYOUT_KEY`, in the safetensors metadata;
docs/huggingface.md). Per converted layer ``X``, besides ``X.bias``:

- packed: ``X.weight`` holds the tile bits (uint8, ``(ceil(N/p/8),)``) and ``X.alpha`` the ``p`` alphas;
- latent: ``X.weight`` holds the latent weight as its ``p`` copies ``(p, *tile_shape)`` (``(p, out/p, in, ...)``, or
  ``(p, out, in/p, ...)`` for ``tile_layout`` "input", recorded in config.json), plus
  ``X.alpha_weight`` (same shape) or ``X.alpha`` (``(p,)``) for ``alpha_param`` "tensor" / "scalars".

Both ``X.weight`` shapes have a different number of dimensions than any dense Linear / Conv
weight, so transformers without hf_tbn refuses the checkpoint (a size mismatch is an error)
instead of loading random or un-tiled weights; its load report lists the :data:`NEEDS_HF_TBN`
tensor, whose name says what to do.

transformers' loader reports a wrong shape as a "mismatched key" and fills a missing one with a
fresh initialisation; for a TBN layer either would give a silently wrong model. Reading only the
checkpoint headers (and the few alphas), :func:`checkpoint_forms` finds each layer's form and
refuses any tensor whose shape or dtype disagrees with the layer, a missing bias, non-finite
alphas, TBN tensors of a layer the config does not list, and any unreadable (e.g. truncated) file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import tiling
from .config import TBNConfig
from .convert import logical_weight, relative_name, tbn_layers
from .tiling import check_alpha_finite, packed_nbytes

FORMAT_VERSION = "2"
# A one-byte tensor every TBN checkpoint carries: transformers without hf_tbn lists it, and so says what to do.
NEEDS_HF_TBN = "this checkpoint needs hf-tbn: pip install hf-tbn, then import hf_tbn before from_pretrained"
FLOATS = ("F32", "F16", "BF16", "F64")
# safetensors metadata key recording the tile layout the checkpoint was written with: a packed tile has the same
# shape in both layouts, so only this tells a config.json relabelled with the other layout.
LAYOUT_KEY = "hf_tbn_tile_layout"

# key -> (shape, dtype name as safetensors writes it, e.g. "F32", "U8")
Header = dict[str, tuple[tuple[int, ...], str]]

_TORCH_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` in the checkpoint format: each packed layer's ``tile`` saved as ``weight``, plus the
    :data:`NEEDS_HF_TBN` marker."""
    state = model.state_dict()
    for name, layer in tbn_layers(model):
        if layer.form == "packed":
            state[f"{name}.weight"] = state.pop(f"{name}.tile")
    state[NEEDS_HF_TBN] = torch.tensor([int(FORMAT_VERSION)], dtype=torch.uint8)
    return state


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


def check_saved_layout(files: Sequence[str | Path], layout: str) -> None:
    """Refuse safetensors ``files`` written with another tile layout than config.json's ``layout`` (older
    checkpoints do not record it: not checked)."""
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        with safe_open(str(file), "pt") as f:
            saved = (f.metadata() or {}).get(LAYOUT_KEY)
        if saved is not None and saved != layout:
            raise ValueError(f"{file}: written with tile_layout {saved!r}, but config.json's quantization_config "
                             f"says {layout!r}; the tiles would fill the weights in the wrong places")


def read_tensors(files: Sequence[str | Path], keys: set[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (small ones: the alphas) from whichever of ``files`` holds them."""
    found: dict[str, torch.Tensor] = {}
    for file in files:
        if str(file).endswith(".safetensors"):
            with safe_open(str(file), "pt") as f:
                found.update({k: f.get_tensor(k) for k in keys & set(f.keys())})
        else:
            state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
            found.update({k: state[k] for k in keys & set(state)})
    return found


def checkpoint_forms(
    model: nn.Module,
    plan: dict[str, int],
    files: Sequence[str | Path] | None,
    config: TBNConfig,
    conv1d: set[str],
    pre_quantized: bool,
) -> dict[str, str | None]:
    """Each planned layer's form in the checkpoint (a TBN checkpoint holds every layer in ``config.form``), validated.

    ``model`` still holds the dense modules (on any device, meta included); ``conv1d`` names the
    layers that are GPT-2 ``Conv1D`` (stored ``(in, out)`` in a full-precision checkpoint). In a
    full-precision checkpoint a layer may be absent (a new head, initialised by transformers):
    its form is ``None`` and it stays dense. Without checkpoint files (a model converted in
    memory) every layer is latent.
    """
    if not files:
        return dict.fromkeys(plan, "latent")
    header = model_keyed(model, read_header(files))
    _refuse_unlisted_layers(model, plan, header)
    if pre_quantized:
        check_saved_layout(files, config.tile_layout)
    forms: dict[str, str | None] = {}
    alpha_keys: set[str] = set()
    for name, p in plan.items():
        module = model.get_submodule(name)
        shape = tuple(logical_weight(module).shape)
        latent_shape = (p, *tiling.tile_shape(shape, p, config.tile_layout))
        check = _Checker(name, shape, p, header)
        if not pre_quantized:
            if f"{name}.alpha" in header or f"{name}.alpha_weight" in header:
                raise ValueError(f"{name}: checkpoint holds TBN tensors but config.json has no TBN quantization_config")
            if f"{name}.weight" not in header:
                forms[name] = None
                continue
            check("weight", shape[::-1] if name in conv1d else shape, FLOATS)
            forms[name] = "latent"
            continue
        if config.form == "packed":
            check("weight", (packed_nbytes(math.prod(shape) // p),), ("U8",), "the packed tile")
            check("alpha", (p,), FLOATS)
            alpha_keys.add(f"{name}.alpha")
        else:
            check("weight", latent_shape, FLOATS, "the latent weight, (p, *tile_shape)")
            if config.alpha_param == "tensor":
                check("alpha_weight", latent_shape, FLOATS)
            elif config.alpha_param == "scalars":
                check("alpha", (p,), FLOATS)
                alpha_keys.add(f"{name}.alpha")
        if getattr(module, "bias", None) is not None:
            check("bias", (shape[0],), FLOATS)
        forms[name] = config.form
    for key, alpha in read_tensors(files, {header.source(k) for k in alpha_keys}).items():
        check_alpha_finite(f"checkpoint {key!r}", alpha)
    return forms


def _refuse_unlisted_layers(model: nn.Module, plan: dict[str, int], header: ModelKeyedHeader) -> None:
    """A convertible layer not in the plan must not have TBN tensors in the checkpoint (it would load as dense)."""
    for name, module in model.named_modules():
        if not name or name in plan or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        stray = [key for key in (f"{name}.alpha", f"{name}.alpha_weight") if key in header]
        if stray:
            raise ValueError(
                f"checkpoint {header.source(stray[0])!r}: TBN tensors for {relative_name(model, name)!r}, which "
                "config.json's quantization_config.converted_layers does not list"
            )


class ModelKeyedHeader(dict):
    """A :data:`Header` keyed by the model's own names; :meth:`source` gives a key's name in the checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[str, str] = {}

    def source(self, key: str) -> str:
        return self.sources.get(key, key)


def model_keyed(model: nn.Module, header: Header) -> ModelKeyedHeader:
    """``header`` renamed as transformers renames checkpoint keys on load (the model's conversion mapping and the
    base-model prefix), so a TBN layer finds its tensors under its own module name.

    Tensors that a conversion merges or splits (never a TBN layer's) are left out.
    """
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model) if isinstance(model, PreTrainedModel) else []
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = dict.fromkeys(model.state_dict(), True)  # transformers tests presence with .get(key) is not None
    prefix = getattr(model, "base_model_prefix", None)
    keyed = ModelKeyedHeader()
    for key, value in header.items():
        if key == NEEDS_HF_TBN:
            continue
        module, _, tensor = key.rpartition(".")
        # Rename through the module's weight key: the mapping knows the dense modules, not TBN's tensor names.
        renamed, converted = rename_source_key(f"{module}.weight", renamings, converters, prefix, meta)
        if converted is None:
            name = f"{renamed.rpartition('.')[0]}.{tensor}"
            keyed[name], keyed.sources[name] = value, key
    return keyed


class _Checker:
    """Refuses a missing tensor of one layer, or one whose shape or dtype the layer cannot take."""

    def __init__(self, layer: str, weight_shape: tuple[int, ...], p: int, header: ModelKeyedHeader) -> None:
        self.where = f"{layer} (weight {weight_shape}, p={p})"
        self.layer, self.header = layer, header

    def __call__(self, tensor: str, shape: tuple[int, ...], dtypes: tuple[str, ...], what: str = "") -> None:
        needs = f"{tuple(shape)} {'/'.join(dtypes)}" + (f" ({what})" if what else "")
        key = f"{self.layer}.{tensor}"
        if key not in self.header:
            raise ValueError(f"{self.where}: checkpoint has no {key!r}; the layer needs {needs}")
        got_shape, got_dtype = self.header[key]
        if tuple(got_shape) != tuple(shape) or got_dtype not in dtypes:
            source = self.header.source(key)
            raise ValueError(f"{self.where}: checkpoint {source!r} has {tuple(got_shape)} {got_dtype}, "
                             f"the layer needs {needs}")
