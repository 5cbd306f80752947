"""Lower a sequential torch model to the flat list of operations the C runtime executes.

Supported graph: a chain. The model is walked depth-first; every supported layer is a
step, and a container (``nn.Sequential`` or any module without parameters of its own whose
forward runs its children in registration order) contributes its children. The lowering
checks that chain against the model's own forward on a random input and refuses a model
whose forward does anything else (skip connections, functional calls, reordering).
BatchNorm directly after a Linear/Conv layer is folded into that layer's scales and bias, and a
ReLU after a layer with scales or a bias into its copy step. A layer of the input tile layout
becomes two steps: the alpha-weighted sum of its ``p`` input blocks (:class:`CombineOp`), then
its tile as one ``p = 1`` layer (hf_tbn.tiling).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .. import tiling
from ..convert import pack_model
from ..layers import TBNConv2d, TBNLayer, TBNLinear

WEIGHTED = (TBNLinear, TBNConv2d, nn.Linear, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
NO_OPS = (nn.Flatten, nn.Dropout, nn.Identity)
SUPPORTED = (*WEIGHTED, *NORMS, nn.ReLU, *POOLS, *NO_OPS)
SUPPORTED_NAMES = ", ".join(t.__name__ for t in SUPPORTED)


@dataclass(frozen=True)
class Geometry:
    """A convolution or pooling window over a (C, H, W) tensor, batch 1."""

    in_c: int
    in_h: int
    in_w: int
    out_c: int
    out_h: int
    out_w: int
    k_h: int
    k_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int = 1
    dil_w: int = 1


@dataclass
class Op:
    """One runtime step: ``name`` is the module's dotted path, shapes exclude the batch."""

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def inplace(self) -> bool:
        """Whether the step rewrites its input buffer instead of writing a new one."""
        return False


@dataclass
class WeightedOp(Op):
    """Linear or Conv2d: the ``rows`` rows of a +-1 tile (``tile``) or a float ``weight``.

    ``tile`` holds the packed rows in the runtime's layout (each row padded to 16 bits, the
    hf_tbn.tiling bit order within; a convolution's row column by column, :func:`column_groups`).
    The runtime applies those rows once, then writes ``p`` copies scaled by ``scale`` (``p``
    values, or one per output channel once a BatchNorm is folded), plus ``bias``, clamped at 0
    when a ReLU follows (``relu``, fused into that copy step).
    """

    rows: int = 0
    p: int = 1
    tile: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    geometry: Geometry | None = None
    relu: bool = False

    @property
    def channels(self) -> int:
        return self.out_shape[0]

    @property
    def row_length(self) -> int:
        """Inputs of one output: in features, or ``in_c * k_h * k_w`` of a convolution."""
        return self.in_shape[0] if self.geometry is None else self.geometry.in_c * self.geometry.k_h * self.geometry.k_w

    @property
    def copies_step(self) -> bool:
        """Whether the kernel is followed by the runtime's copy step (scales, bias, a fused ReLU)."""
        return self.scale is not None or self.bias is not None

    @property
    def scale_per_channel(self) -> bool:
        return self.scale is not None and self.scale.numel() == self.channels and self.channels != self.p


