"""TBN layers (Linear, Conv1d, Conv2d), each in the latent or the packed form (docs/foundation.md).

Latent form: a trainable full-precision ``weight`` held as its ``p`` copies ``(p, *tile_shape)``:
``(p, out/p, in, ...)`` for the paper's output layout (copy ``i`` is the block of output rows
``[i * out/p, (i + 1) * out/p)``), ``(p, out, in/p, ...)`` for the input layout (blocks of input
columns or channels; :mod:`hf_tbn.tiling`, ``tile_layout``). The tile and the alphas are derived
from it on every training forward (quantization-aware training). Where the alphas come from is
``alpha_param``: the latent weight itself, a separate trainable tensor of the same shape (the
authors' default), or ``p`` trainable scalars.
Packed form: buffers ``tile`` (uint8 bits, :mod:`hf_tbn.tiling` bit order) and ``alpha`` (``p``
scales) plus the ``bias``; the forward applies the tile once (:mod:`hf_tbn.kernels.backends`), never
building the dense weight: the output layout writes ``p`` scaled copies of its ``out/p`` outputs,
the input layout first sums the ``p`` input blocks with their alphas.
"""

from __future__ import annotations

import math
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _single
from typing_extensions import Unpack

from . import tiling
from .kernels import backends
from .kernels.conv import ConvGeometry

Form = Literal["latent", "packed"]
FORMS: tuple[str, ...] = ("latent", "packed")
AlphaParam = Literal["latent", "tensor", "scalars"]
ALPHA_PARAMS: tuple[str, ...] = ("latent", "tensor", "scalars")


def alpha_sources(weight: torch.Tensor, alpha_param: AlphaParam) -> dict[str, torch.Tensor]:
    """The alpha state ``alpha_param`` keeps beside a latent weight ``(p, *tile_shape)``, initialised from it:
    ``{"alpha_weight": copy of weight}`` ("tensor"), ``{"alpha": the p mean |W_i|}`` ("scalars") or ``{}``
    ("latent", the alphas come from the weight itself). The layers and the quantize-on-load op share it."""
    weight = weight.detach()
    if alpha_param == "tensor":
        return {"alpha_weight": weight.clone()}
    if alpha_param == "scalars":
        return {"alpha": tiling.alpha(weight, weight.shape[0])}
    return {}


class LayerOptions(TypedDict, total=False):
    """The keyword options every TBN layer takes besides its shape and ``compression_factor``."""

    alpha_mode: tiling.AlphaMode
    alpha_param: AlphaParam
    tile_layout: tiling.TileLayout
    form: Form
    device: torch.device | str | None
    dtype: torch.dtype | None
    name: str | None


