"""Tile configs: validation naming the field, the documented defaults, and tile invariance.

Tiles shape the Pallas kernel only; the accumulation is integer and the epilogue elementwise,
so any valid tiling gives the default tiling's result bit for bit (ragged shapes included).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import (
    GemmTiles,
    QuantizeTiles,
    conv_weight_matrix,
    int8_conv2d,
    int8_matmul,
    pack_weights,
    quantize_activation,
    w4a8_matmul,
)
from tests.pallas_kernels._gemm_cases import int_reference, operands

# Every tile setting away from its default, blocks smaller than the ragged dims.
ODD_GEMM = GemmTiles(block_m=16, block_n=16, block_k=16, num_warps=2, num_stages=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_m", 48), ("block_m", 8), ("block_m", 0), ("block_n", 48), ("block_n", -16),
        ("block_n", 8), ("block_k", 100), ("block_k", 32.0), ("block_k", True),
        ("num_warps", 3), ("num_warps", 0), ("num_stages", 0), ("num_stages", 2.5),
    ],
)
def test_gemm_tiles_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"GemmTiles\\.{field} must be") as info:
        GemmTiles(**{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"), [("block", 1000), ("block", 8), ("block", 0), ("num_warps", 6)]
)
def test_quantize_tiles_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"QuantizeTiles\\.{field} must be .*got {value}"):
        QuantizeTiles(**{field: value})


def test_defaults_frozen_and_keyword_only():
    assert dataclasses.astuple(GemmTiles()) == (None, 128, 64, 4, 3)
    assert dataclasses.astuple(QuantizeTiles()) == (4096, 4)
    GemmTiles(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)  # minimum values
    with pytest.raises(TypeError):
        GemmTiles(32)  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        GemmTiles().block_n = 64  # type: ignore[misc]
    assert hash(GemmTiles()) == hash(GemmTiles())  # usable as a static jit argument


def test_default_block_m_rule():
    """block_m=None keeps the former default min(128, max(16, next_pow2(M)))."""
    for m in range(300):
        assert GemmTiles().block_m_for(m) == min(128, max(16, pl.next_power_of_2(m)))
    assert GemmTiles(block_m=32).block_m_for(1000) == 32


def test_wrong_config_class_is_a_type_error():
    x, w = np.zeros((4, 8), np.int8), np.zeros((8, 4), np.int8)
    with pytest.raises(TypeError, match="GemmTiles"):
        int8_matmul(x, w, out_dtype=jnp.int32, backend="xla", tiles=QuantizeTiles())
    with pytest.raises(TypeError, match="QuantizeTiles"):
        quantize_activation(jnp.zeros((4,)), 0.1, 0, backend="xla", tiles=GemmTiles())


@pytest.mark.parametrize("out_dtype", ["int32", "bfloat16"])
def test_int8_matmul_tiles_do_not_change_the_result(out_dtype):
    m, k, n = 77, 100, 70  # ragged against both tilings
    x_q, w_q, a_scale, zp, w_scale, bias = operands(np.random.default_rng(21), m, k, n)
    epi = dict(a_scale=a_scale, a_zero_point=zp, w_scale=w_scale, bias=bias,
               out_dtype=out_dtype, backend="pallas")
    default = np.asarray(int8_matmul(x_q, w_q, **epi))
    odd = np.asarray(int8_matmul(x_q, w_q, tiles=ODD_GEMM, **epi))
    np.testing.assert_array_equal(odd, default)
    if out_dtype == "int32":
        np.testing.assert_array_equal(default, int_reference(x_q, w_q, zp))


@pytest.mark.parametrize("bits", [4, 2])
def test_w4a8_matmul_tiles_do_not_change_the_result(bits):
    m, k, n = 77, 104, 70  # packed segments of 52 / 26 rows: ragged against block_k
    lim = 2 ** (bits - 1)
    x_q, w_q, _, zp, _, _ = operands(np.random.default_rng(22), m, k, n, -lim, lim - 1)
    packed = pack_weights(w_q, bits)
    kw = dict(bits=bits, a_zero_point=zp, out_dtype=jnp.int32, backend="pallas")
    default = np.asarray(w4a8_matmul(x_q, packed, **kw))
    odd = np.asarray(w4a8_matmul(x_q, packed, tiles=ODD_GEMM, **kw))
    np.testing.assert_array_equal(odd, default)
    np.testing.assert_array_equal(default, int_reference(x_q, w_q, zp))


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_conv_tiles_do_not_change_the_result(weight_bits):
    rng = np.random.default_rng(23)
    x_q = rng.integers(-128, 128, size=(1, 7, 9, 8)).astype(np.int8)  # M = 2 * 35 after stride
    lim = 2 ** (weight_bits - 1)
    w_q = rng.integers(-lim, lim, size=(3, 3, 8, 24)).astype(np.int8)
    w = w_q if weight_bits == 8 else pack_weights(conv_weight_matrix(w_q), weight_bits)
    kw = dict(kernel_size=(3, 3), stride=2, padding=1, weight_bits=weight_bits,
              a_zero_point=-9, out_dtype=jnp.int32)
    default = np.asarray(int8_conv2d(x_q, w, backend="pallas", **kw))
    odd = np.asarray(int8_conv2d(x_q, w, backend="pallas", tiles=ODD_GEMM, **kw))
    np.testing.assert_array_equal(odd, default)
    np.testing.assert_array_equal(default, np.asarray(int8_conv2d(x_q, w, backend="reference",
                                                                  **kw)))


def test_quantize_tiles_do_not_change_the_result():
    rng = np.random.default_rng(24)
    x = jnp.asarray(rng.normal(0.3, 2.0, size=(3, 37, 11)).astype(np.float32))  # 1221: ragged
    default = np.asarray(quantize_activation(x, 0.037, 5, backend="pallas"))
    odd = np.asarray(quantize_activation(x, 0.037, 5, backend="pallas",
                                         tiles=QuantizeTiles(block=64, num_warps=2)))
    np.testing.assert_array_equal(odd, default)
    np.testing.assert_array_equal(
        default, np.asarray(quantize_activation(x, 0.037, 5, backend="reference"))
    )
