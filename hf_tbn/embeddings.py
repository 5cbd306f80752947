"""Compressed storage for the modules TBN leaves dense: embeddings and output heads (docs/embeddings.md).

A compressed module keeps its weight as ``weight`` (the codes) and, for the integer formats,
``weight_scale`` (float16 scales):

* ``"bfloat16"`` / ``"float16"``: ``weight`` is the ``(rows, cols)`` weight in that dtype.
* ``"int8"``: symmetric per row, ``w = q * scale[row]`` with ``q`` in [-127, 127]; ``weight``
  is int8 of shape ``(rows * cols,)``, ``weight_scale`` is ``(rows,)``.
* ``"int4"``: symmetric per group of ``group_size`` values of a row, ``q`` in [-7, 7], stored
  as ``q + 8`` two per byte (even column in the low nibble); ``weight`` is uint8 of shape
  ``(rows * cols / 2,)``, ``weight_scale`` is ``(rows, cols / group_size)``.

The integer codes are flat on purpose: a dense ``nn.Embedding`` / ``nn.Linear`` loading such a
checkpoint without hf_tbn meets a shape mismatch, which transformers refuses, instead of casting
the codes to float (same shape) or initialising a missing ``weight`` at random.

An embedding lookup dequantizes only the rows it reads. A head computes ``x @ W.T`` without a
dense copy of ``W``: small inputs (decoding) on a CPU weight-only kernel (int8: hf_tbn's compiled
kernel with float32 activations, or torch's with bfloat16 ones when it cannot be built; int4:
torch's), larger ones block by block. A tied head holds no tensors of its own: it computes
from the compressed embedding it is tied to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling as compiling

from .kernels import native, ops
from .kernels.backends import kernel_unavailable

EMBEDDING_FORMATS: tuple[str, ...] = ("bfloat16", "float16", "int8", "int4")
DEFAULT_GROUP_SIZE = 32
_FLOAT_FORMATS = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_LEVELS = {"int8": 127, "int4": 7}
# Inputs of at most this many rows use the weight-only CPU kernels (hf_tbn's int8, torch's int4), whose
# time grows with the rows; larger inputs dequantize blocks of rows into a GEMM (docs/embeddings.md).
KERNEL_MAX_ROWS = 16
# torch's CPU int8 kernel returns garbage (no error) unless the row length is a multiple of this (torch 2.13).
_INT8_TORCH_KERNEL_COLS = 16
# torch's CPU int4 kernel accepts only these group sizes, and row counts divisible by 16.
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)
_BLOCK_ELEMENTS = 1 << 20  # weights dequantized at a time on the blocked path (4 MB in float32)


def check_embedding_options(embedding_format: object, group_size: object) -> None:
    """Validate ``TBNConfig.embedding_format`` (None or one of EMBEDDING_FORMATS) and ``embedding_group_size``."""
    if embedding_format is not None and embedding_format not in EMBEDDING_FORMATS:
        raise ValueError(f"embedding_format must be None or one of {EMBEDDING_FORMATS}, got {embedding_format!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise ValueError(f"embedding_group_size must be a positive even int, got {group_size!r}")


# -- codes -------------------------------------------------------------------------------------------
def quantize(
    weight: torch.Tensor, fmt: str, group_size: int = DEFAULT_GROUP_SIZE, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(codes, scale)`` of a ``(rows, cols)`` float weight in ``fmt`` (layouts in the module docstring).

    Each scale is rounded up to a float16 value before the codes are computed, so every code
    fits and every weight is within half a step of its dequantized value (tiny rows included);
    a row (or group) of zeros gets scale 0 and codes 0.
    """
    if fmt in _FLOAT_FORMATS:
        return weight.detach().to(_FLOAT_FORMATS[fmt]).contiguous(), None
    rows, cols = weight.shape
    w = weight.detach().float().view(rows, -1, cols if fmt == "int8" else group_size)
    levels = _LEVELS[fmt]
    exact = w.abs().amax(-1) / levels
    scale = exact.half()
    up = torch.nextafter(scale, torch.tensor(torch.inf, dtype=scale.dtype))
    scale = torch.where(scale.float() < exact, up, scale)
    if not torch.isfinite(scale).all():
        raise ValueError(f"{name}: values up to {exact.max().item() * levels:.3g} need scales beyond float16 range")
    safe = torch.where(scale > 0, scale.float(), 1.0).unsqueeze(-1)
    q = torch.round(w / safe).view(rows, cols)
    if fmt == "int8":
        return q.to(torch.int8).flatten(), scale.view(rows)
    u = (q + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).flatten(), scale


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor | None,
    fmt: str,
    cols: int,
    index: torch.Tensor | slice = slice(None),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows ``index`` (a tensor of row ids of any shape, or a slice) of the weight as ``dtype``.

    Only the selected rows are read; the values are ``q * scale`` formed exactly in float32,
    then cast once to ``dtype``. The group size follows from the scale's shape.
    """
    if fmt in _FLOAT_FORMATS:
        return codes[index].to(dtype)
    if fmt == "int8":
        q = codes.view(-1, cols)[index].float()
        return (q * scale[index].float().unsqueeze(-1)).to(dtype)
    packed = codes.view(-1, cols // 2)[index]
    q = torch.stack((packed & 15, packed >> 4), dim=-1).view(*packed.shape[:-1], cols).float() - 8
    s = scale[index].float()
    return (q.view(*s.shape, -1) * s.unsqueeze(-1)).view(q.shape).to(dtype)


# -- modules -----------------------------------------------------------------------------------------
class CompressedWeight(nn.Module):
    """A ``(rows, cols)`` weight held compressed: the shared state of the embedding and the head.

    ``dtype`` is the float dtype the module computes in (that of the dense module it replaced).
    Moving the module (``.to(device)``) moves the codes; casting it (``.to(torch.bfloat16)``,
    ``.half()``) changes only ``dtype``: the stored codes and scales keep their own dtypes.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        fmt: str,
        group_size: int = DEFAULT_GROUP_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.layer_name = name or type(self).__name__
        check_embedding_options(fmt, group_size)
        if fmt is None:
            raise ValueError(f"{self.layer_name}: a compressed module needs a format, one of {EMBEDDING_FORMATS}")
        if fmt == "int4" and cols % group_size:
            raise ValueError(f"{self.layer_name}: int4 group size {group_size} does not divide the row length {cols}")
        self.rows, self.cols, self.fmt, self.group_size, self.dtype = rows, cols, fmt, group_size, dtype
        self._operands: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # see _kernel_operands
        for key, (shape, stored) in self.expected_tensors().items():
            self.register_buffer(key, torch.zeros(shape, dtype=stored, device=device))

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Stored tensor name -> (shape, dtype), as the checkpoint must hold them."""
        if self.fmt in _FLOAT_FORMATS:
            return {"weight": ((self.rows, self.cols), _FLOAT_FORMATS[self.fmt])}
        if self.fmt == "int8":
            return {"weight": ((self.rows * self.cols,), torch.int8), "weight_scale": ((self.rows,), torch.float16)}
        return {
            "weight": ((self.rows * self.cols // 2,), torch.uint8),
            "weight_scale": ((self.rows, self.cols // self.group_size), torch.float16),
        }

    @torch.no_grad()
    def compress_(self, weight: torch.Tensor) -> CompressedWeight:
        """Fill the codes from a dense ``(rows, cols)`` float weight."""
        if tuple(weight.shape) != (self.rows, self.cols):
            raise ValueError(f"{self.layer_name}: weight {tuple(weight.shape)} is not ({self.rows}, {self.cols})")
        codes, scale = quantize(weight, self.fmt, self.group_size, self.layer_name)
        self.weight = codes.to(self.weight.device)
        if scale is not None:
            self.weight_scale = scale.to(self.weight.device)
        return self

    @property
    def _scale(self) -> torch.Tensor | None:
        return self._buffers.get("weight_scale")

    def rows_of(self, index: torch.Tensor | slice = slice(None), dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``index`` of the dequantized weight (only those rows are read), as ``dtype`` or ``self.dtype``."""
        return dequantize(self.weight, self._scale, self.fmt, self.cols, index, dtype or self.dtype)

    def dequantized(self) -> torch.Tensor:
        """The whole dense weight ``(rows, cols)`` in ``self.dtype`` (inspection, dequantization, tests)."""
        return self.rows_of()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in ``x.dtype``, never holding more than a block of dequantized rows."""
        if self.fmt in _FLOAT_FORMATS:
            return F.linear(x.to(self.weight.dtype), self.weight.view(self.rows, self.cols)).to(x.dtype)
        x2d = x.reshape(-1, self.cols)
        kernel = self._kernel(x2d)
        y = kernel(x2d) if kernel is not None else self._blocked_matmul(x2d)
        return y.view(*x.shape[:-1], self.rows)

    def _kernel(self, x2d: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """torch's weight-only CPU kernel for this format, when it applies to ``x2d``."""
        needs_grad = torch.is_grad_enabled() and x2d.requires_grad  # the kernels have no autograd formula
        if x2d.device.type != "cpu" or x2d.shape[0] > KERNEL_MAX_ROWS or needs_grad:
            return None
        if self.fmt == "int8":
            if kernel_unavailable("native") is None:
                return self._native_int8
            return self._torch_int8 if self.cols % _INT8_TORCH_KERNEL_COLS == 0 and not compiling() else None
        if self.rows % 16 == 0 and self.group_size in _INT4_KERNEL_GROUPS and not compiling():
            return self._int4_kernel_matmul
        return None

    def _native_int8(self, x2d: torch.Tensor) -> torch.Tensor:
        """float32 activations, faster than torch's kernel (docs/embeddings.md); a custom op when compiled."""
        if compiling():  # no cached operands (their key reads data pointers)
            codes = self.weight.view(self.rows, self.cols)
            return ops.int8_rows_linear(x2d, codes, self.weight_scale.float()).to(x2d.dtype)
        codes, scale = self._kernel_operands()
        return native.int8_linear(x2d, codes, scale).to(x2d.dtype)

    def _torch_int8(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.weight.data_ptr() % 64:  # e.g. mapped from a safetensors file (8-byte aligned): copy once
            self.weight = _aligned(self.weight)
        w = self.weight.view(self.rows, self.cols)
        # bfloat16 activations: about 8x faster than float32 ones here (docs/embeddings.md)
        y = torch.ops.aten._weight_int8pack_mm(_aligned(x2d.bfloat16()), w, self.weight_scale.bfloat16())
        return y.to(x2d.dtype)

    def _int4_kernel_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        packed, scale_zeros = self._kernel_operands()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.bfloat16(), packed, self.group_size, scale_zeros)
        return y.to(x2d.dtype)

    def _kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes and scales as the CPU kernel takes them, built once per storage (not saved).

        int8: the ``(rows, cols)`` codes and float32 scales of the native kernel. int4: torch's
        internal layout, so the checkpoint keeps the plain layout and this copy (as large as the
        codes) is made on first use, 4096 rows at a time.
        """
        key = (self.weight.data_ptr(), self.weight._version, self.weight_scale.data_ptr(), self.weight_scale._version)
        if self._operands is None or self._operands[0] != key:
            if self.fmt == "int8":
                operands = (self.weight.view(self.rows, self.cols), self.weight_scale.float())
            else:
                packed = self.weight.view(self.rows, self.cols // 2)
                blocks = []
                for start in range(0, self.rows, 4096):
                    b = packed[start : start + 4096]
                    nibbles = torch.stack((b & 15, b >> 4), dim=-1).view(b.shape[0], self.cols).to(torch.int32)
                    blocks.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1))
                scale = self.weight_scale.t().bfloat16()
                operands = (torch.cat(blocks), torch.stack((scale, torch.zeros_like(scale)), dim=-1).contiguous())
            self._operands = (key, *operands)
        return self._operands[1], self._operands[2]

    def _blocked_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        step = max(1, _BLOCK_ELEMENTS // self.cols)
        blocks = [
            F.linear(x2d, self.rows_of(slice(start, start + step), x2d.dtype)) for start in range(0, self.rows, step)
        ]
        return torch.cat(blocks, dim=-1)

    def storage_bytes(self) -> int:
        """Bytes of the stored codes and scales."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CompressedWeight:
        stored = {key: t for key, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for key, before in stored.items():
            after = self._buffers[key]
            if after.dtype != before.dtype:  # a cast: keep the stored dtype, take only the move
                self._buffers[key] = before.to(after.device)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        self._operands = None
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        for key, (shape, dtype) in self.expected_tensors().items():
            tensor = state_dict.get(prefix + key)
            if tensor is not None and (tuple(tensor.shape) != shape or tensor.dtype != dtype):
                raise ValueError(
                    f"{prefix}{key}: checkpoint has {tuple(tensor.shape)} {tensor.dtype}, {self.layer_name} "
                    f"({self.fmt}, weight ({self.rows}, {self.cols})) needs {shape} {dtype}"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return f"{self.rows}, {self.cols}, format={self.fmt}{group}, dtype={self.dtype}"


class CompressedEmbedding(CompressedWeight):
    """Replacement for ``nn.Embedding``: a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, group_size: int = DEFAULT_GROUP_SIZE,
                 padding_idx: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, name: str | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, fmt, group_size, dtype, device, name)
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.rows

    @property
    def embedding_dim(self) -> int:
        return self.cols

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows_of(input_ids)

    def dense_module(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the dequantized weight."""
        w = self.dequantized()
        dense = nn.Embedding(self.rows, self.cols, self.padding_idx, device=w.device, dtype=w.dtype)
        dense.weight.data.copy_(w)
        return dense


class _Head:
    """What both heads share: ``nn.Linear``'s sizes and ``x @ W.T (+ bias)`` from the compressed weight ``codes``."""

    codes: CompressedWeight
    bias: nn.Parameter | None

    in_features = property(lambda self: self.codes.cols, doc="Inputs of the head (the embedding width).")
    out_features = property(lambda self: self.codes.rows, doc="Outputs of the head (the vocabulary).")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.codes.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class CompressedLinear(_Head, CompressedWeight):
    """Replacement for an untied ``nn.Linear`` head (``out_features`` rows of ``in_features``)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int = DEFAULT_GROUP_SIZE,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, name: str | None = None) -> None:
        super().__init__(out_features, in_features, fmt, group_size, dtype, device, name)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def codes(self) -> CompressedWeight:
        return self

    def dense_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight."""
        return _dense_linear(self.dequantized(), self.bias)


class TiedCompressedLinear(_Head, nn.Module):
    """An output head tied to a :class:`CompressedEmbedding`: ``x @ E.T (+ bias)`` from the embedding's codes.

    It holds no codes (the embedding is referenced, not registered, so the model's state dict and
    checkpoint hold the tensors once, under the embedding's names).
    """

    def __init__(self, embedding: CompressedEmbedding, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: no second copy of its keys
        self.bias = bias

    @property
    def codes(self) -> CompressedWeight:
        return self.embedding

    def dense_module(self, embedding: nn.Embedding) -> nn.Linear:
        """A plain ``nn.Linear`` sharing the weight of ``embedding`` (the dequantized, dense embedding)."""
        head = _dense_linear(embedding.weight.detach(), self.bias)
        head.weight = embedding.weight
        return head

    def extra_repr(self) -> str:
        return f"tied to {self.embedding.layer_name}, bias={self.bias is not None}"


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy of it starting on 64 bytes (torch's allocator aligns to 64).

    torch 2.13's ``_weight_int8pack_mm`` crashes (segmentation fault) on CPU when its weight
    (with more than one row of activations) or its activations do not start on a 16-byte boundary.
    """
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


# -- models ------------------------------------------------------------------------------------------
def dense_module_names(model: nn.Module) -> list[str]:
    """What :func:`compress_dense_modules` compresses by default: every ``nn.Embedding`` and the output head.

    The output head is ``model.get_output_embeddings()`` (transformers models) when it is a
    plain ``nn.Linear`` (not converted to TBN).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name for name, m in model.named_modules() if isinstance(m, nn.Embedding) or (m is head and type(m) is nn.Linear)
    ]


def compress_dense_modules(
    model: nn.Module, embedding_format: str, group_size: int = DEFAULT_GROUP_SIZE, names: list[str] | None = None
) -> list[str]:
    """Swap dense embeddings / linear heads of a loaded model for compressed ones, in place.

    ``names`` defaults to :func:`dense_module_names`. A head tied to a compressed embedding
    becomes a :class:`TiedCompressedLinear` on the embedding's codes. Returns the names swapped.
    """
    return _swap(model, embedding_format, group_size, names, fill=True)


def init_compressed_modules(
    model: nn.Module, embedding_format: str, group_size: int = DEFAULT_GROUP_SIZE, names: list[str] | None = None
) -> list[str]:
    """Like :func:`compress_dense_modules`, but the new modules are empty, on the dense modules' device.

    For reloading a compressed checkpoint: call it on the model before its weights are loaded
    (transformers' meta model); the checkpoint then fills the codes and scales by key.
    """
    return _swap(model, embedding_format, group_size, names, fill=False)


def _swap(model: nn.Module, fmt: str, group_size: int, names: list[str] | None, fill: bool) -> list[str]:
    check_embedding_options(fmt, group_size)
    if fmt is None:
        raise ValueError(f"embedding_format must be one of {EMBEDDING_FORMATS} to compress modules, got None")
    names = dense_module_names(model) if names is None else list(names)
    modules = {name: model.get_submodule(name) for name in names}
    ties = {}
    for head, embedding in _tie_pairs(model).items():
        if (head in modules) != (embedding in modules):
            raise ValueError(f"{head} is tied to {embedding}: compress both or neither")
        if head in modules:
            ties[head] = embedding
    compressed: dict[str, CompressedWeight] = {}
    for name, module in modules.items():
        if name not in ties:
            compressed[name] = _compressed_from(module, name, fmt, group_size)
            if fill:
                compressed[name].compress_(module.weight)
            model.set_submodule(name, compressed[name])
    for head, embedding in ties.items():
        model.set_submodule(head, TiedCompressedLinear(compressed[embedding], modules[head].bias))
    _drop_tie_bookkeeping(model, names)
    return names


def _compressed_from(module: nn.Module, name: str, fmt: str, group_size: int) -> CompressedWeight:
    w = module.weight
    if isinstance(module, nn.Embedding):
        if type(module).forward is not nn.Embedding.forward or module.max_norm is not None:
            raise ValueError(f"{name}: {type(module).__name__} changes the lookup (own forward or max_norm); "
                             "only plain nn.Embedding lookups can be compressed")
        return CompressedEmbedding(module.num_embeddings, module.embedding_dim, fmt, group_size, module.padding_idx,
                                   w.dtype, w.device, name)
    if type(module) is nn.Linear:
        return CompressedLinear(module.in_features, module.out_features, fmt, group_size, module.bias is not None,
                                w.dtype, w.device, name)
    raise ValueError(f"{name}: {type(module).__name__} cannot be compressed, only nn.Embedding and nn.Linear")


def _tie_pairs(model: nn.Module) -> dict[str, str]:
    """Linear name -> name of the ``nn.Embedding`` whose weight it shares, over the whole model.

    Tied means the same Parameter (a loaded model) or a pair in transformers'
    ``all_tied_weights_keys`` (a model still on the meta device is tied only after loading).
    """
    embeddings = {name: m for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    by_weight = {id(m.weight): name for name, m in embeddings.items()}
    pairs = {name: by_weight[id(m.weight)] for name, m in linears.items() if id(m.weight) in by_weight}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        a, b = target.removesuffix(".weight"), source.removesuffix(".weight")
        for head, embedding in ((a, b), (b, a)):
            if head in linears and embedding in embeddings:
                pairs[head] = embedding
    return pairs


def _drop_tie_bookkeeping(model: nn.Module, names: list[str]) -> None:
    """Remove the compressed modules' weights from transformers' tie mappings.

    The tied head reads the embedding's codes directly; transformers would otherwise look for a
    ``weight`` Parameter to share (``tie_weights``, ``mark_tied_weights_as_initialized``).
    """
    def involved(key: str) -> bool:
        return any(key.startswith(name + ".") for name in names)

    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        for target, source in list(tied.items()):
            if involved(target) or involved(source):
                del tied[target]
    for prefix, sub in model.named_modules():
        declared = getattr(sub, "_tied_weights_keys", None)
        if isinstance(declared, dict) and hasattr(sub, "get_expanded_tied_weights_keys"):
            full = (prefix + ".") if prefix else ""
            sub._tied_weights_keys = {
                t: s for t, s in declared.items() if not (involved(full + t) or involved(full + s))
            }


def compressed_modules(model: nn.Module) -> dict[str, CompressedWeight | TiedCompressedLinear]:
    """Every compressed module of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (CompressedWeight, TiedCompressedLinear))}


def checkpoint_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint key -> (shape, dtype) of every compressed tensor of ``model`` (for checks before loading)."""
    return {
        f"{name}.{key}": spec
        for name, m in compressed_modules(model).items() if isinstance(m, CompressedWeight)
        for key, spec in m.expected_tensors().items()
    }


def decompress_dense_modules(model: nn.Module) -> list[str]:
    """Swap every compressed module back for a dense one holding the dequantized weight; ties are restored."""
    modules = compressed_modules(model)
    dense: dict[int, nn.Module] = {}
    for name, m in modules.items():
        if isinstance(m, CompressedWeight):
            dense[id(m)] = m.dense_module()
            model.set_submodule(name, dense[id(m)])
    for name, m in modules.items():
        if isinstance(m, TiedCompressedLinear):
            model.set_submodule(name, m.dense_module(dense[id(m.embedding)]))
    for sub in model.modules():  # transformers' tie mappings as the model class declares them
        if "_tied_weights_keys" in sub.__dict__:
            del sub._tied_weights_keys
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return list(modules)


def compressed_bytes(model: nn.Module) -> int:
    """Bytes the compressed modules of ``model`` store (a tied head adds nothing)."""
    return sum(m.storage_bytes() for m in compressed_modules(model).values() if isinstance(m, CompressedWeight))
