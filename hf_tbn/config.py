"""``TBNConfig``: the quantization config users pass to ``from_pretrained`` and ``convert_model``."""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .embeddings import DEFAULT_GROUP_SIZE, check_embedding_options
from .kernels.backends import BACKEND_NAMES
from .layers import ALPHA_PARAMS, FORMS
from .tiling import ALPHA_MODES, TILE_LAYOUTS

QUANT_METHOD = "tbn"


class TBNConfig(QuantizationConfigMixin):
    """Tiled Bit Network quantization (Gorbett et al., CIKM 2024).

    Args:
        compression_factor: p, tile copies per layer; a layer costs about 1/p bits per weight.
        min_compress_size: layers with fewer weights get p = 1 (plain binary), as in the paper.
        layer_compression_factors: module-name pattern -> p, overriding the rule above. A
            pattern matches a module whose dotted name equals it, ends with ``"." + pattern``,
            or ``re.fullmatch``-es it. Every pattern must match at least one layer.
        modules_to_not_convert: module-name patterns (same matching) kept full precision; each
            must match at least one layer.
        alpha_mode: ``"per_tile"`` (one alpha per copy, the paper's default) or ``"per_layer"``.
        alpha_param: where the latent form's alphas come from: ``"latent"`` (mean |W_i| of the
            latent weight), ``"tensor"`` (mean |A_i| of a separate trainable tensor, the authors'
            default) or ``"scalars"`` (p trainable alphas). Packed checkpoints are the same for all.
        tile_layout: along which dimension the ``p`` copies of the tile lie: ``"output"`` (blocks of
            output rows, the paper's) or ``"input"`` (blocks of input columns or channels: better
            for layers that read hidden channels and are followed by BatchNorm, which divides the
            output layout's scales out; worse on structured inputs such as pixels, whose blocks it
            superposes; docs/foundation.md). Both do 1/p of the multiply-adds, on every backend and
            in the microcontroller exporter; the input layout does not tile grouped convolutions.
        form: ``"latent"`` (trainable latent weights) or ``"packed"`` (tile bits + alphas).
        backend: packed-forward compute: ``"auto"`` (Triton on CUDA, the compiled CPU kernel on
            CPU), ``"torch"``, ``"native"`` (the compiled CPU kernel) or ``"triton"``. A runtime
            preference: applied at conversion, never saved (change it with ``hf_tbn.set_backend``).
        embedding_format: the modules TBN leaves dense (embeddings, tied or untied output heads)
            compressed in the same checkpoint: None (kept as they are), ``"bfloat16"``,
            ``"float16"``, ``"int8"`` (per row) or ``"int4"`` (per group), docs/embeddings.md.
        embedding_group_size: the int4 group size.
        warmup: fraction of QAT (any transformers ``Trainer``) that blends from the dense latent
            weight to ``W_hat`` (hf_tbn.warmup, docs/quality.md): ``"auto"`` (0.3, but 0 for models
            that generate: their head is already trained and the warm-up made QAT worse) or a
            number in [0, 1]. It keeps what pretrained weights compute; a model trained from scratch
            has nothing to keep (a ResNet lost 1 point with it): pass 0 there.
        converted_layers: the resolved p of every converted layer, named relative to the base
            model (as transformers' ``base_model_prefix`` does), filled in by the conversion and
            saved in config.json so that a reload rebuilds exactly the same layers.
    """

    def __init__(
        self,
        compression_factor: int = 4,
        min_compress_size: int = 64_000,
        layer_compression_factors: dict[str, int] | None = None,
        modules_to_not_convert: list[str] | None = None,
        alpha_mode: str = "per_tile",
        alpha_param: str = "latent",
        tile_layout: str = "output",
        form: str = "latent",
        backend: str = "auto",
        embedding_format: str | None = None,
        embedding_group_size: int = DEFAULT_GROUP_SIZE,
        warmup: float | str = "auto",
        converted_layers: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        self.hf_tbn_version = kwargs.pop("hf_tbn_version", None)  # which hf_tbn wrote a saved config
        if kwargs:
            raise ValueError(f"TBNConfig got unknown keys {sorted(kwargs)}")
        self.quant_method = QUANT_METHOD
        self.compression_factor = compression_factor
        self.min_compress_size = min_compress_size
        self.layer_compression_factors = _mapping("layer_compression_factors", layer_compression_factors)
        if isinstance(modules_to_not_convert, str):
            raise ValueError(
                "modules_to_not_convert must be a list of module-name patterns, got the string "
                f"{modules_to_not_convert!r} (write [{modules_to_not_convert!r}])"
            )
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.alpha_mode = alpha_mode
        self.alpha_param = alpha_param
        self.tile_layout = tile_layout
        self.form = form
        self.backend = backend
        self.embedding_format = embedding_format
        self.embedding_group_size = embedding_group_size
        self.warmup = warmup
        self.converted_layers = _mapping("converted_layers", converted_layers) or None
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; errors name the field and the value."""
        _check_positive_int("compression_factor", self.compression_factor)
        size = self.min_compress_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"min_compress_size must be a non-negative int, got {self.min_compress_size!r}")
        for pattern, p in self.layer_compression_factors.items():
            _check_positive_int(f"layer_compression_factors[{pattern!r}]", p)
        for name, p in (self.converted_layers or {}).items():
            _check_positive_int(f"converted_layers[{name!r}]", p)
        if self.modules_to_not_convert is not None and not all(isinstance(m, str) for m in self.modules_to_not_convert):
            raise ValueError(f"modules_to_not_convert must be a list of strings, got {self.modules_to_not_convert!r}")
        for field, value, allowed in (
            ("alpha_mode", self.alpha_mode, ALPHA_MODES),
            ("alpha_param", self.alpha_param, ALPHA_PARAMS),
            ("tile_layout", self.tile_layout, TILE_LAYOUTS),
            ("form", self.form, FORMS),
            ("backend", self.backend, BACKEND_NAMES),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        check_embedding_options(self.embedding_format, self.embedding_group_size)
        w = self.warmup
        if w != "auto" and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1):
            raise ValueError(f"warmup must be 'auto' or a number in [0, 1], got {w!r}")
        if self.alpha_param == "scalars" and self.alpha_mode == "per_layer":
            raise ValueError("alpha_param='scalars' learns one alpha per copy; it needs alpha_mode='per_tile'")

    def to_dict(self) -> dict[str, Any]:
        """What config.json records: everything but the runtime ``backend`` (and the default ``tile_layout``), plus
        the writing hf_tbn version."""
        from .version import version

        return {
            "quant_method": self.quant_method,
            "hf_tbn_version": version(),
            "compression_factor": self.compression_factor,
            "min_compress_size": self.min_compress_size,
            "layer_compression_factors": dict(self.layer_compression_factors),
            "modules_to_not_convert": self.modules_to_not_convert,
            "alpha_mode": self.alpha_mode,
            "alpha_param": self.alpha_param,
            # only when not the default: an output-layout config.json stays readable by an hf_tbn without the option
            **({"tile_layout": self.tile_layout} if self.tile_layout != "output" else {}),
            "form": self.form,
            "embedding_format": self.embedding_format,
            "embedding_group_size": self.embedding_group_size,
            "warmup": self.warmup,
            "converted_layers": self.converted_layers,
        }


def _mapping(field: str, value: object) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        got = f"{type(value).__name__} {value!r}"
        raise ValueError(f"{field} must be a dict of module name -> compression factor, got {got}")
    return dict(value)


def _check_positive_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive int, got {value!r}")
