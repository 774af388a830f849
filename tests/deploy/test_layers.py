"""Real integer path vs the fake quantizer, layer by layer on identical inputs.

A small SDXL-shaped UNet with random weights: every planned layer runs through `run_layer` on
the very input the fake-quant forward gave it, inside one jitted forward; outputs must agree to
float rounding (the integer GEMM sums exactly, the fake path sums dequantized floats).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.deploy import (
    Deployed,
    DeployPlan,
    pack_unet_params,
    pack_unet_params_by_layer,
    run_layer,
)
from mixdq_jax.deploy.packed import node_at
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs
from mixdq_jax.quant import FakeQuant, Observe, QuantSpec, intercept, update_ranges
from mixdq_jax.quant.registry import build_registry, layer_splits
from tests.tiny_models import sdxl_unet_config

REL_TOL = 2e-5  # |real - fake| <= REL_TOL * (1 + max |fake|), per layer
CONFIG = UNetConfig.from_dict(
    sdxl_unet_config(
        sample_size=8, layers_per_block=1, block_out_channels=(16, 32),
        transformer_layers_per_block=(1, 1), cross_attention_dim=24, pooled_dim=24,
    )
)  # fmt: skip
MODEL = UNet2DConditionModel(config=CONFIG)
BOS = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


def _apply(params, inputs):
    return MODEL.apply({"params": params}, **inputs)


@pytest.fixture(scope="module")
def setup():
    """Random params (every leaf perturbed), inputs whose context token 0 is a fixed "BOS"
    embedding, activation ranges observed on them, and the layer splits."""
    rng = np.random.default_rng(0)
    example = example_inputs(CONFIG, batch=2, seq_len=12)
    params = MODEL.init(jax.random.key(0), **example_inputs(CONFIG))["params"]
    params = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype), params)
    inputs = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), example)
    inputs["timesteps"] = jnp.asarray([999.0, 500.0])
    x_bos = jnp.asarray(rng.normal(size=24), jnp.float32)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].at[:, 0].set(x_bos)
    splits = layer_splits(build_registry(CONFIG))
    qconfig = QuantSpec().to_qconfig(splits)

    @jax.jit
    def observe(p, kw):
        with intercept(Observe(), qconfig) as rec:
            _apply(p, kw)
        return rec.data

    ranges = {k: np.asarray(v) for k, v in update_ranges(None, observe(params, inputs)).items()}
    return params, inputs, x_bos, splits, ranges


def _freeze(setup, spec):
    params, _, x_bos, splits, ranges = setup
    qconfig = spec.to_qconfig(splits, ranges)
    plan = DeployPlan.from_qconfig(qconfig, params)
    act = {n: lq.a_range for n, lq in qconfig.layers.items() if n in plan.layers}
    pack = jax.jit(lambda p, r, xb: pack_unet_params(p, plan, r, xb))
    return qconfig, plan, pack(params, act, x_bos)


def _layer_errors(setup, qconfig, plan, packed):
    """One jitted fake-quant forward; every planned layer's input also goes through
    `run_layer`: ``{layer: max |real - fake| / (1 + max |fake|)}``."""
    params, inputs = setup[:2]

    @jax.jit
    def run(params, packed, qconfig, inputs):
        seen = {}

        def capture(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            module = context.module
            name = ".".join(module.path)
            if context.method_name == "__call__" and name in plan.layers and name not in seen:
                real = run_layer(module, plan.layers[name], dict(node_at(packed, name)), args[0])
                assert real.shape == out.shape and real.dtype == out.dtype, name
                seen[name] = jnp.max(jnp.abs(real - out)) / (1.0 + jnp.max(jnp.abs(out)))
            return out

        with nn.intercept_methods(capture), intercept(FakeQuant(), qconfig):
            _apply(params, inputs)
        return seen

    return {k: float(v) for k, v in run(params, packed, qconfig, inputs).items()}


def _capture(setup, names):
    """``{layer: (module, float input, float output)}`` from one jitted float forward."""
    params, inputs = setup[:2]
    modules = {}

    @jax.jit
    def run(params, inputs):
        seen = {}

        def capture(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            name = ".".join(context.module.path)
            if context.method_name == "__call__" and name in names and name not in seen:
                seen[name], modules[name] = (args[0], out), context.module
            return out

        with nn.intercept_methods(capture):
            _apply(params, inputs)
        return seen

    arrays = run(params, inputs)
    return {n: (modules[n], *arrays[n]) for n in names}


@pytest.mark.parametrize("which", ["w8a8_asym", "mixed_sym"])
def test_every_layer_matches_fake_quant(setup, which):
    names = list(setup[3])
    rng = np.random.default_rng(0)
    spec = {
        "w8a8_asym": QuantSpec(weight_bits=8, act_bits=8),
        "mixed_sym": QuantSpec(
            weight_bits={n: int(rng.choice([2, 3, 4, 6, 8, 16])) for n in names},
            act_bits={n: int(rng.choice([4, 8, 8, 16])) for n in names},
            symmetric_weights=True,
        ),
    }[which]
    qconfig, plan, packed = _freeze(setup, spec)
    errors = _layer_errors(setup, qconfig, plan, packed)
    assert set(errors) == set(plan.layers)
    worst = max(errors, key=errors.get)
    print(f"{which}: worst relative layer difference {errors[worst]:.2e} ({worst})")
    bad = {n: e for n, e in errors.items() if not e <= REL_TOL}
    assert not bad, bad
    if which == "mixed_sym":  # every storage / mode combination was exercised
        modes = {(lp.mode, lp.storage_bits) for lp in plan.layers.values()}
        assert {("int", 2), ("int", 4), ("int", 8), ("weight_only", 4), ("act_only", 16)} <= modes
        assert any(lp.split and lp.mode == "int" for lp in plan.layers.values())


def test_pallas_backend_matches_xla(setup):
    """The Pallas kernels (interpret mode here, Triton on GPU) give the XLA path's outputs."""
    picks = [
        "conv_in",  # packed int4 conv: im2col + W4A8 GEMM
        "up_blocks.1.resnets.0.conv_shortcut",  # split conv: two GEMMs + asymmetric correction
        f"{BOS}.to_k",  # BOS row, M = 12 (ragged)
    ]
    _, plan, packed = _freeze(
        setup, QuantSpec(weight_bits={"conv_in": 4}, act_bits=8, default_weight_bits=8)
    )
    for name, (module, inp, _) in _capture(setup, picks).items():
        lp, p = plan.layers[name], dict(node_at(packed, name))
        ref = run_layer(module, lp, p, inp, backend="xla")
        got = run_layer(module, lp, p, inp, backend="pallas")
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bos_row_is_the_float_output(setup):
    name = f"{BOS}.to_v"
    _, plan, packed = _freeze(setup, QuantSpec(weight_bits=2, act_bits=4))
    module, ctx, float_out = _capture(setup, [name])[name]
    lp, p = plan.layers[name], dict(node_at(packed, name))
    assert lp.bos and "bos_row" in p and "bias" not in p
    real = run_layer(module, lp, p, ctx, backend="xla")
    # token 0 (BOS, the same for every prompt) comes out as the float layer's row ...
    np.testing.assert_allclose(real[:, 0], float_out[:, 0], rtol=1e-5, atol=1e-5)
    # ... while the other tokens are visibly quantized (2-bit weights, 4-bit activations)
    assert float(jnp.max(jnp.abs(real[:, 1:] - float_out[:, 1:]))) > 1e-2
    # a zero context (SDXL's CFG negative) is not BOS: row 0 is the exact 0 @ W (no bias)
    zero = run_layer(module, lp, p, jnp.zeros_like(ctx), backend="xla")
    np.testing.assert_array_equal(zero[:, 0], np.zeros(zero[:, 0].shape, np.float32))


