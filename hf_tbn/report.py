"""Per-layer storage table and model-size summary of a TBN model (used by ``inspect``, the demo, the model card)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .convert import tbn_layers
from .layers import TBNLayer

MB = 1e6


@dataclass(frozen=True)
class LayerRow:
    """One converted layer: its dense shape, factor and what its packed weight costs."""

    name: str
    kind: str
    shape: tuple[int, ...]
    p: int
    form: str
    weights: int
    packed_bytes: int
    bits_per_weight: float  # the layer's own (hf_tbn.tiling.bits_per_weight)


@dataclass(frozen=True)
class Summary:
    """Whole-model storage: converted layers packed, everything else at its own dtype."""

    layers: int
    converted_weights: int
    converted_bytes: int
    other_bytes: int
    other_float_elements: int
    other_float_bytes: int

    @property
    def bits_per_weight(self) -> float:
        """Averaged over the converted layers (their tile and alpha bytes over their weights)."""
        return 8 * self.converted_bytes / max(self.converted_weights, 1)

    @property
    def packed_bytes(self) -> int:
        """The whole model with the converted layers packed (what a packed checkpoint holds)."""
        return self.converted_bytes + self.other_bytes

    def dense_bytes(self, bytes_per_element: int) -> int:
        """The same model with every float tensor dense at ``bytes_per_element`` (2: fp16/bf16, 4: fp32)."""
        float_bytes = bytes_per_element * (self.converted_weights + self.other_float_elements)
        return float_bytes + self.other_bytes - self.other_float_bytes


def layer_rows(model: nn.Module) -> list[LayerRow]:
    """One row per TBN layer of ``model``, in module order."""
    return [_row(name, layer) for name, layer in tbn_layers(model)]


def _row(name: str, layer: TBNLayer) -> LayerRow:
    return LayerRow(name, type(layer).__name__, tuple(layer.weight_shape), layer.compression_factor, layer.form,
                    layer.numel, layer.storage_bytes(), layer.bits_per_weight())


def summarize(model: nn.Module) -> Summary:
    """Storage totals; tensors shared between modules (tied weights) count once."""
    rows = layer_rows(model)
    tbn_ids = {id(t) for _, layer in tbn_layers(model) for t in (*layer.parameters(), *layer.buffers())}
    biases = {id(layer.bias) for _, layer in tbn_layers(model) if layer.bias is not None}
    others = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in tbn_ids or id(t) in biases}
    return Summary(
        layers=len(rows),
        converted_weights=sum(r.weights for r in rows),
        converted_bytes=sum(r.packed_bytes for r in rows),
        other_bytes=sum(t.numel() * t.element_size() for t in others.values()),
        other_float_elements=sum(t.numel() for t in others.values() if t.is_floating_point()),
        other_float_bytes=sum(t.numel() * t.element_size() for t in others.values() if t.is_floating_point()),
    )


def format_table(model: nn.Module, max_rows: int | None = None) -> str:
    """A plain-text table: one line per converted layer, then the totals against fp16/bf16 and fp32."""
    rows = layer_rows(model)
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max_rows]
    width = max([len(r.name) for r in shown] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<9} {'shape':<18} {'p':>3} {'form':<6} {'bytes':>10} {'bits/w':>7}"]
    for r in shown:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<{width}}  {r.kind:<9} {shape:<18} {r.p:>3} {r.form:<6} {r.packed_bytes:>10,} "
                     f"{r.bits_per_weight:>7.3f}")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more layers")
    lines.append(format_summary(summarize(model)))
    return "\n".join(lines)


def format_summary(s: Summary) -> str:
    """Totals: converted layers, bits per weight, packed model size against the dense sizes."""
    fp16, fp32 = s.dense_bytes(2), s.dense_bytes(4)
    packed16 = s.converted_bytes + s.other_bytes - s.other_float_bytes + 2 * s.other_float_elements
    return "\n".join([
        f"converted layers: {s.layers}, {s.converted_weights:,} weights -> {s.converted_bytes:,} bytes packed "
        f"({s.bits_per_weight:.3f} bits per weight; fp16 {2 * s.converted_weights:,} bytes, "
        f"{2 * s.converted_weights / max(s.converted_bytes, 1):.1f}x smaller)",
        f"whole model packed: {s.packed_bytes / MB:.2f} MB as stored (unconverted {s.other_bytes / MB:.2f} MB), "
        f"{packed16 / MB:.2f} MB with them in fp16/bf16; dense: fp16/bf16 {fp16 / MB:.2f} MB "
        f"({fp16 / packed16:.2f}x), fp32 {fp32 / MB:.2f} MB",
    ])
