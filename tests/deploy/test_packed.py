"""Packed storage: codes equal to the fake quantizer, int4/int2 round trips, shapes and the
memory accounting (abstract packed shapes == bytes of the materialised packed tree)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.deploy import DeployPlan, LayerPlan, pack_unet_params, quantize_weight_codes
from mixdq_jax.deploy.memory import memory_table, plan_for_spec, tree_nbytes
from mixdq_jax.deploy.packed import dequantize_weight, pack_layer, packed_shapes, storage_bits_for
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs
from mixdq_jax.quant import QuantSpec, quantize_weight
from tests.tiny_models import sdxl_unet_config

TINY_UNET = sdxl_unet_config(
    sample_size=8, layers_per_block=1, transformer_layers_per_block=(1, 1)
)


def _kernel(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape) * rng.uniform(0.01, 1.0, size=shape[-1])  # per-channel spread
    w[..., 0] = np.abs(w[..., 0])  # an all-positive channel (range widened to 0)
    w[..., 1] = 0.0  # an all-zero channel (scale floor)
    return jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(48, 24), (3, 3, 8, 16)])
def test_codes_reproduce_the_fake_quantizer(shape, symmetric):
    w = _kernel(shape, 0)
    fmt = "int_sym" if symmetric else "int"
    for bits in range(2, 9):
        q, scale, zp = quantize_weight_codes(w, bits, symmetric=symmetric)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        assert q.dtype == jnp.int8 and int(q.min()) >= lo and int(q.max()) <= hi
        centred = q.astype(jnp.int32) - (0 if zp is None else zp.astype(jnp.int32))
        deq = centred.astype(jnp.float32) * scale
        np.testing.assert_array_equal(deq, quantize_weight(w, bits, fmt=fmt), err_msg=str(bits))


@pytest.mark.parametrize("w_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(64, 24), (3, 3, 8, 16)])
def test_packed_layer_round_trip(shape, w_bits):
    """int8 / int4 / int2 storage holds exactly the fake-quantized kernel; no float copy."""
    kernel = _kernel(shape, 1)
    bias = jnp.arange(shape[-1], dtype=jnp.float32)
    k = int(np.prod(shape[:-1]))
    lp = LayerPlan(
        name="l",
        kind="linear" if len(shape) == 2 else "conv",
        weight_shape=shape,
        w_bits=w_bits,
        a_bits=8,
        storage_bits=storage_bits_for(w_bits, [k]),
        symmetric=False,
    )
    node = pack_layer(
        {"kernel": kernel, "bias": bias}, lp, np.array([-1.0, 2.0]), None, jnp.float32
    )
    assert "kernel" not in node and set(node) == {"bias", "q0"}
    w = node["q0"]["w"]
    assert w.dtype == jnp.int8
    assert w.shape[0] == {2: k // 4, 3: k // 2, 4: k // 2, 8: shape[0]}[w_bits]
    np.testing.assert_array_equal(
        dequantize_weight(node["q0"], lp, (0, shape[-2])), quantize_weight(kernel, w_bits)
    )
    codes = dequantize_weight(
        {**node["q0"], "w_scale": jnp.ones(shape[-1]), "w_zp": jnp.zeros(shape[-1], jnp.int8)},
        lp,
        (0, shape[-2]),
    ).reshape(-1, shape[-1])
    np.testing.assert_array_equal(node["q0"]["colsum"], codes.sum(0).astype(np.int32))


def test_storage_widths():
    assert storage_bits_for(2, [8]) == 2
    assert storage_bits_for(3, [8]) == 4
    assert storage_bits_for(2, [6]) == 4  # K not a multiple of 4: int4 fields
    assert storage_bits_for(4, [7]) == 8  # odd K: int8
    assert storage_bits_for(5, [8]) == 8
    assert storage_bits_for(16, [8]) == 16


def test_memory_accounting_equals_materialised_arrays():
    config = UNetConfig.from_dict(TINY_UNET)
    model = UNet2DConditionModel(config=config)
    params = model.init(jax.random.key(0), **example_inputs(config))["params"]
    sizes = {}
    for name, bits in (("w8", 8), ("w4", 4)):
        spec = QuantSpec(weight_bits=bits, act_bits=8, symmetric_weights=True)
        plan, act = plan_for_spec(config, spec, params)
        x_bos = jnp.ones((64,), jnp.float32)
        pack = jax.jit(
            lambda p, r, xb, plan=plan: pack_unet_params(p, plan, r, xb, float_dtype=jnp.float16)
        )
        real = pack(params, act, x_bos)
        abstract = packed_shapes(params, plan, act, float_dtype=jnp.float16, bos_dim=64)
        held = sum(np.asarray(a).nbytes for a in jax.tree.leaves(real))
        assert tree_nbytes(abstract) == tree_nbytes(real) == held
        assert jax.tree.structure(abstract) == jax.tree.structure(real)
        sizes[name] = held
    fp16 = tree_nbytes(jax.tree.map(lambda a: a.astype(jnp.float16), params))
    table = memory_table(config, weight_bits={"conv_in": 2}, peak=False)["configs"]
    assert table["fp16"]["param_bytes"] == fp16
    assert table["w8a8"]["param_bytes"] == sizes["w8"]
    assert table["w4a8"]["param_bytes"] == sizes["w4"]
    assert table["mixed"]["quantized_layers"] == len(plan.layers)  # act-only layers included
    assert fp16 > sizes["w8"] > sizes["w4"]
    assert 1.5 < fp16 / sizes["w8"] < 2.0  # tiny layers: scales and float norms weigh more
    assert table["w4a8"]["ratio_vs_float"] > table["w8a8"]["ratio_vs_float"]


def test_compiled_peak_memory_is_reported():
    table = memory_table(TINY_UNET, latent=8)
    for name in ("fp16", "w8a8", "w4a8"):
        entry = table["configs"][name]
        assert entry["peak_bytes"] >= entry["param_bytes"] > 0
        assert entry["argument_bytes"] >= entry["param_bytes"]


def test_plan_json_round_trip():
    lp = LayerPlan(
        name="a.b",
        kind="conv",
        weight_shape=(1, 1, 8, 4),
        w_bits=3,
        a_bits=16,
        storage_bits=4,
        symmetric=True,
        split=4,
    )
    plan = DeployPlan(layers={"a.b": lp})
    assert DeployPlan.from_dict(plan.as_dict()) == plan
    assert lp.mode == "weight_only" and lp.parts() == [(0, 4), (4, 8)]


def test_unet_latency_runs_every_configuration_on_the_tiny_unet():
    from mixdq_jax.deploy.latency import unet_latency

    result = unet_latency(TINY_UNET, latent=8, repeats=1, backend="xla")
    assert set(result["ms"]) == {"fp", "w8a8", "w4a8"}
    assert all(v > 0 for v in result["ms"].values())
    b = result["param_bytes"]
    assert b["w4a8"] < b["w8a8"] < b["fp"]