def test_context_errors(setup):
    params, inputs = setup[:2]
    _, plan, packed = _freeze(setup, QuantSpec(weight_bits=8, act_bits=16))

    def run(p):
        with intercept(Deployed(plan=plan)):
            return _apply(p, inputs)

    with pytest.raises(ValueError, match="not packed"):
        jax.eval_shape(run, params)
    extra = DeployPlan(layers={**plan.layers, "no.such.layer": next(iter(plan.layers.values()))})
    with pytest.raises(ValueError, match="never called"):
        with intercept(Deployed(plan=extra)):
            pass
    assert jax.eval_shape(run, packed).shape == inputs["sample"].shape


def test_layer_by_layer_packing_equals_the_whole_tree_program(setup):
    """Export packs one layer at a time (bounded memory); the tree must be the same."""
    params, _, x_bos, splits, ranges = setup
    rng = np.random.default_rng(3)
    names = list(splits)
    spec = QuantSpec(
        weight_bits={n: int(rng.choice([2, 3, 4, 8, 16])) for n in names},
        act_bits={n: int(rng.choice([8, 16])) for n in names},
    )
    qconfig, plan, whole = _freeze(setup, spec)
    act = {n: lq.a_range for n, lq in qconfig.layers.items() if n in plan.layers}
    for float_dtype in (None, jnp.float16):
        want = whole if float_dtype is None else jax.jit(
            lambda p, r, xb, fd=float_dtype: pack_unet_params(p, plan, r, xb, float_dtype=fd)
        )(params, act, x_bos)
        got = pack_unet_params_by_layer(params, plan, act, x_bos, float_dtype=float_dtype)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="calibrated range"):
        pack_unet_params_by_layer(params, plan, {}, x_bos)
