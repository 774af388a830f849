"""Deployment: a chosen quantization config frozen into real low-bit storage (int8, packed
int4/int2 weights + scales) and run through the int8 kernels of `pallas_kernels`.

- `packed`: the per-layer plan and the packer (float params -> packed params tree);
- `grouped`: SVDQuant's group format (W4A4 + a 16-bit low-rank branch): storage and the
  W4A4 GEMM route;
- `layers`: the ``Deployed`` mode of the one interceptor: planned layers on the integer path;
- `lora`: LoRA on a loaded quantized model at run time, as low-rank branches (no
  requantization; scales changeable without recompiling);
- `checkpoint`: in-memory freezing, ``mixdq export`` folders, verifying and loading them
  (`export_folder`: where an export may write, its manifest and checksums);
- `memory`, `latency`: the measurements behind ``mixdq bench``.
"""

from mixdq_jax.deploy.checkpoint import (
    ExportDamagedError,
    QuantCheckpointError,
    check_export,
    deploy_pipeline,
    export_quantized_pipeline,
    freeze,
    is_quantized_folder,
    load_quantized_pipeline,
    load_quantized_unet,
    quantization_config,
    verify_export,
)
from mixdq_jax.deploy.export_folder import ExportProblem
from mixdq_jax.deploy.layers import Deployed, run_layer
from mixdq_jax.deploy.lora import apply_lora, set_lora_scales
from mixdq_jax.deploy.packed import (
    FORMAT_VERSION,
    DeployPlan,
    LayerPlan,
    pack_unet_params,
    pack_unet_params_by_layer,
    packed_shapes,
    quantize_weight_codes,
)

__all__ = [
    "FORMAT_VERSION",
    "DeployPlan",
    "Deployed",
    "apply_lora",
    "ExportDamagedError",
    "ExportProblem",
    "LayerPlan",
    "QuantCheckpointError",
    "check_export",
    "deploy_pipeline",
    "export_quantized_pipeline",
    "freeze",
    "is_quantized_folder",
    "load_quantized_pipeline",
    "load_quantized_unet",
    "pack_unet_params",
    "pack_unet_params_by_layer",
    "packed_shapes",
    "quantization_config",
    "quantize_weight_codes",
    "run_layer",
    "set_lora_scales",
    "verify_export",
]
