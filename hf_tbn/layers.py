"""TBN layers (Linear, Conv1d, Conv2d), each in the latent or the packed form.

Latent form: a trainable full-precision ``weight`` in the logical ``(out, in, ...)`` shape;
the tile and the scales are derived from it on every forward (quantization-aware training).
Packed form: buffers ``tile`` (uint8 bits, :mod:`hf_tbn.tiling` bit order) and ``alpha``
(``p`` scales) plus the ``bias``; the forward applies the ``out/p``-row tile once and writes
``p`` scaled copies, never building the dense weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _single

from . import tiling
from .kernels.dispatch import resolve_backend, tile_linear
from .kernels.torch_path import packed_linear

Form = Literal["latent", "packed"]
FORMS: tuple[str, ...] = ("latent", "packed")


def check_factor(p: object, out_features: int, name: str, groups: int = 1) -> int:
    """Validate a layer's compression factor; errors name the layer and the value."""
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
        raise ValueError(f"{name}: compression_factor must be a positive int, got {p!r}")
    if out_features % p:
        raise ValueError(
            f"{name}: compression_factor {p} does not divide the output dimension {out_features}; "
            "each tile copy must be a block of whole output rows"
        )
    if groups > 1 and p % groups and groups % p:
        raise ValueError(f"{name}: compression_factor {p} and groups {groups} must divide one another")
    return p


def check_weight(weight: torch.Tensor, name: str) -> None:
    """Refuse weights TBN cannot tile: empty or not floating point."""
    if not weight.is_floating_point():
        raise ValueError(f"{name}: weight must be floating point, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight is empty, shape {tuple(weight.shape)}")


