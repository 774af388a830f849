"""Quantization with bit-widths as data: the grid-backed quantizers, the per-layer config
pytree, the layer registry, the one interceptor with its modes, and the public spine
:func:`forward` (see DESIGN.md, "bit-widths are data", and ARCHITECTURE.md)."""

from mixdq_jax.quant.build import act_ranges, qconfig_for
from mixdq_jax.quant.forward import forward
from mixdq_jax.quant.intercept import LayerCall, Mode, Records, intercept
from mixdq_jax.quant.modes import (
    CollectFeatures,
    FakeQuant,
    Float,
    Observe,
    ObserveQuantized,
    RecordShapes,
    default_mode,
    update_ranges,
)
from mixdq_jax.quant.qconfig import (
    ALLOWED_BITS,
    BOS_SUFFIXES,
    OFFICIAL_PROTECTED_ACT_LAYERS,
    QUANT_BITS,
    LayerQConfig,
    QConfig,
    QuantSpec,
    input_parts,
    is_bos_layer,
    mark_active_weights,
    stack_qconfigs,
    write_official_yaml,
)
from mixdq_jax.quant.quantized import QuantizedUNet
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
from mixdq_jax.quant.registry import (
    LayerInfo,
    build_registry,
    layer_group,
    layer_splits,
    unet_layers,
)

__all__ = [
    "ALLOWED_BITS",
    "BOS_SUFFIXES",
    "FLOAT_BITS",
    "FP8_MAX",
    "OFFICIAL_PROTECTED_ACT_LAYERS",
    "QUANT_BITS",
    "CollectFeatures",
    "FakeQuant",
    "Float",
    "LayerCall",
    "LayerInfo",
    "LayerQConfig",
    "Mode",
    "Observe",
    "ObserveQuantized",
    "QConfig",
    "QuantSpec",
    "QuantizedUNet",
    "RecordShapes",
    "Records",
    "act_ranges",
    "build_registry",
    "default_mode",
    "fake_quant",
    "fake_quant_fp8",
    "fake_quant_symmetric",
    "forward",
    "input_parts",
    "intercept",
    "is_bos_layer",
    "layer_group",
    "layer_splits",
    "mark_active_weights",
    "qconfig_for",
    "quantize_activation",
    "quantize_weight",
    "stack_qconfigs",
    "unet_layers",
    "update_ranges",
    "weight_range",
    "write_official_yaml",
]
