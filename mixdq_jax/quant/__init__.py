"""Fake quantization with bit-widths as data: quantizers, the per-layer config pytree, and the
Flax interceptor that applies it (see DESIGN.md, "bit-widths are data")."""

from mixdq_jax.quant.apply import Recorder, fake_quant_context, update_ranges
from mixdq_jax.quant.qconfig import (
    ALLOWED_BITS,
    BOS_SUFFIXES,
    OFFICIAL_PROTECTED_ACT_LAYERS,
    QUANT_BITS,
    LayerQConfig,
    QConfig,
    QuantSpec,
    is_bos_layer,
    stack_qconfigs,
    write_official_yaml,
)
from mixdq_jax.quant.quantize import qconfig_for, quantize_pipeline
from mixdq_jax.quant.quantizers import (
    FLOAT_BITS,
    FP8_MAX,
    fake_quant,
    fake_quant_fp8,
    fake_quant_symmetric,
    quantize_activation,
    quantize_weight,
    weight_range,
)

__all__ = [
    "ALLOWED_BITS",
    "BOS_SUFFIXES",
    "FLOAT_BITS",
    "FP8_MAX",
    "OFFICIAL_PROTECTED_ACT_LAYERS",
    "QUANT_BITS",
    "LayerQConfig",
    "QConfig",
    "QuantSpec",
    "Recorder",
    "fake_quant",
    "fake_quant_context",
    "fake_quant_fp8",
    "fake_quant_symmetric",
    "is_bos_layer",
    "qconfig_for",
    "quantize_activation",
    "quantize_pipeline",
    "quantize_weight",
    "stack_qconfigs",
    "update_ranges",
    "weight_range",
    "write_official_yaml",
]