class TBNLayer(nn.Module):
    """Shared state and behaviour of the TBN layers; subclasses say how to apply a weight."""

    # Whether backend "auto" may pick the compiled CPU kernel (hf_tbn.kernels.dispatch).
    _auto_native = True

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        compression_factor: int,
        alpha_mode: tiling.AlphaMode,
        form: Form,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.layer_name = name or type(self).__name__
        if alpha_mode not in tiling.ALPHA_MODES:
            raise ValueError(f"{self.layer_name}: alpha_mode must be one of {tiling.ALPHA_MODES}, got {alpha_mode!r}")
        if form not in FORMS:
            raise ValueError(f"{self.layer_name}: form must be one of {FORMS}, got {form!r}")
        self.weight_shape = torch.Size(weight_shape)
        self.compression_factor = check_factor(compression_factor, weight_shape[0], self.layer_name, groups)
        self.alpha_mode = alpha_mode
        self.backend = "auto"
        factory = {"device": device, "dtype": dtype}
        self.bias = nn.Parameter(torch.zeros(weight_shape[0], **factory)) if bias else None
        self.form: Form = form
        if form == "latent":
            self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
            self.reset_parameters()
        else:
            self._init_packed_state(torch.device(device) if device is not None else None, dtype)

    # -- shape facts -------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Number of weights N of the dense layer."""
        return math.prod(self.weight_shape)

    @property
    def tile_length(self) -> int:
        """L = N / p."""
        return tiling.tile_length(self.numel, self.compression_factor)

    @property
    def tile_shape(self) -> torch.Size:
        """The tile as a weight of ``out/p`` output rows."""
        return torch.Size((self.weight_shape[0] // self.compression_factor, *self.weight_shape[1:]))

    def reset_parameters(self) -> None:
        """Same initialisation as torch's Linear / Conv layers."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.numel // self.weight_shape[0])
            nn.init.uniform_(self.bias, -bound, bound)

    def _init_packed_state(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        nbytes = tiling.packed_nbytes(self.tile_length)
        self.register_buffer("tile", torch.zeros(nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("alpha", torch.ones(self.compression_factor, dtype=dtype, device=device))

    # -- the tile and the scales, in either form -----------------------------------------
    def tile_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tile ``t`` as +-1 values, shape ``(L,)``."""
        if self.form == "latent":
            return tiling.aggregate_sign(self.weight.detach(), self.compression_factor).to(dtype)
        return tiling.unpack_bits(self.tile, self.tile_length, dtype)

    def scales(self) -> torch.Tensor:
        """The ``p`` scales (detached)."""
        if self.form == "latent":
            return tiling.alphas(self.weight.detach(), self.compression_factor, self.alpha_mode)
        return self.alpha

    def effective_weight(self) -> torch.Tensor:
        """Dense ``W_hat`` in the logical orientation; differentiable in the latent form."""
        if self.form == "latent":
            return tiling.effective_weight(self.weight, self.compression_factor, self.alpha_mode)
        return tiling.dequantize(self.tile_values(self.alpha.dtype), self.alpha, self.weight_shape)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "latent":
            return self._apply_weight(x, self.effective_weight(), self.bias)
        return self._packed_forward(x)

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tile applied once, ``p`` scaled copies, on the path ``self.backend`` selects (hf_tbn.kernels)."""
        row_length = math.prod(self.weight_shape[1:])
        backend = resolve_backend(self.backend, x, self.layer_name, row_length, self._auto_native)
        return self._apply_tile(x, backend)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _apply_tile(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        raise NotImplementedError

    # -- conversions between the forms ---------------------------------------------------
    @torch.no_grad()
    def pack(self) -> TBNLayer:
        """Latent -> packed, in place: exact (the bits and scales of the current weight)."""
        if self.form == "packed":
            return self
        w = self.weight.detach()
        tile = tiling.pack_bits(tiling.aggregate_sign(w, self.compression_factor))
        alpha = tiling.alphas(w, self.compression_factor, self.alpha_mode).clone()
        del self.weight
        self.register_buffer("tile", tile)
        self.register_buffer("alpha", alpha)
        self.form = "packed"
        return self

    @torch.no_grad()
    def to_latent(self) -> TBNLayer:
        """Packed -> latent, in place: ``W = W_hat``, which reproduces the same tile and scales."""
        if self.form == "latent":
            return self
        w = self.effective_weight().clone()
        del self.tile, self.alpha
        self.weight = nn.Parameter(w)
        self.form = "latent"
        return self

    # -- storage -------------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes the packed form of this layer's weight takes (tile + scales, no bias)."""
        scale_bytes = self.alpha.element_size() if self.form == "packed" else 4
        return tiling.packed_nbytes(self.tile_length) + scale_bytes * self.compression_factor

    def bits_per_weight(self) -> float:
        """Storage of the packed weight in bits per dense weight (1/p + scale overhead)."""
        return 8 * self.storage_bytes() / self.numel

    # -- checkpoint checks ---------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        expected = {
            "tile": (torch.Size([tiling.packed_nbytes(self.tile_length)]), torch.uint8),
            "alpha": (torch.Size([self.compression_factor]), None),
            "weight": (self.weight_shape, None),
        }
        for key, (shape, dtype) in expected.items():
            tensor = state_dict.get(prefix + key)
            if tensor is None or key not in self._parameters and key not in self._buffers:
                continue
            if tensor.shape != shape or (dtype is not None and tensor.dtype != dtype):
                raise ValueError(
                    f"{prefix}{key}: checkpoint has {tuple(tensor.shape)} {tensor.dtype}, layer {self.layer_name} "
                    f"(weight {tuple(self.weight_shape)}, p={self.compression_factor}) needs {tuple(shape)}"
                    + (f" {dtype}" if dtype is not None else "")
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        # Model code reads ``layer.weight.dtype`` (ViT) or re-inits ``weight`` (GPT-2): in the packed
        # form ``weight`` is the dense W_hat, rebuilt on each access and never stored.
        if name == "weight" and self.__dict__.get("form") == "packed":
            return self.effective_weight()
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return (
            f"weight_shape={tuple(self.weight_shape)}, p={self.compression_factor}, "
            f"alpha_mode={self.alpha_mode}, form={self.form}, bias={self.bias is not None}"
        )


class TBNLinear(TBNLayer):
    """TBN replacement for ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (as its transpose)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compression_factor: int = 4,
        alpha_mode: tiling.AlphaMode = "per_tile",
        form: Form = "latent",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        shape = (out_features, in_features)
        super().__init__(shape, bias, compression_factor, alpha_mode, form, 1, device, dtype, name)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _apply_tile(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        rows, x2d = self.out_features // self.compression_factor, x.reshape(-1, self.in_features)
        if backend == "torch":
            y = packed_linear(x2d, self.tile, self.alpha, self.bias, rows)
        else:
            y = tile_linear(backend)(x2d, self.tile, self.alpha, self.bias, rows)
        return y.view(*x.shape[:-1], self.out_features)

    def dense_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W_hat`` (dequantization)."""
        w = self.effective_weight().detach()
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        _copy_into(out, w, self.bias)
        return out


class _TBNConvNd(TBNLayer):
    """Conv layers: stride, padding, dilation and groups as in ``nn.ConvNd``."""

    _conv: Callable[..., torch.Tensor]
    _tuple: Callable[[object], tuple[int, ...]]
    _dense_type: type[nn.Module]
    # The CPU kernel takes convs only through unfold (kh * kw times the input's memory), slower
    # than F.convNd on the expanded tile in every case measured: "auto" keeps them on torch.
    _auto_native = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        compression_factor: int = 4,
        alpha_mode: tiling.AlphaMode = "per_tile",
        form: Form = "latent",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name or type(self).__name__}: groups {groups} must divide in and out channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = type(self)._tuple(kernel_size)
        self.stride = type(self)._tuple(stride)
        self.padding = padding if isinstance(padding, str) else type(self)._tuple(padding)
        self.dilation = type(self)._tuple(dilation)
        self.groups = groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        super().__init__(shape, bias, compression_factor, alpha_mode, form, groups, device, dtype, name)

    def _conv_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        return type(self)._conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_with(x, weight, bias, self.groups)

    def _apply_tile(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        if backend != "torch":  # unfold + the kernel's GEMM (hf_tbn.kernels.conv)
            from .kernels.conv import packed_conv

            return packed_conv(
                x, self.tile, self.alpha, self.bias, tuple(self.weight_shape), self.stride, self.padding,
                self.dilation, self.groups, tile_linear(backend),
            )
        tile = tiling.unpack_bits(self.tile, self.tile_length, x.dtype).view(self.tile_shape)
        channel_dim = -1 - len(self.kernel_size)  # counted from the end: batched or not
        if self.groups == 1:
            return tiling.tiled_outputs(self._conv_with(x, tile, None, 1), self.alpha, channel_dim, self.bias)
        # Grouped: each copy reads its own input channels, so only the tile's memory is reused.
        p, in_per_group = self.compression_factor, self.in_channels // self.groups
        groups_per_copy = max(self.groups // p, 1)
        copies_per_group = max(p // self.groups, 1)
        blocks = []
        for i in range(p):
            first = (i // copies_per_group) * groups_per_copy * in_per_group
            xs = x.narrow(channel_dim, first, groups_per_copy * in_per_group)
            blocks.append(self._conv_with(xs, tile, None, groups_per_copy) * self.alpha[i].to(x.dtype))
        y = torch.cat(blocks, dim=channel_dim)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(-1, *([1] * len(self.kernel_size)))
        return y

    def dense_module(self) -> nn.Module:
        """A plain ``nn.ConvNd`` holding ``W_hat`` (dequantization)."""
        w = self.effective_weight().detach()
        out = type(self)._dense_type(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, device=w.device, dtype=w.dtype,
        )
        _copy_into(out, w, self.bias)
        return out


class TBNConv1d(_TBNConvNd):
    """TBN replacement for ``nn.Conv1d``."""

    _conv = staticmethod(F.conv1d)
    _tuple = staticmethod(_single)
    _dense_type = nn.Conv1d


class TBNConv2d(_TBNConvNd):
    """TBN replacement for ``nn.Conv2d``."""

    _conv = staticmethod(F.conv2d)
    _tuple = staticmethod(_pair)
    _dense_type = nn.Conv2d


@torch.no_grad()
def _copy_into(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    module.weight.copy_(weight)
    if bias is not None:
        module.bias.copy_(bias)
