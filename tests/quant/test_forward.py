"""The public spine ``forward``: float is the plain model, one compile serves every
configuration, vmap over stacked configurations, observation, and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.models.unet import (
    UNet2DConditionModel,
    UNetConfig,
    example_inputs,
    param_shapes,
)
from mixdq_jax.quant import (
    FakeQuant,
    Float,
    Observe,
    QuantSpec,
    forward,
    layer_splits,
    stack_qconfigs,
    unet_layers,
    update_ranges,
)
from mixdq_jax.quant.forward import unet_arguments
from tests.tiny_models import sdxl_unet_config

# one block of each kind (plain and cross-attention down/up blocks, a split up-block shortcut):
# every property here holds layer by layer, and compilation is most of these tests' time
CONFIG = UNetConfig.from_dict(
    sdxl_unet_config(layers_per_block=1, transformer_layers_per_block=(1, 1))
)


@pytest.fixture(scope="module")
def unet():
    model = UNet2DConditionModel(config=CONFIG)
    rng = np.random.default_rng(0)
    inputs = example_inputs(CONFIG, batch=2, seq_len=7)
    inputs = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), inputs)
    inputs["timesteps"] = jnp.float32(999.0)
    params = model.init(jax.random.key(0), **inputs)["params"]
    params = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype), params)
    cond = {
        "context": inputs["encoder_hidden_states"],
        "added": inputs["added_cond_kwargs"],
        "timestep_cond": None,
    }
    names = [layer.name for layer in unet_layers(CONFIG)]
    splits = layer_splits(unet_layers(CONFIG))
    observe = jax.jit(forward, static_argnums=0, static_argnames="mode")
    _, ranges = observe(
        model, params, QuantSpec().to_qconfig(splits), inputs["sample"], inputs["timesteps"],
        cond, mode=Observe(),
    )  # fmt: skip
    return dict(
        model=model, params=params, x=inputs["sample"], t=inputs["timesteps"], cond=cond,
        names=names, splits=splits, ranges={k: np.asarray(v) for k, v in ranges.items()},
    )  # fmt: skip


def _plain(u):
    return u["model"].apply(
        {"params": u["params"]}, u["x"], u["t"], u["cond"]["context"],
        added_cond_kwargs=u["cond"]["added"],
    )  # fmt: skip


def _random_config(u, seed, act_choices=(4, 8, 16)):
    rng = np.random.default_rng(seed)
    spec = QuantSpec(
        weight_bits={n: int(rng.choice([2, 4, 8, 16])) for n in u["names"]},
        act_bits={n: int(rng.choice(act_choices)) for n in u["names"]},
    )
    return spec.to_qconfig(u["splits"], u["ranges"])


def test_float_is_the_plain_model_bit_for_bit(unet):
    out = forward(unet["model"], unet["params"], None, unet["x"], unet["t"], unet["cond"])
    np.testing.assert_array_equal(out, _plain(unet))
    all_float = QuantSpec().to_qconfig(unet["splits"])
    fq = forward(unet["model"], unet["params"], all_float, unet["x"], unet["t"], unet["cond"])
    np.testing.assert_array_equal(fq, _plain(unet))  # FakeQuant at 16 bits: pass-through


def test_one_compile_serves_every_configuration(unet):
    fn = jax.jit(forward, static_argnums=0)
    before = fn._cache_size()  # jit's cache is per function: the fixture compiled once already
    outs = [
        np.asarray(fn(unet["model"], unet["params"], _random_config(unet, s), unet["x"],
                      unet["t"], unet["cond"]))
        for s in range(3)
    ]  # fmt: skip
    assert fn._cache_size() == before + 1
    assert np.abs(outs[0] - outs[1]).max() > 1e-4  # the configurations really differ


def test_vmap_over_stacked_configurations_equals_single_calls(unet):
    """Weight-only configurations (no activation rounding boundary that a different
    compilation could flip; with quantized activations one flipped code grows through the
    network, see DESIGN.md) agree with single calls to float rounding."""
    configs = [_random_config(unet, s, act_choices=(16,)) for s in range(3)]

    def one(qc):
        return forward(unet["model"], unet["params"], qc, unet["x"], unet["t"], unet["cond"])

    batched = jax.jit(jax.vmap(one))(stack_qconfigs(configs))
    single = jax.jit(one)
    for i, qc in enumerate(configs):
        want = np.asarray(single(qc))
        np.testing.assert_allclose(batched[i], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_observe_records_every_layer_with_parts(unet):
    ranges = unet["ranges"]
    assert set(ranges) == set(unet["names"])
    for name, r in ranges.items():
        parts = 1 if unet["splits"][name] is None else 2
        assert r.shape == (parts, 2), name
        assert np.all(r[:, 0] <= 0.0) and np.all(r[:, 1] >= 0.0)
    again = update_ranges(ranges, ranges)
    assert all(np.array_equal(again[n], ranges[n]) for n in ranges)


def test_gradients_flow_through_forward(unet):
    def loss(x, qc, mode):
        out = forward(unet["model"], unet["params"], qc, x, unet["t"], unet["cond"], mode=mode)
        return jnp.sum(out**2)

    def plain_loss(x):
        return jnp.sum(_plain({**unet, "x": x}) ** 2)

    want = jax.grad(plain_loss)(unet["x"])
    got_float = jax.grad(loss)(unet["x"], None, Float())
    np.testing.assert_array_equal(got_float, want)
    all_float = QuantSpec().to_qconfig(unet["splits"])
    got_fq = jax.grad(loss)(unet["x"], all_float, FakeQuant())
    np.testing.assert_allclose(got_fq, want, rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()))


def test_mode_must_be_a_mode(unet):
    with pytest.raises(ValueError, match="Mode"):
        forward(unet["model"], unet["params"], None, unet["x"], unet["t"], unet["cond"],
                mode="observe")  # fmt: skip


def _temp_bytes(model, config, qconfig, mode=None) -> int:
    params = param_shapes(model)
    inputs = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), example_inputs(config, batch=1)
    )

    def run(p, kw, q):
        out = forward(model, p, q, *unet_arguments(kw), mode=mode)
        return out[0] if isinstance(out, tuple) else out

    stats = jax.jit(run).lower(params, inputs, qconfig).compile().memory_analysis()
    return int(stats.temp_size_in_bytes)


def test_fake_quant_keeps_only_a_few_layers_weights_alive():
    """Root cause of the full-size OOM: with traced bits every layer's dequantized copy could
    be computed up front (a second model in memory). Compiled temporaries of the fake-quant
    forward may exceed the float forward's by a few layers' weights, not by the model."""
    config = UNetConfig.from_dict(
        sdxl_unet_config(block_out_channels=(64, 128), cross_attention_dim=128)
    )
    model = UNet2DConditionModel(config=config)
    layers = unet_layers(config)
    splits = layer_splits(layers)
    ranges = {n: np.array([[-1.0, 1.0]] * (1 if s is None else 2)) for n, s in splits.items()}
    sizes = [4 * int(np.prod(layer.weight_shape)) for layer in layers]
    float_temp = _temp_bytes(model, config, None)
    budget = float_temp + 4 * max(sizes)
    assert sum(sizes) > 4 * budget  # the test can tell "a few layers" from "the model"
    for w, a in ((16, 16), (8, 8), (4, 16)):
        qc = QuantSpec(weight_bits=w, act_bits=a).to_qconfig(splits, ranges)
        assert _temp_bytes(model, config, qc) < budget, (w, a)
    observe = _temp_bytes(model, config, QuantSpec().to_qconfig(splits, ranges), Observe())
    assert observe < budget
