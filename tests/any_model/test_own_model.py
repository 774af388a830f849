"""MixDQ on a model that is not ours: the tiny ViT of ``examples/own_model.py`` in Linen and
NNX (identical weights), checked against independent references: Flax's own module paths,
numpy min/max of captured layer inputs, a numpy formula of one fake-quantized Dense, and JAX's
compile events."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx, traverse_util
from jax import monitoring

from examples import own_model as ex
from mixdq_jax import any_model
from mixdq_jax.quant import QuantSpec

CFG = ex.ViTConfig()  # 14 layers: a Conv patch embedding, 2 blocks of 6 Dense, a Dense head
BATCH = 4


@pytest.fixture(scope="module")
def runs():
    return ex.main(config=CFG, batches=2, batch_size=BATCH, verbose=False)


def _spec(w: int, a: int) -> QuantSpec:
    return QuantSpec(weight_bits=w, act_bits=a, bos_aware=False, shortcut_split=False)


def _held_out() -> jax.Array:
    return jax.random.normal(jax.random.key(7), (BATCH, CFG.image, CFG.image, CFG.channels))


class _Compiles:
    """Backend compiles of programs named ``name`` while the block is open (JAX's events)."""

    def __init__(self, name: str) -> None:
        self.name, self.count = name, 0

    def _on(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") == (
            self.name
        ):
            self.count += 1

    def __enter__(self):
        monitoring.register_event_duration_secs_listener(self._on)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_duration_listener(self._on)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_one_compile_serves_every_configuration_of_the_sweep(runs, api):
    run = runs[api]
    q = run.quantized
    assert q.sensitivity.configurations == len(q.layers) * 3 * 2  # 2/4/8 bits, weight and act
    assert q.sensitivity.compiles == 1

    # again, independently: small chunks (11 calls per batch, 2 batches), counting JAX's
    # compile events and the traces of the user's function
    traces = []

    def counted(params, *inputs):
        traces.append(1)
        return run.apply(params, *inputs)

    config = any_model.SweepConfig(chunk=8)
    with _Compiles("jit(sweep_program)") as compiles:
        sens = any_model.sweep(counted, run.params, run.batches, q.layers, q.ranges, config=config)
    assert compiles.count == 1 and sens.compiles == 1
    assert len(traces) == 2  # one trace: the float reference + the vmapped quantized call
    for kind in ("weight", "act"):  # chunking does not change the scores
        for name, scores in sens.scores[kind].items():
            np.testing.assert_allclose(scores, q.sensitivity.scores[kind][name], rtol=1e-5)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_quantized_function_compiles_once_for_every_qconfig(runs, api):
    run, q = runs[api], runs[api].quantized
    names = [layer.name for layer in q.layers]
    fn = jax.jit(q.apply)
    x = _held_out()
    outs = [fn(run.params, q.qconfig, x)]
    for w, a in ((8, 8), (4, 8), (2, 2), (16, 16)):
        outs.append(fn(run.params, _spec(w, a).to_qconfig(names, q.ranges), x))
    assert fn._cache_size() == 1
    np.testing.assert_array_equal(outs[-1], jax.jit(run.apply)(run.params, x))  # float bits


def test_registry_names_are_the_module_paths(runs):
    linen, nnx_run = runs["linen"], runs["nnx"]
    flat = traverse_util.flatten_dict(linen.params)
    kernels = {".".join(k[:-1]): v.shape for k, v in flat.items() if k[-1] == "kernel"}
    layers = {layer.name: layer for layer in linen.quantized.layers}
    assert set(layers) == set(kernels) and len(layers) == 14
    for name, layer in layers.items():
        assert layer.weight_shape == kernels[name]
        assert layer.kind == ("conv" if name == "patch_embed" else "linear")
    assert layers["patch_embed"].input_shape == (CFG.image, CFG.image, CFG.channels)
    assert layers["blocks_1.fc2"].input_shape == (CFG.tokens, CFG.mlp)
    assert layers["head"].input_shape == (CFG.dim,)

    state = traverse_util.flatten_dict(nnx.to_pure_dict(nnx_run.params))
    nnx_kernels = {".".join(map(str, k[:-1])) for k in state if k[-1] == "kernel"}
    assert [x.name for x in nnx_run.quantized.layers] == [ex.nnx_name(n) for n in layers]
    assert set(ex.nnx_name(n) for n in layers) == nnx_kernels
    assert "blocks.0.attn.query" in nnx_kernels


def test_linen_and_nnx_give_identical_results(runs):
    lq, nq = runs["linen"].quantized, runs["nnx"].quantized
    for name, rng in lq.ranges.items():
        np.testing.assert_array_equal(nq.ranges[ex.nnx_name(name)], rng)
    for kind in ("weight", "act"):
        for name, scores in lq.sensitivity.scores[kind].items():
            np.testing.assert_allclose(nq.sensitivity.scores[kind][ex.nnx_name(name)], scores)
    assert ex.renamed(lq.qconfig).bits() == nq.qconfig.bits()

    x = _held_out()
    names = [layer.name for layer in lq.layers]
    for qc in (lq.qconfig, _spec(4, 8).to_qconfig(names, lq.ranges)):
        out_l = jax.jit(lq.apply)(runs["linen"].params, qc, x)
        out_n = jax.jit(nq.apply)(runs["nnx"].params, ex.renamed(qc), x)
        np.testing.assert_array_equal(out_l, out_n)


def test_more_bits_are_closer_to_float(runs):
    run, q = runs["linen"], runs["linen"].quantized
    names = [layer.name for layer in q.layers]
    x = _held_out()

    def sqnr(qc):
        return ex.output_sqnr(run, qc, x)

    s88, s48, s28, s22 = (
        sqnr(_spec(w, a).to_qconfig(names, q.ranges)) for w, a in ((8, 8), (4, 8), (2, 8), (2, 2))
    )
    chosen = sqnr(q.qconfig)
    assert s88 > 30.0 and s22 < 5.0
    assert s88 > chosen > s48 > s28 > s22  # 4.5 average bits, allocated, beat uniform W4
    w_bits, a_bits = q.qconfig.bits()
    sizes = {layer.name: layer.weight_params for layer in q.layers}
    avg = sum(w_bits[n] * s for n, s in sizes.items()) / sum(sizes.values())
    assert abs(avg - 4.5) <= 0.02 and set(a_bits.values()) == {8}


def test_calibrated_ranges_are_the_min_max_of_the_layer_inputs(runs):
    run = runs["linen"]
    model = ex.LinenViT(CFG)
    fc2_in, images = [], []
    for (x,) in run.batches:
        _, state = model.apply(
            {"params": run.params}, x, capture_intermediates=True, mutable=["intermediates"]
        )
        fc1_out = state["intermediates"]["blocks_0"]["fc1"]["__call__"][0]
        fc2_in.append(np.asarray(jax.nn.gelu(fc1_out)))
        images.append(np.asarray(x))
    for name, seen in (("patch_embed", images), ("blocks_0.fc2", fc2_in)):
        lo = min(0.0, min(float(a.min()) for a in seen))
        hi = max(0.0, max(float(a.max()) for a in seen))
        np.testing.assert_allclose(run.quantized.ranges[name], [[lo, hi]], rtol=1e-6, atol=1e-7)


def _fake_quant_np(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Asymmetric min/max quantize-dequantize (range widened to contain 0), in float32."""
    lo, hi = np.minimum(lo, 0).astype(np.float32), np.maximum(hi, 0).astype(np.float32)
    levels = np.float32(2**bits - 1)
    scale = np.maximum((hi - lo) * (np.float32(1) / levels), np.float32(1e-8))
    zero = np.round(-lo / scale)
    return ((np.clip(np.round(x / scale) + zero, 0, levels) - zero) * scale).astype(np.float32)


def test_one_dense_layer_matches_a_numpy_formula():
    """W4A8 of a lone Dense (Linen) and Linear (NNX): per-output-channel weights, per-tensor
    input on its calibrated range, then ``x @ W + b``."""

    class LinenProj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, name="proj")(x)

    class NnxProj(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(6, 5, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.proj(x)

    linen = LinenProj()
    x0 = jax.random.normal(jax.random.key(1), (8, 6))
    params = linen.init(jax.random.key(2), x0)["params"]
    params = {"proj": {**params["proj"], "bias": jax.random.normal(jax.random.key(3), (5,))}}
    batches = [(x0,), (2.0 * jax.random.normal(jax.random.key(4), (8, 6)) + 0.5,)]

    nnx_fn, state = any_model.nnx_apply(NnxProj())
    nnx.replace_by_pure_dict(state, params)
    models = {
        "linen": (lambda p, *x: linen.apply({"params": p}, *x), params),
        "nnx": (nnx_fn, state),
    }
    xs = np.concatenate([np.asarray(b[0]) for b in batches])
    w, b = np.asarray(params["proj"]["kernel"]), np.asarray(params["proj"]["bias"])
    name = "proj"
    for apply, p in models.values():
        layers = any_model.model_layers(apply, p, x0)
        assert [(la.name, la.kind, la.weight_shape) for la in layers] == [(name, "linear", (6, 5))]
        ranges = any_model.calibrate(apply, p, batches, layers)
        np.testing.assert_array_equal(ranges[name], [[min(xs.min(), 0), max(xs.max(), 0)]])

        qc = _spec(4, 8).to_qconfig([name], ranges)
        x = np.asarray(batches[1][0])
        wq = _fake_quant_np(w, w.min(axis=0), w.max(axis=0), 4)
        xq = _fake_quant_np(x, ranges[name][0, 0], ranges[name][0, 1], 8)
        out = jax.jit(any_model.fake_quantized(apply))(p, qc, x)
        np.testing.assert_allclose(out, xq @ wq + b, rtol=1e-5, atol=1e-5)
        assert not np.allclose(out, x @ w + b, rtol=1e-3, atol=1e-3)  # it did quantize


def test_metric_decoupled_groups_get_their_own_metric_and_budget():
    """MixDQ's grouping on a small MLP: ``ff`` layers are content (scored by a custom cosine
    similarity), the rest quality (SQNR); each group's program meets its share of the budget."""

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16, name="embed")(x)
            x = x + nn.Dense(16, name="ff_out")(jax.nn.gelu(nn.Dense(32, name="ff_in")(x)))
            return nn.Dense(4, name="head")(x)

    def cosine(ref, out):
        return jnp.sum(ref * out) / jnp.sqrt(jnp.sum(ref * ref) * jnp.sum(out * out))

    model = Mlp()
    x = jax.random.normal(jax.random.key(0), (16, 8))
    params = model.init(jax.random.key(1), x)["params"]
    q = any_model.quantize(
        lambda p, *xs: model.apply({"params": p}, *xs),
        params,
        [(x,)],
        budget=any_model.Budget(weight_bits=4.0, act_bits=16.0, band=0.3),
        sweep_config=any_model.SweepConfig(kinds=("weight",), content_metric=cosine),
        group=lambda n: "content" if n.startswith("ff") else "quality",
    )
    groups = {layer.name: layer.group for layer in q.layers}
    assert groups == {
        "embed": "quality",
        "ff_in": "content",
        "ff_out": "content",
        "head": "quality",
    }
    assert q.sensitivity.metrics == {"quality": "sqnr", "content": "custom"}
    assert q.sensitivity.compiles == 1 and "act" not in q.sensitivity.scores
    scores = q.sensitivity.scores["weight"]
    assert all(0.0 < s <= 1.0 for n in ("ff_in", "ff_out") for s in scores[n])
    assert all(s[2] > 20.0 for n, s in scores.items() if groups[n] == "quality")  # dB at 8 bits
    w_bits, a_bits = q.qconfig.bits()
    assert set(a_bits.values()) == {16}
    for group in ("content", "quality"):
        names = [la for la in q.layers if la.group == group]
        avg = sum(w_bits[la.name] * la.weight_params for la in names) / sum(
            la.weight_params for la in names
        )
        assert abs(avg - 4.0) <= 0.3
