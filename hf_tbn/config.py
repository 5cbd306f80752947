"""``TBNConfig``: the quantization config users pass to ``from_pretrained`` and ``convert_model``."""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .layers import FORMS
from .tiling import ALPHA_MODES

QUANT_METHOD = "tbn"
BACKENDS: tuple[str, ...] = ("auto", "torch", "native", "triton")


class TBNConfig(QuantizationConfigMixin):
    """Tiled Bit Network quantization (Gorbett et al., CIKM 2024).

    Args:
        compression_factor: p, tile copies per layer; a layer costs about 1/p bits per weight.
        min_compress_size: layers with fewer weights get p = 1 (plain binary), as in the paper.
        layer_compression_factors: module-name pattern -> p, overriding the rule above. A
            pattern matches a module whose dotted name equals it, ends with ``"." + pattern``,
            or ``re.fullmatch``-es it. Every pattern must match at least one layer.
        modules_to_not_convert: module-name patterns (same matching) kept full precision.
        alpha_mode: ``"per_tile"`` (one scale per copy, the paper's default) or ``"per_layer"``.
        form: ``"latent"`` (trainable latent weights) or ``"packed"`` (tile bits + scales).
        backend: packed-forward compute: ``"auto"`` (Triton on CUDA, the compiled CPU kernel on
            CPU), ``"torch"``, ``"native"`` (the compiled CPU kernel) or ``"triton"``.
        layer_factors: the resolved p of every converted layer, filled in by the conversion and
            saved in config.json so that a reload rebuilds exactly the same layers.
    """

    def __init__(
        self,
        compression_factor: int = 4,
        min_compress_size: int = 64_000,
        layer_compression_factors: dict[str, int] | None = None,
        modules_to_not_convert: list[str] | None = None,
        alpha_mode: str = "per_tile",
        form: str = "latent",
        backend: str = "auto",
        layer_factors: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"TBNConfig got unknown keys {sorted(kwargs)}")
        self.quant_method = QUANT_METHOD
        self.compression_factor = compression_factor
        self.min_compress_size = min_compress_size
        self.layer_compression_factors = dict(layer_compression_factors or {})
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.alpha_mode = alpha_mode
        self.form = form
        self.backend = backend
        self.layer_factors = dict(layer_factors) if layer_factors else None
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; errors name the field and the value."""
        _check_positive_int("compression_factor", self.compression_factor)
        size = self.min_compress_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"min_compress_size must be a non-negative int, got {self.min_compress_size!r}")
        for pattern, p in self.layer_compression_factors.items():
            _check_positive_int(f"layer_compression_factors[{pattern!r}]", p)
        for name, p in (self.layer_factors or {}).items():
            _check_positive_int(f"layer_factors[{name!r}]", p)
        if self.modules_to_not_convert is not None and not all(isinstance(m, str) for m in self.modules_to_not_convert):
            raise ValueError(f"modules_to_not_convert must be a list of strings, got {self.modules_to_not_convert!r}")
        for field, value, allowed in (
            ("alpha_mode", self.alpha_mode, ALPHA_MODES),
            ("form", self.form, FORMS),
            ("backend", self.backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "compression_factor": self.compression_factor,
            "min_compress_size": self.min_compress_size,
            "layer_compression_factors": dict(self.layer_compression_factors),
            "modules_to_not_convert": self.modules_to_not_convert,
            "alpha_mode": self.alpha_mode,
            "form": self.form,
            "backend": self.backend,
            "layer_factors": self.layer_factors,
        }


def _check_positive_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive int, got {value!r}")
