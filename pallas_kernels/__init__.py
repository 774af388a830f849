"""Pallas kernels for MixDQ deployment: int8 / packed-int4 GEMMs, activation quantization, conv,
and a group-scaled W4A4 GEMM with a low-rank epilogue (SVDQuant's format).

Every op has a plain-jnp `*_reference`, an XLA fallback and a Pallas (Triton) kernel, chosen by
``backend="auto" | "pallas" | "xla" | "reference"`` (auto: Pallas on GPU, XLA elsewhere; Pallas
off-GPU runs in interpret mode). Tile settings of the Pallas kernels are one frozen config per
op (`GemmTiles` for the GEMMs and the conv, `QuantizeTiles` for activation quantization), passed
as ``tiles=`` (None = defaults).
"""

from pallas_kernels.config import GemmTiles, QuantizeTiles
from pallas_kernels.conv import conv_weight_matrix, im2col, int8_conv2d, int8_conv2d_reference
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference, weight_column_sums
from pallas_kernels.packing import (
    pack_group_weights,
    pack_int2,
    pack_int4,
    pack_weights,
    unpack_group_weights,
    unpack_int2,
    unpack_int4,
    unpack_weights,
    values_per_byte,
)
from pallas_kernels.quantize_act import (
    activation_qparams,
    code_range,
    dequantize_activation,
    quantize_activation,
    quantize_activation_reference,
)
from pallas_kernels.w4a4_matmul import w4a4_matmul, w4a4_matmul_reference
from pallas_kernels.w4a8_matmul import packed_column_sums, w4a8_matmul, w4a8_matmul_reference

__all__ = [
    "GemmTiles",
    "QuantizeTiles",
    "activation_qparams",
    "code_range",
    "conv_weight_matrix",
    "dequantize_activation",
    "im2col",
    "int8_conv2d",
    "int8_conv2d_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "pack_group_weights",
    "pack_int2",
    "pack_int4",
    "pack_weights",
    "packed_column_sums",
    "quantize_activation",
    "quantize_activation_reference",
    "unpack_group_weights",
    "unpack_int2",
    "unpack_int4",
    "unpack_weights",
    "values_per_byte",
    "w4a4_matmul",
    "w4a4_matmul_reference",
    "w4a8_matmul",
    "w4a8_matmul_reference",
    "weight_column_sums",
]
