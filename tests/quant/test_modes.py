"""The interceptor and its modes: one compilation for every config, vmap over configs, BOS-aware
to_k/to_v, shortcut splitting, observation; and QuantSpec validation / official YAML."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.official_format import read_bits
from mixdq_jax.quant import (
    OFFICIAL_PROTECTED_ACT_LAYERS,
    FakeQuant,
    Observe,
    QuantSpec,
    intercept,
    stack_qconfigs,
    update_ranges,
    write_official_yaml,
)
from tests.quant.test_quantizers import np_asym, np_channel_range
from tests.reference_data import official

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
SHORTCUT = "up_blocks.0.resnets.0.conv_shortcut"
B, H, W, C, T, D = 2, 4, 4, 8, 6, 12
LAYERS = {
    "conv_in": None,
    f"{ATTN}.to_q": None,
    f"{ATTN}.to_k": None,
    f"{ATTN}.to_v": None,
    f"{ATTN}.to_out.0": None,
    SHORTCUT: C,  # input = concat(upsampled hidden [C], skip [C])
    "conv_out": None,
}
MODES = {"quant": FakeQuant(), "observe": Observe()}


class CrossAttn(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, h, ctx):
        q = nn.Dense(self.dim, name="to_q")(h)
        k = nn.Dense(self.dim, name="to_k")(ctx)
        v = nn.Dense(self.dim, name="to_v")(ctx)
        p = jax.nn.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(self.dim), axis=-1)
        return nn.Dense(h.shape[-1], name="to_out.0")(p @ v)


class Toy(nn.Module):
    """Diffusers-like names; one Dense outside any config (time_embedding.linear_1)."""

    @nn.compact
    def __call__(self, img, ctx):
        h = nn.Conv(C, (3, 3), name="conv_in")(img)
        h = h + nn.Dense(C, name="time_embedding.linear_1")(jnp.ones((1, 1, 1, 3)))
        b, hh, ww, c = h.shape
        t = CrossAttn(C, name=ATTN)(h.reshape(b, hh * ww, c), ctx).reshape(b, hh, ww, c)
        s = nn.Conv(C, (1, 1), name=SHORTCUT)(jnp.concatenate([t, h], axis=-1))
        return nn.Conv(3, (3, 3), name="conv_out")(jax.nn.silu(s))


class KV(nn.Module):
    @nn.compact
    def __call__(self, ctx):
        return nn.Dense(C, name=f"{ATTN}.to_k")(ctx), nn.Dense(C, name=f"{ATTN}.to_v")(ctx)


class Shortcut(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(5, (1, 1), name=SHORTCUT)(x)


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def _init(model, seed, *inputs):
    """Random params from the abstract shapes (jax's init compiles slowly on a busy CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)

    def fill(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree.map(fill, shapes)


def _ctx_with_bos_outlier(rng, n_batch=B):
    ctx = rng.standard_normal((n_batch, T, D)).astype(np.float32)
    ctx[:, 0, :] *= 40.0  # the CLIP BOS token: ~800 vs ~10-15 for the others (paper sec. 3.1)
    ctx[:, 0, 3] = 800.0
    return ctx


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    model = Toy()
    img = rng.standard_normal((B, H, W, 4)).astype(np.float32)
    ctx = _ctx_with_bos_outlier(rng)
    params = _init(model, 10, img, ctx)
    float_q = QuantSpec().to_qconfig(LAYERS)

    @jax.jit
    def observe(params, qconfig, img, ctx):
        with intercept(Observe(), qconfig) as rec:
            out = model.apply(params, img, ctx)
        return out, rec.data

    traces = []

    def forward(params, qconfig, img, ctx):
        traces.append(1)  # Python side effect: runs once per trace
        with intercept(FakeQuant(), qconfig):
            return model.apply(params, img, ctx)

    _, ranges = observe(params, float_q, img, ctx)
    return dict(
        model=model,
        params=params,
        img=img,
        ctx=ctx,
        ranges=ranges,
        observe=observe,
        forward=forward,
        jit_forward=jax.jit(forward),
        traces=traces,
    )


def _configs(ranges):
    names = list(LAYERS)
    mixed_w = {n: [2, 4, 8][i % 3] for i, n in enumerate(names)}
    mixed_a = {n: [4, 8, 16][i % 3] for i, n in enumerate(names)}
    return [
        QuantSpec(weight_bits=8, act_bits=8).to_qconfig(LAYERS, ranges),
        QuantSpec(weight_bits=mixed_w, act_bits=mixed_a).to_qconfig(LAYERS, ranges),
        QuantSpec(weight_bits=4, act_bits=6, protected_acts={"conv_in", "conv_out"}).to_qconfig(
            LAYERS, ranges
        ),
    ]


def test_one_compilation_for_all_configs_and_vmap(toy):
    f, forward = toy["jit_forward"], toy["forward"]
    configs = _configs(toy["ranges"])
    outs = [np.asarray(f(toy["params"], q, toy["img"], toy["ctx"])) for q in configs]
    assert len(toy["traces"]) == 1 and f._cache_size() == 1
    ref = np.asarray(toy["model"].apply(toy["params"], toy["img"], toy["ctx"]))
    for i, o in enumerate(outs):  # each config does something, and something different
        assert not np.allclose(o, ref, atol=1e-4), i
        for o2 in outs[i + 1 :]:
            assert not np.allclose(o, o2, atol=1e-4)

    stacked = stack_qconfigs(configs)
    batched = jax.jit(jax.vmap(forward, in_axes=(None, 0, None, None)))(
        toy["params"], stacked, toy["img"], toy["ctx"]
    )
    assert batched.shape == (3, *outs[0].shape)
    for i, o in enumerate(outs):
        # Not bitwise: XLA reorders sums in a conv/matmul whose kernel is batched (a float
        # config under vmap differs from the plain model by the same ~1e-7 relative amount).
        np.testing.assert_allclose(np.asarray(batched[i]), o, rtol=0, atol=1e-6 * np.abs(o).max())


def test_all_float_config_equals_float_model_exactly(toy):
    q = QuantSpec().to_qconfig(LAYERS, toy["ranges"])  # same structure: no new compilation
    ref = jax.jit(toy["model"].apply)(toy["params"], toy["img"], toy["ctx"])
    _bits_equal(toy["jit_forward"](toy["params"], q, toy["img"], toy["ctx"]), ref)
    assert toy["jit_forward"]._cache_size() == 1
    with intercept(FakeQuant(), q) as rec:  # eager: the unconfigured Dense is not intercepted
        jax.eval_shape(toy["model"].apply, toy["params"], toy["img"], toy["ctx"])
    assert rec.seen == set(LAYERS)


def test_observe_records_ranges(toy):
    inputs = {}

    def capture(next_fun, args, kwargs, context):  # test-side, independent capture
        if isinstance(context.module, (nn.Dense, nn.Conv)) and context.method_name == "__call__":
            inputs[".".join(context.module.path)] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        toy["model"].apply(toy["params"], toy["img"], toy["ctx"])

    def mm(x):  # one input part: ranges are [parts, 2]
        return [[min(x.min(), 0.0), max(x.max(), 0.0)]]

    r = {k: np.asarray(v) for k, v in toy["ranges"].items()}
    assert set(r) == set(LAYERS)
    np.testing.assert_array_equal(r["conv_in"], mm(inputs["conv_in"]))
    np.testing.assert_array_equal(r[f"{ATTN}.to_q"], mm(inputs[f"{ATTN}.to_q"]))
    for n in (f"{ATTN}.to_k", f"{ATTN}.to_v"):  # BOS token excluded
        np.testing.assert_array_equal(r[n], mm(inputs[n][:, 1:, :]))
        assert r[n][0, 1] < 800.0
    x = inputs[SHORTCUT]
    np.testing.assert_array_equal(r[SHORTCUT], mm(x[..., :C]) + mm(x[..., C:]))


def test_update_ranges():
    a = {"l": jnp.array([-1.0, 2.0]), "s": jnp.array([[-1.0, 1.0], [0.0, 3.0]])}
    b = {"l": jnp.array([-3.0, 1.0]), "s": jnp.array([[-0.5, 4.0], [-2.0, 1.0]])}
    assert update_ranges(None, a) == a
    mm = update_ranges(a, b)
    np.testing.assert_array_equal(mm["l"], [-3.0, 2.0])
    np.testing.assert_array_equal(mm["s"], [[-1.0, 4.0], [-2.0, 3.0]])
    ema = jax.jit(lambda r, x: update_ranges(r, x, method="ema", momentum=0.9))(a, b)
    np.testing.assert_allclose(ema["l"], 0.9 * np.array([-1.0, 2.0]) + 0.1 * np.array([-3, 1]))
    with pytest.raises(ValueError, match="layer sets differ"):
        update_ranges(a, {"l": b["l"]})


# ---------------------------------------------------------------- BOS-aware to_k / to_v
@pytest.fixture(scope="module")
def kv():
    rng = np.random.default_rng(1)
    model = KV()
    ctx = _ctx_with_bos_outlier(rng, n_batch=4)
    params = _init(model, 11, ctx)
    layers = [f"{ATTN}.to_k", f"{ATTN}.to_v"]

    def apply(params, q, ctx, mode):
        with intercept(MODES[mode], q) as rec:
            out = model.apply(params, ctx)
        return out, rec.data

    f = jax.jit(apply, static_argnames="mode")  # one compile per mode and config structure

    def run(spec, mode="quant", ranges=None):
        return f(params, spec.to_qconfig(layers, ranges), ctx, mode=mode)

    float_out = jax.jit(model.apply)(params, ctx)
    return dict(run=run, float_out=float_out, params=params, ctx=ctx, layers=layers)


def test_bos_all_float_exact_and_bos_row_float(kv):
    out, _ = kv["run"](QuantSpec(bos_aware=True))
    for o, f in zip(out, kv["float_out"], strict=True):
        _bits_equal(o, f)
    _, ranges = kv["run"](QuantSpec(bos_aware=True), mode="observe")
    for wb, ab in ((8, 8), (4, 4), (2, 2), (2, 16)):
        out, _ = kv["run"](QuantSpec(weight_bits=wb, act_bits=ab), ranges=ranges)
        for o, f in zip(out, kv["float_out"], strict=True):
            _bits_equal(o[:, :1], f[:, :1])  # BOS row: float at any bit-width
            assert not np.allclose(o[:, 1:], f[:, 1:], atol=1e-5)


def test_bos_rows_match_numpy_reference(kv):
    _, ranges = kv["run"](QuantSpec(bos_aware=True), mode="observe")
    out, _ = kv["run"](QuantSpec(weight_bits=4, act_bits=8), ranges=ranges)
    ctx = kv["ctx"]
    for name, o in zip(kv["layers"], out, strict=True):
        p = kv["params"]["params"][name]
        (lo, hi), = np.asarray(ranges[name])  # [parts=1, 2]
        xq = np_asym(ctx[:, 1:], 8, lo, hi).astype(np.float64)
        wq = np_asym(np.asarray(p["kernel"]), 4, *np_channel_range(np.asarray(p["kernel"])))
        ref = xq @ wq.astype(np.float64) + np.asarray(p["bias"])
        np.testing.assert_allclose(np.asarray(o[:, 1:]), ref, rtol=1e-5, atol=1e-4)


def test_bos_aware_lowers_error_with_outlier_token(kv):
    errs = {}
    for bos in (True, False):
        _, ranges = kv["run"](QuantSpec(bos_aware=bos), mode="observe")
        out, _ = kv["run"](QuantSpec(act_bits=8, bos_aware=bos), ranges=ranges)
        errs[bos] = sum(
            float(np.mean((np.asarray(o)[:, 1:] - np.asarray(f)[:, 1:]) ** 2))
            for o, f in zip(out, kv["float_out"], strict=True)
        )
    assert errs[True] * 100 < errs[False], errs


# ---------------------------------------------------------------------- shortcut split
@pytest.fixture(scope="module")
def shortcut():
    rng = np.random.default_rng(2)
    c1, c2 = 6, 4
    x = rng.standard_normal((2, 3, 3, c1 + c2)).astype(np.float32)
    x[..., c1:] *= 100.0  # the skip half is 100x larger
    model = Shortcut()
    params = _init(model, 12, x)
    kernel = np.asarray(params["params"][SHORTCUT]["kernel"]).copy()
    kernel[:, :, c1:, :] *= 0.01  # and its weights 100x smaller
    params = {"params": {SHORTCUT: {**params["params"][SHORTCUT], "kernel": kernel}}}

    def apply(params, q, x, mode):
        with intercept(MODES[mode], q) as rec:
            out = model.apply(params, x)
        return out, rec.data

    f = jax.jit(apply, static_argnames="mode")

    def run(spec, mode="quant", ranges=None):
        return f(params, spec.to_qconfig({SHORTCUT: c1}, ranges), x, mode=mode)

    return dict(
        run=run,
        x=x,
        params=params,
        c1=c1,
        kernel=kernel,
        float_out=np.asarray(model.apply(params, x)),
    )


def test_split_matches_numpy_reference(shortcut):
    c1, x, kernel = shortcut["c1"], shortcut["x"], shortcut["kernel"]
    _, ranges = shortcut["run"](QuantSpec(), mode="observe")
    (lo1, hi1), (lo2, hi2) = np.asarray(ranges[SHORTCUT])
    out, _ = shortcut["run"](QuantSpec(weight_bits=4, act_bits=6), ranges=ranges)
    xq = np.concatenate([np_asym(x[..., :c1], 6, lo1, hi1), np_asym(x[..., c1:], 6, lo2, hi2)], -1)
    k1, k2 = kernel[..., :c1, :], kernel[..., c1:, :]
    wq = np.concatenate(
        [np_asym(k1, 4, *np_channel_range(k1)), np_asym(k2, 4, *np_channel_range(k2))], axis=-2
    )
    bias = np.asarray(shortcut["params"]["params"][SHORTCUT]["bias"])
    ref = np.einsum("bhwi,io->bhwo", xq.astype(np.float64), wq[0, 0].astype(np.float64)) + bias
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_split_lowers_error_when_halves_differ(shortcut):
    errs = {}
    for split in (True, False):
        _, ranges = shortcut["run"](QuantSpec(shortcut_split=split), mode="observe")
        out, _ = shortcut["run"](
            QuantSpec(weight_bits=8, act_bits=8, shortcut_split=split), ranges=ranges
        )
        errs[split] = float(np.mean((np.asarray(out) - shortcut["float_out"]) ** 2))
    assert errs[True] * 10 < errs[False], errs


def test_fp8_mode(kv):
    _, ranges = kv["run"](QuantSpec(bos_aware=False), mode="observe")
    errs = {}
    for fp8 in (True, False):
        out, _ = kv["run"](
            QuantSpec(weight_bits=8, act_bits=8, fp8=fp8, bos_aware=False), ranges=ranges
        )
        errs[fp8] = [
            float(np.mean((np.asarray(o)[:, 1:] - np.asarray(f)[:, 1:]) ** 2))
            for o, f in zip(out, kv["float_out"], strict=True)
        ]
    print("fp8 vs int8 error on the non-BOS rows:", errs)
    # the non-uniform grid keeps the normal tokens next to the BOS outlier (paper sec. 5.2)
    assert all(np.isfinite(errs[True])) and all(
        e < 0.1 * i for e, i in zip(errs[True], errs[False], strict=True)
    )
    out, _ = kv["run"](QuantSpec(fp8=True))  # bits 16 = float in FP8 mode as well
    for o, f in zip(out, kv["float_out"], strict=True):
        _bits_equal(o, f)


# ---------------------------------------------------------------------- misuse and specs
def test_unknown_model_layer_and_stale_cache_are_reported(kv):
    model, params, ctx = KV(), kv["params"], kv["ctx"]
    q = QuantSpec().to_qconfig([*kv["layers"], "down_blocks.9.typo"])
    with pytest.raises(ValueError, match="down_blocks.9.typo"):
        with intercept(FakeQuant(), q):
            jax.eval_shape(model.apply, params, ctx)

    g = jax.jit(model.apply)  # context entered OUTSIDE jit: the mistake to catch
    q1 = QuantSpec(weight_bits=8).to_qconfig(kv["layers"])
    q2 = QuantSpec(weight_bits=4).to_qconfig(kv["layers"])
    with intercept(FakeQuant(), q1):
        g(params, ctx)
    with pytest.raises(ValueError, match="never called"):
        with intercept(FakeQuant(), q2):
            g(params, ctx)
    with pytest.raises(ValueError, match="mode"):
        with intercept("calibrate", q1):
            pass


def test_spec_validation(toy):
    r = toy["ranges"]
    with pytest.raises(ValueError, match="'conv_inn'"):
        QuantSpec(weight_bits={**dict.fromkeys(LAYERS, 8), "conv_inn": 8}).to_qconfig(LAYERS)
    with pytest.raises(ValueError, match="protected_acts.*'nope'"):
        QuantSpec(protected_acts={"nope"}).to_qconfig(LAYERS)
    for bad in (1, 9, 12, 32, 0, 4.5, True):
        with pytest.raises(ValueError, match="bit-width"):
            QuantSpec(weight_bits=bad).to_qconfig(LAYERS)
        with pytest.raises(ValueError, match="'conv_out'"):
            QuantSpec(act_bits={**dict.fromkeys(LAYERS, 8), "conv_out": bad}).to_qconfig(LAYERS, r)
    for ok in (2, 3, 5, 7, 8, 16):
        QuantSpec(weight_bits=ok, act_bits=ok).to_qconfig(LAYERS, r)
    partial = {n: 8 for n in LAYERS if n != "conv_out" and n != "conv_in"}
    with pytest.raises(ValueError, match="'conv_in', 'conv_out'"):
        QuantSpec(weight_bits=partial).to_qconfig(LAYERS)
    q = QuantSpec(weight_bits=partial, default_weight_bits=16).to_qconfig(LAYERS)
    assert q.bits()[0]["conv_out"] == 16 and q.bits()[0][f"{ATTN}.to_k"] == 8
    with pytest.raises(ValueError, match="activation range for 'conv_in'"):
        QuantSpec(act_bits=8).to_qconfig(LAYERS, {k: v for k, v in r.items() if k != "conv_in"})
    with pytest.raises(ValueError, match="split layer"):
        QuantSpec(act_bits=8).to_qconfig(LAYERS, {**r, SHORTCUT: [-1.0, 1.0]})
    with pytest.raises(ValueError, match="duplicate"):
        QuantSpec().to_qconfig(["conv_in", "conv_in"])
    with pytest.raises(ValueError, match="different structure"):
        stack_qconfigs([QuantSpec().to_qconfig(LAYERS), QuantSpec().to_qconfig(["conv_in"])])


def test_official_yaml_round_trip(tmp_path):
    wfile = official("final_config", "weight", "weight_4.00.yaml")
    afile = official("final_config", "act", "act_7.77.yaml")
    layers = list(read_bits(wfile))
    assert len(layers) == 794
    ranges = dict.fromkeys(layers, [-1.0, 1.0])
    with pytest.raises(ValueError, match="conv_in"):  # 9 layers absent from the act file
        QuantSpec.from_official_yaml(wfile, afile).to_qconfig(layers, ranges)
    spec = QuantSpec.from_official_yaml(
        wfile, afile, protected_acts=OFFICIAL_PROTECTED_ACT_LAYERS, symmetric_weights=True
    )
    q = spec.to_qconfig(layers, ranges)
    w, a = q.bits()
    counts = lambda d: {b: list(d.values()).count(b) for b in set(d.values())}  # noqa: E731
    assert counts(w) == {2: 209, 4: 347, 8: 238}  # the README's table
    assert counts(a) == {4: 66, 8: 719, 16: 9}
    assert q.weight_format == "int_sym"
    assert q.layers["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].bos
    write_official_yaml(q, weight_file=tmp_path / "w.yaml", act_file=tmp_path / "a.yaml")
    assert read_bits(tmp_path / "w.yaml") == read_bits(wfile)
    assert read_bits(tmp_path / "a.yaml") == read_bits(afile)


def test_with_bits_sensitivity_sweep(kv):
    """The sensitivity use case: one layer at a time at 2/4/8 bits, as one vmapped call."""
    _, ranges = kv["run"](QuantSpec(), mode="observe")
    base = QuantSpec().to_qconfig(kv["layers"], ranges)
    configs = [
        base.with_bits(**{kind: {name: b}})
        for kind in ("w_bits", "a_bits")
        for name in kv["layers"]
        for b in (2, 4, 8)
    ]
    model, params, ctx = KV(), kv["params"], kv["ctx"]

    def forward(q):
        with intercept(FakeQuant(), q):
            return model.apply(params, ctx)

    batched = jax.jit(jax.vmap(forward))(stack_qconfigs(configs))
    single = jax.jit(forward)
    for i, q in enumerate(configs):
        w, a = q.bits()
        assert min(*w.values(), *a.values()) < 16
        for got, want in zip((b[i] for b in batched), single(q), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))
    assert single._cache_size() == 1
    with pytest.raises(ValueError, match="'to_z'"):
        base.with_bits(w_bits={"to_z": 4})