def check_factor(
    p: object, weight_shape: tuple[int, ...], name: str, groups: int = 1, layout: tiling.TileLayout = "output"
) -> int:
    """Validate a layer's compression factor for its logical weight shape; errors name the layer and the value."""
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
        raise ValueError(f"{name}: compression_factor must be a positive int, got {p!r}")
    if layout == "input" and groups > 1 and p > 1:
        raise ValueError(f"{name}: tile_layout='input' does not tile grouped convolutions (groups {groups}); "
                         "use p=1 or tile_layout='output'")
    width = tiling.split_width(weight_shape, layout)
    if width % p:
        block = "output rows" if layout == "output" else "input columns (channels)"
        raise ValueError(
            f"{name}: compression_factor {p} does not divide the {layout} dimension {width} of weight "
            f"{tuple(weight_shape)}; each tile copy must be a block of whole {block} (tile_layout={layout!r})"
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
    """Shared state and behaviour of the TBN layers; subclasses say how to apply a weight or a tile."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        compression_factor: int,
        groups: int = 1,
        *,
        alpha_mode: tiling.AlphaMode = "per_tile",
        alpha_param: AlphaParam = "latent",
        tile_layout: tiling.TileLayout = "output",
        form: Form = "latent",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.layer_name = name or type(self).__name__
        for field, value, allowed in (
            ("alpha_mode", alpha_mode, tiling.ALPHA_MODES), ("form", form, FORMS),
            ("alpha_param", alpha_param, ALPHA_PARAMS), ("tile_layout", tile_layout, tiling.TILE_LAYOUTS),
        ):
            if value not in allowed:
                raise ValueError(f"{self.layer_name}: {field} must be one of {allowed}, got {value!r}")
        if alpha_param == "scalars" and alpha_mode == "per_layer":
            raise ValueError(
                f"{self.layer_name}: alpha_param='scalars' learns one alpha per copy; use alpha_mode='per_tile'"
            )
        self.weight_shape = torch.Size(weight_shape)
        self.input_width = weight_shape[1] * groups  # input features (linear) or channels (conv)
        self.tile_layout = tile_layout
        self.compression_factor = check_factor(compression_factor, weight_shape, self.layer_name, groups, tile_layout)
        # the tile as a weight, (out/p, in, ...) or, in the input layout, (out, in/p, ...): fixed with the layer,
        # and read by every packed forward (building it there would cost about 2 us a call)
        self.tile_shape = tiling.tile_shape(self.weight_shape, self.compression_factor, tile_layout)
        self.alpha_mode = alpha_mode
        self.alpha_param = alpha_param
        self.backend = "auto"
        self._w_hat_cache: tuple[tuple, torch.Tensor] | None = None
        # latent forward: blend * W_hat + (1 - blend) * W (hf_tbn.warmup; 1: plain TBN)
        self.blend = 1.0
        factory = {"device": device, "dtype": dtype}
        self.bias = nn.Parameter(torch.zeros(weight_shape[0], **factory)) if bias else None
        self.form: Form = form
        if form == "latent":
            self._set_latent_state(torch.empty(self.latent_shape, **factory))
            self.reset_parameters()
        else:
            nbytes = tiling.packed_nbytes(self.tile_length)
            tile = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            self._set_packed_state(tile, torch.ones(self.compression_factor, **factory))

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
    def combines_inputs(self) -> bool:
        """Whether the packed forward first sums the ``p`` input blocks with their alphas (input layout, ``p > 1``;
        at ``p = 1`` both layouts are the same layer)."""
        return self.tile_layout == "input" and self.compression_factor > 1

    @property
    def latent_shape(self) -> torch.Size:
        """Shape of the latent weight: the ``p`` copies of the tile's shape, ``(p, *tile_shape)``."""
        return torch.Size((self.compression_factor, *self.tile_shape))

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the layer's state (latent weight, or the packed alphas)."""
        return (self.weight if self.form == "latent" else self.alpha).dtype

    @property
    def device(self) -> torch.device:
        """Device of the layer's state."""
        return (self.weight if self.form == "latent" else self.tile).device

    # -- state of each form ------------------------------------------------------------
    def _set_latent_state(self, weight: torch.Tensor, alpha: torch.Tensor | None = None) -> None:
        """``weight`` ``(p, *tile_shape)`` and the alpha source ``alpha_param`` asks for, initialised from ``weight``
        (the ``p`` scalars from ``alpha`` when given: packed -> latent keeps the packed alphas)."""
        self.weight = nn.Parameter(weight)
        for key, value in alpha_sources(weight, self.alpha_param).items():
            start = alpha.detach().clone().to(weight.dtype) if key == "alpha" and alpha is not None else value
            setattr(self, key, nn.Parameter(start))

    def _set_packed_state(self, tile: torch.Tensor, alpha: torch.Tensor) -> None:
        self.register_buffer("tile", tile)
        self.register_buffer("alpha", alpha)

    def _state_keys(self) -> dict[str, tuple[torch.Size, torch.dtype | None]]:
        """Every tensor (besides the bias) the current form holds: name -> (shape, dtype or None for any float)."""
        if self.form == "packed":
            tile_shape = torch.Size([tiling.packed_nbytes(self.tile_length)])
            return {"tile": (tile_shape, torch.uint8), "alpha": (torch.Size([self.compression_factor]), None)}
        keys = {"weight": (self.latent_shape, None)}
        if self.alpha_param == "tensor":
            keys["alpha_weight"] = (self.latent_shape, None)
        elif self.alpha_param == "scalars":
            keys["alpha"] = (torch.Size([self.compression_factor]), None)
        return keys

    def reset_parameters(self) -> None:
        """torch's Linear / Conv initialisation of the dense weight; a separate alpha tensor gets its own draw."""
        bound = 1 / math.sqrt(self.numel // self.weight_shape[0])  # kaiming_uniform_(a=sqrt(5)) on the dense weight
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.alpha_param == "tensor":
                self.alpha_weight.uniform_(-bound, bound)
            elif self.alpha_param == "scalars":
                self.alpha.copy_(tiling.alpha(self.weight, self.compression_factor))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    # -- the tile and the alphas, in either form ---------------------------------------
    def tile_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tile ``t`` as +-1 values, shape ``(L,)``."""
        if self.form == "latent":
            return tiling.aggregate_sign(self.weight.detach(), self.compression_factor).to(dtype)
        return tiling.unpack_bits(self.tile, self.tile_length, dtype)

    def _alpha(self) -> torch.Tensor:
        """The ``p`` alphas of the latent form, differentiable w.r.t. their source."""
        p = self.compression_factor
        if self.alpha_param == "latent":
            return tiling.alpha(self.weight, p, self.alpha_mode)
        if self.alpha_param == "tensor":
            return tiling.alpha(self.alpha_weight, p, self.alpha_mode)
        return self.alpha

    def alpha_values(self) -> torch.Tensor:
        """The ``p`` alphas (detached), in either form."""
        return self.alpha if self.form == "packed" else self._alpha().detach()

    def effective_weight(self) -> torch.Tensor:
        """Dense ``W_hat`` in the logical ``(out, in, ...)`` orientation; differentiable in the latent form."""
        if self.form == "latent":
            return tiling.from_copies(tiling.tiled_weight(self.weight, self.compression_factor, self._alpha()),
                                      self.tile_layout)
        return tiling.dequantize(self.tile_values(self.alpha.dtype), self.alpha, self.weight_shape, self.tile_layout)

    def _latent_w_hat(self) -> torch.Tensor:
        """The latent forward's weight, ``W_hat`` blended with ``W`` while ``blend < 1`` (:attr:`blend`);
        reused while no gradient is taken and its sources do not change."""
        if torch.is_grad_enabled():
            self._w_hat_cache = None
            return self._blended_w_hat()
        sources = [self.weight, *(getattr(self, name) for name in self._state_keys() if name != "weight")]
        key = (self.blend, *((t.data_ptr(), t._version, t.dtype, t.device) for t in sources))
        if self._w_hat_cache is None or self._w_hat_cache[0] != key:
            self._w_hat_cache = (key, self._blended_w_hat())
        return self._w_hat_cache[1]

    def _blended_w_hat(self) -> torch.Tensor:
        w_hat = self.effective_weight()
        if self.blend >= 1:
            return w_hat
        return self.blend * w_hat + (1 - self.blend) * tiling.from_copies(self.weight, self.tile_layout)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "latent":
            return self._apply_weight(x, self._latent_w_hat(), self.bias)
        # the dense ops check this themselves; the tile kernels cannot (a row length is not stored)
        features = self._input_width(x)
        if features != self.input_width:
            raise ValueError(f"{self.layer_name}: input has {features} features or channels, the layer takes "
                             f"{self.input_width}")
        return self._apply_tile(x)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _apply_tile(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _input_width(self, x: torch.Tensor) -> int:
        """Input features (linear) or channels (conv) of ``x``."""
        return x.shape[-1 - len(self.weight_shape[2:])]

    # -- conversions between the forms ---------------------------------------------------
    @torch.no_grad()
    def pack(self) -> TBNLayer:
        """Latent -> packed, in place: exact (the bits and alphas of the current latent state)."""
        if self.form == "packed":
            return self
        if hasattr(self.weight, "full_tensor"):  # a DTensor: this process holds only its shard
            raise ValueError(f"{self.layer_name}: the latent weight is sharded (FSDP); gather the whole parameters "
                             "(FSDPModule.unshard(), or Trainer.save_model) before packing")
        tile = tiling.pack_bits(tiling.aggregate_sign(self.weight.detach(), self.compression_factor))
        alpha = self.alpha_values().clone()
        for key in self._state_keys():
            delattr(self, key)
        self._w_hat_cache = None
        self.form = "packed"
        self._set_packed_state(tile, alpha)
        return self

    @torch.no_grad()
    def to_latent(self) -> TBNLayer:
        """Packed -> latent, in place: ``W = W_hat``, which reproduces the same tile and alphas."""
        if self.form == "latent":
            return self
        weight = tiling.to_copies(self.effective_weight(), self.compression_factor, self.tile_layout).contiguous()
        alpha = self.alpha.clone()
        del self.tile, self.alpha
        self.form = "latent"
        self._set_latent_state(weight, alpha)
        return self

    # -- storage -------------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes the packed form of this layer's weight takes (tile + alphas, no bias)."""
        return tiling.packed_nbytes(self.tile_length) + self._alpha_bytes() * self.compression_factor

    def bits_per_weight(self) -> float:
        """Storage of the packed weight in bits per dense weight (1/p + alpha overhead)."""
        return tiling.bits_per_weight(self.numel, self.compression_factor, 8 * self._alpha_bytes())

    def _alpha_bytes(self) -> int:
        return self.alpha.element_size() if self.form == "packed" else 4

    # -- checkpoint checks ---------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # noqa: ANN001, E501
        """Refuse a state dict of the other form, a wrong shape or dtype, a missing tensor or non-finite alphas.

        A state dict without any tensor of this layer (peft loading only adapter weights) is let through.
        """
        own = {key[len(prefix):] for key in state_dict if key.startswith(prefix) and "." not in key[len(prefix):]}
        expected = self._state_keys()
        where = f"layer {self.layer_name} ({self.form}, weight {tuple(self.weight_shape)}, p={self.compression_factor})"
        if own:
            other = own - set(expected) - {"bias"}
            if other:
                raise ValueError(f"{prefix}{sorted(other)[0]}: not a tensor of {where}; it holds {sorted(expected)}")
            missing = sorted(set(expected) - own)
            if missing:
                raise ValueError(f"{prefix}{missing[0]}: missing from the state dict; {where} needs it")
        for key, (shape, dtype) in expected.items():
            tensor = state_dict.get(prefix + key)
            if tensor is None:
                continue
            if tensor.shape != shape or (dtype is not None and tensor.dtype != dtype):
                raise ValueError(
                    f"{prefix}{key}: checkpoint has {tuple(tensor.shape)} {tensor.dtype}, {where} needs {tuple(shape)}"
                    + (f" {dtype}" if dtype is not None else "")
                )
            if key == "alpha" and tensor.device.type != "meta":
                tiling.check_alpha_finite(f"{prefix}{key}", tensor)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        if name == "weight" and self.__dict__.get("form") == "packed":
            if self.__dict__.get("_hf_loading"):
                # transformers initialises a freshly loaded model module by module, and some model classes
                # (GPT-2) re-initialise a child's weight from the parent: give them a placeholder marked as loaded.
                placeholder = torch.empty(self.weight_shape, dtype=self.dtype, device="meta")
                placeholder._is_hf_initialized = True
                return placeholder
            raise AttributeError(
                f"{self.__dict__.get('layer_name')}: a packed TBN layer has no dense 'weight': it stores the tile bits "
                "('tile', uint8) and p alphas ('alpha'). Use effective_weight() for the dense W_hat, .dtype / .device "
                "for its dtype and device, or hf_tbn.to_latent_model(model) to train"
            )
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return (
            f"weight_shape={tuple(self.weight_shape)}, p={self.compression_factor}, alpha_mode={self.alpha_mode}, "
            f"alpha_param={self.alpha_param}, tile_layout={self.tile_layout}, form={self.form}, "
            f"bias={self.bias is not None}"
        )


class TBNLinear(TBNLayer):
    """TBN replacement for ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (as its transpose)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compression_factor: int = 4,
        **options: Unpack[LayerOptions],
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        super().__init__((out_features, in_features), bias, compression_factor, **options)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _apply_tile(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # not self.tile: Module.__getattr__ costs about 1 us per decoding call
        tile, alpha = buffers["tile"], buffers["alpha"]
        if self.combines_inputs:  # x (..., in) -> (..., in/p); the tile is then one (out, in/p) weight
            x, alpha = tiling.combined_inputs(x, alpha), alpha.new_ones(1)
        rows = self.tile_shape[0]
        return backends.linear(x, tile, alpha, self.bias, rows, self.backend, self.layer_name)

    def dense_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W_hat`` (dequantization)."""
        w = self.effective_weight().detach()
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        _copy_into(out, w, self.bias)
        return out


class _TBNConvNd(TBNLayer):
    """Conv layers: stride, padding, dilation and groups as in ``nn.ConvNd``."""

    _tuple = staticmethod(_pair)
    _dense_type: type[nn.Module]

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
        **options: Unpack[LayerOptions],
    ) -> None:
        if in_channels % groups or out_channels % groups:
            name = options.get("name") or type(self).__name__
            raise ValueError(f"{name}: groups {groups} must divide in and out channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = self._tuple(kernel_size)
        self.stride = self._tuple(stride)
        self.padding = padding if isinstance(padding, str) else self._tuple(padding)
        self.dilation = self._tuple(dilation)
        self.groups = groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.geometry = ConvGeometry(shape, self.stride, self.padding, self.dilation, groups)
        super().__init__(shape, bias, compression_factor, groups, **options)
        # what the packed forward convolves: once it combines the inputs, the tile is one (out, in/p, k...) weight
        self.tile_geometry = self.geometry if not self.combines_inputs else ConvGeometry(
            tuple(self.tile_shape), self.stride, self.padding, self.dilation, groups
        )

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.geometry.conv(x, weight, bias, self.groups)

    def _apply_tile(self, x: torch.Tensor) -> torch.Tensor:
        tile, alpha = self.tile, self.alpha
        if self.combines_inputs:  # x (n, in, ...) -> (n, in/p, ...)
            x, alpha = tiling.combined_inputs(x, alpha, dim=-1 - len(self.kernel_size)), alpha.new_ones(1)
        return backends.conv(x, tile, alpha, self.bias, self.tile_geometry, self.backend, self.layer_name)

    def dense_module(self) -> nn.Module:
        """A plain ``nn.ConvNd`` holding ``W_hat`` (dequantization)."""
        w = self.effective_weight().detach()
        out = self._dense_type(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, device=w.device, dtype=w.dtype,
        )
        _copy_into(out, w, self.bias)
        return out


class TBNConv1d(_TBNConvNd):
    """TBN replacement for ``nn.Conv1d``."""

    _tuple = staticmethod(_single)
    _dense_type = nn.Conv1d


class TBNConv2d(_TBNConvNd):
    """TBN replacement for ``nn.Conv2d``."""

    _dense_type = nn.Conv2d


@torch.no_grad()
def _copy_into(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    module.weight.copy_(weight)
    if bias is not None:
        module.bias.copy_(bias)