def column_groups(geometry: Geometry) -> int:
    """Nibble tables per input column of a tiled convolution: 4 of the k_h * in_c values a window reads
    at one input column each (tbn_rt_conv2d_tile), rounded up to whole halfwords when dilation spreads
    a window's columns apart (each column is then a lookup run of its own)."""
    groups = -(-geometry.k_h * geometry.in_c // 4)
    return groups if geometry.dil_w == 1 else -(-groups // 4) * 4


@dataclass
class CombineOp(Op):
    """The input tile layout's first step: ``y = sum_i alpha[i] x_i`` over the ``p`` equal blocks of the input."""

    alpha: torch.Tensor | None = None


@dataclass
class AffineOp(Op):
    """A BatchNorm that follows no Linear/Conv: ``y = x * scale[c] + shift[c]``, in place."""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    @property
    def inplace(self) -> bool:
        return True


@dataclass
class ReluOp(Op):
    """ReLU, in place."""

    @property
    def inplace(self) -> bool:
        return True


@dataclass
class PoolOp(Op):
    """Max or average pooling (``average``; ``count_include_pad`` as in torch)."""

    geometry: Geometry | None = None
    average: bool = False
    count_include_pad: bool = True


def chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's layers in execution order, containers expanded; refuses unsupported modules."""
    return list(_walk("", model))


def _walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    label = prefix or type(module).__name__
    if isinstance(module, SUPPORTED):
        yield label, module
        return
    children = list(module.named_children())
    if not children:
        raise ValueError(
            f"{label}: {type(module).__name__} is not supported by the MCU exporter (supported: {SUPPORTED_NAMES})"
        )
    own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    if own:
        raise ValueError(
            f"{label}: container {type(module).__name__} holds its own tensors {own}; only chains of layers export"
        )
    for name, child in children:
        yield from _walk(f"{prefix}.{name}" if prefix else name, child)


def prepare(model: nn.Module) -> nn.Module:
    """A float32, eval-mode, packed copy of ``model`` (the user's model is left untouched)."""
    return pack_model(copy.deepcopy(model).float().eval())


@torch.no_grad()
def lower(model: nn.Module, input_shape: tuple[int, ...]) -> list[Op]:
    """The runtime steps of ``model`` (prepared with :func:`prepare`) for one input of ``input_shape``."""
    layers = chain(model)
    _check_finite(layers)
    x = torch.zeros(1, *input_shape)
    ops: list[Op] = []
    for name, module in layers:
        _check_input(name, module, input_shape, tuple(x.shape[1:]))
        y = module(x)
        in_shape, out_shape = tuple(x.shape[1:]), tuple(y.shape[1:])
        x = y
        if isinstance(module, NO_OPS):
            _check_no_op(name, module)
            continue
        if isinstance(module, NORMS):
            scale, shift = _norm_affine(name, module)
            if ops and isinstance(ops[-1], WeightedOp) and ops[-1].out_shape == in_shape and not ops[-1].relu:
                _fold_norm(ops[-1], scale, shift)
            else:
                ops.append(AffineOp(name, type(module).__name__, in_shape, out_shape, scale, shift))
        elif isinstance(module, nn.ReLU):
            if ops and isinstance(ops[-1], WeightedOp) and ops[-1].copies_step and not ops[-1].relu:
                ops[-1].relu = True
                ops[-1].kind += "+ReLU"
            else:
                ops.append(ReluOp(name, "ReLU", in_shape, out_shape))
        elif isinstance(module, POOLS):
            ops.append(_pool_op(name, module, in_shape, out_shape))
        elif isinstance(module, TBNLayer) and module.combines_inputs:
            p = module.compression_factor
            combined = (in_shape[0] // p, *in_shape[1:])
            ops.append(CombineOp(name, f"combine(p={p})", in_shape, combined, module.alpha.detach().float().clone()))
            ops.append(_weighted_op(name, module, combined, out_shape))
        else:
            ops.append(_weighted_op(name, module, in_shape, out_shape))
    _check_chain(model, layers, input_shape)  # after every layer's input was checked
    return ops


def _check_input(name: str, module: nn.Module, input_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """Refuse a Linear/Conv2d input of the wrong width (a packed layer's kernel does not check it)."""
    if isinstance(module, (TBNLinear, TBNConv2d)):
        expected = module.weight_shape[1]
    elif isinstance(module, nn.Linear):
        expected = module.in_features
    elif isinstance(module, nn.Conv2d):
        expected = module.in_channels
    else:
        return
    if not shape or shape[0] != expected:
        what = "input features" if isinstance(module, (TBNLinear, nn.Linear)) else "input channels"
        raise ValueError(f"input shape {input_shape} does not fit: {name} expects {expected} {what}, "
                         f"gets shape {shape}")


def _check_finite(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse NaN or Inf in any floating tensor of a layer (alpha, weight, bias, statistics), naming it."""
    for name, module in layers:
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for key, tensor in tensors:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = tensor.detach().flatten()[~torch.isfinite(tensor.detach().flatten())][:3].tolist()
                raise ValueError(f"{name}: {key} holds non-finite values (e.g. {bad}); it cannot be exported")


def _check_chain(model: nn.Module, layers: list[tuple[str, nn.Module]], input_shape: tuple[int, ...]) -> None:
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    expected = model(x.clone())  # an in-place first layer must not change the chain's input
    y = x
    for _, module in layers:
        y = module(y)
    if y.shape != expected.shape or not torch.allclose(y, expected, rtol=1e-5, atol=1e-6):
        raise ValueError(
            f"{type(model).__name__}: its forward is not the chain of its layers "
            f"({' -> '.join(n for n, _ in layers)}); only sequential models export"
        )


def _check_no_op(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Flatten) and (module.start_dim != 1 or module.end_dim != -1):
        raise ValueError(
            f"{name}: Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}) is not supported, only (1, -1)"
        )


def _norm_affine(name: str, norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"{name}: BatchNorm without running statistics cannot be exported")
    inv = 1.0 / torch.sqrt(norm.running_var.double() + norm.eps)
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(inv)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(inv)
    scale = gamma * inv
    return scale, beta - norm.running_mean.double() * scale


def _fold_norm(op: WeightedOp, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """BatchNorm after a layer: fold it into the float weight, or into per-channel tile scales."""
    bias = op.bias.double() if op.bias is not None else torch.zeros_like(scale)
    if op.weight is not None:
        op.weight = (op.weight.double() * scale.view(-1, *[1] * (op.weight.dim() - 1))).float()
    else:
        per_channel = op.scale.double().repeat_interleave(op.rows) if not op.scale_per_channel else op.scale.double()
        op.scale = (per_channel * scale).float()
    op.bias = (bias * scale + shift).float()
    op.kind += "+BatchNorm"


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pool_op(name: str, pool: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> PoolOp:
    if len(in_shape) != 3:
        raise ValueError(f"{name}: {type(pool).__name__} needs a (C, H, W) input, got {in_shape}")
    if pool.ceil_mode:
        raise ValueError(f"{name}: ceil_mode=True is not supported")
    average = isinstance(pool, nn.AvgPool2d)
    if average and pool.divisor_override is not None:
        raise ValueError(f"{name}: divisor_override is not supported")
    if not average and _pair(pool.dilation) != (1, 1):
        raise ValueError(f"{name}: dilation {pool.dilation} is not supported")
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding)
    geometry = Geometry(*in_shape, *out_shape, k_h, k_w, s_h, s_w, p_h, p_w)
    return PoolOp(name, type(pool).__name__, in_shape, out_shape, geometry, average,
                  bool(getattr(pool, "count_include_pad", True)))


def _weighted_op(name: str, module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> WeightedOp:
    is_conv = isinstance(module, (TBNConv2d, nn.Conv2d))
    kind = type(module).__name__
    if len(in_shape) != (3 if is_conv else 1):
        raise ValueError(f"{name}: {kind} gets an input of shape {in_shape}; add a Flatten before a Linear layer")
    geometry = _conv_geometry(name, module, in_shape, out_shape) if is_conv else None
    bias = module.bias.detach().float().clone() if module.bias is not None else None
    if isinstance(module, TBNLayer):
        p, rows, combined = module.compression_factor, module.tile_shape[0], module.combines_inputs
        if geometry is not None:
            geometry = Geometry(**{**geometry.__dict__, "out_c": rows})
        # the input layout's tile takes the combined input (a CombineOp before it) as one p = 1 layer
        label, copies = (f"{kind}(p={p}, input layout)", 1) if combined else (f"{kind}(p={p})", p)
        scale = torch.ones(1) if combined else module.alpha.detach().float().clone()
        return WeightedOp(name, label, in_shape, out_shape, rows, copies, tile=_row_tile(module, rows, geometry),
                          scale=scale, bias=bias, geometry=geometry)
    return WeightedOp(name, kind, in_shape, out_shape, out_shape[0], 1, weight=module.weight.detach().float().clone(),
                      bias=bias, geometry=geometry)


def _row_tile(layer: TBNLayer, rows: int, geometry: Geometry | None) -> torch.Tensor:
    """The tile's rows packed one by one, each padded to whole halfwords (``layer.tile`` when aligned).

    A convolution's row is stored column by column, ``(kx, ky, ic)``, each column's ``k_h * in_c``
    bits padded to the ``4 * column_groups`` its tables cover (the padding multiplies zeros).
    """
    values = layer.tile_values().view(rows, -1)
    if geometry is not None:
        g = geometry
        columns = values.view(rows, g.in_c, g.k_h, g.k_w).permute(0, 3, 2, 1).reshape(rows, g.k_w, -1)
        pad = 4 * column_groups(g) - columns.shape[2]
        values = torch.cat([columns, columns.new_ones(rows, g.k_w, pad)], dim=2).reshape(rows, -1)
    pad = (-values.shape[1]) % 16
    if pad:
        values = torch.cat([values, values.new_ones(rows, pad)], dim=1)
    return tiling.pack_bits(values)


def _conv_geometry(name: str, conv: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Geometry:
    if conv.groups != 1:
        raise ValueError(f"{name}: groups={conv.groups} is not supported, only 1")
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"{name}: padding_mode {conv.padding_mode!r} is not supported, only 'zeros'")
    padding = conv.padding
    if isinstance(padding, str):
        if padding != "valid":
            raise ValueError(f"{name}: padding={padding!r} is not supported; give explicit integers")
        padding = (0, 0)
    (k_h, k_w), (s_h, s_w), (p_h, p_w), (d_h, d_w) = (
        _pair(conv.kernel_size), _pair(conv.stride), _pair(padding), _pair(conv.dilation)
    )
    return Geometry(*in_shape, *out_shape, k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w)
