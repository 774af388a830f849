"""Per-layer cost tables (`mixdq_jax.deploy.layer_costs`) and the deployed FP8 layers.

A one-level SDXL-shaped UNet (conv_in, a split shortcut, BOS-aware ``attn2.to_k/to_v``, a
GEGLU feed-forward: every kind of layer, 71 of them, 14 distinct shapes) keeps the timings
short; where only the bookkeeping is under test the timing is replaced by a counter.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.deploy import Deployed, DeployPlan, pack_unet_params
from mixdq_jax.deploy import layer_costs as lc
from mixdq_jax.deploy.packed import LayerPlan, layer_kernel
from mixdq_jax.evaluation.bops import layer_macs
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs
from mixdq_jax.quant import FakeQuant, Float, QuantSpec, intercept
from mixdq_jax.quant.layer_formats import LAYER_FORMATS
from mixdq_jax.quant.qconfig import is_bos_layer
from mixdq_jax.quant.registry import build_registry, layer_splits
from tests.deploy import _layer_models as lm
from tests.tiny_models import sdxl_unet_config

CONFIG_DICT = sdxl_unet_config(
    sample_size=4, layers_per_block=1, block_out_channels=(8,),
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    transformer_layers_per_block=(1,), attention_head_dim=(2,), cross_attention_dim=8,
    pooled_dim=8, norm_num_groups=4,
)  # fmt: skip
CONFIG = UNetConfig.from_dict(CONFIG_DICT)
ALL = "float,fp8,w8a8,w4a8,w4a16,w4a4lr"
FC = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # Dense 32 -> 8
BOS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Dense 8 -> 8, no bias
CONV = "conv_in"  # 3x3, 4 -> 8
SHORTCUT = "up_blocks.0.resnets.0.conv_shortcut"  # 1x1, 16 -> 8, split at 8
F = LAYER_FORMATS


def _random_params(init, seed: int = 0) -> dict:
    """Random params of the abstract ``init()``'s shapes (no eager init: it is slow)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(init)["params"]
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), shapes)


@pytest.fixture(scope="module")
def shapes():
    return lc.layer_shapes(CONFIG, batch=2)


def _counting(monkeypatch, fail_at: int | None = None) -> list:
    """Replace the timing by a counter (1 ms each); ``fail_at``: raise at that call."""
    calls = []

    def fake(layer, fmt, **kw):
        calls.append(layer.signature(fmt.name))
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("killed")
        return 1.0

    monkeypatch.setattr(lc, "time_layer", fake)
    return calls


# ------------------------------------------------------------------------------ shapes, bytes
def test_layer_shapes_follow_the_forward(shapes):
    assert list(shapes) == [layer.name for layer in build_registry(CONFIG)]
    macs = layer_macs(CONFIG)
    assert {n: s.macs for n, s in shapes.items()} == {n: 2 * m for n, m in macs.items()}
    conv, sc, bos = shapes[CONV], shapes[SHORTCUT], shapes[BOS]
    assert conv.input_shape == (2, 4, 4, 4) and conv.weight_shape == (3, 3, 4, 8)
    assert sc.split == 8 and bos.bos and not bos.use_bias and bos.input_shape == (2, 77, 8)
    assert all(s.geometry_error is None for s in shapes.values())


def _bytes(layer, fmt):
    return lc.layer_bytes(layer, F[fmt], float_dtype=jnp.float32)


def test_bytes_and_bops_by_hand(shapes):
    fc, bos, conv, sc = shapes[FC], shapes[BOS], shapes[CONV], shapes[SHORTCUT]
    k, n = 32, 8  # ff.net.2, with a bias
    bias = 4 * n
    assert _bytes(fc, "float") == 4 * k * n + bias
    # codes + w_scale f32 + colsum int32 + a_scale f32 + a_zp int32
    assert _bytes(fc, "w8a8") == k * n + 4 * n + 4 * n + 4 + 4 + bias
    assert _bytes(fc, "w4a8") == k * n // 2 + 4 * n + 4 * n + 4 + 4 + bias
    assert _bytes(fc, "w4a16") == k * n // 2 + 4 * n + bias
    assert _bytes(fc, "fp8") == k * n + 4 * n + 4 + bias  # e4m3 codes, w_scale, a_scale
    # groups of 64 (K padded), f32 group scales, f32 smoothing, f16 rank-8 branch
    r, kp = 8, 64
    assert _bytes(fc, "w4a4lr") == kp * n // 2 + (kp // 64) * n * 4 + 4 * k + 2 * r * (k + n) \
        + bias  # fmt: skip
    # BOS-aware, no bias: + the stored BOS embedding and its float output row
    assert _bytes(bos, "w8a8") == 8 * 8 + 4 * 8 * 2 + 8 + 4 * 8 + 4 * 8
    # conv: int8 HWIO codes; int4 packs the (9 * 4, 8) GEMM matrix
    assert _bytes(conv, "w8a8") == 9 * 4 * 8 + 4 * 8 * 3 + 8
    assert _bytes(conv, "w4a8") == 9 * 4 * 8 // 2 + 4 * 8 * 3 + 8
    # a split shortcut stores each half with its own scales and activation range
    assert _bytes(sc, "w8a8") == 2 * (8 * 8 + 4 * 8 * 2 + 8) + 4 * 8
    # BOPs: MACs x w x a, A16: 16 x 16, fp8: 8 x 8, low-rank branch at 16 x 16
    macs = 2 * 16 * k * n  # batch 2, 16 tokens
    assert fc.macs == macs
    for fmt, bits in (("float", 256), ("fp8", 64), ("w8a8", 64), ("w4a8", 32), ("w4a16", 256)):
        assert lc.layer_bops(fc, F[fmt]) == macs * bits, fmt
    assert lc.layer_bops(fc, F["w4a4lr"]) == macs * 16 + 2 * 16 * r * (k + n) * 256
    assert lc.layer_rank((32, 8)) == 8 and lc.layer_rank((8, 64), 0.5) == 4
    assert lc.layer_rank((1280, 1280)) == 32


@pytest.mark.parametrize("fraction", [None, 0.05, 0.3, 0.9])
def test_rank_rule_is_the_methods_one(fraction):
    from mixdq_jax.methods.format import LowRankSettings  # noqa: PLC0415

    settings = LowRankSettings(rank=32, rank_fraction=fraction)
    for shape in [(8, 8), (32, 8), (3, 3, 4, 8), (640, 640), (1280, 5120), (3, 3, 320, 320)]:
        k, n = int(np.prod(shape[:-1])), shape[-1]
        assert lc.layer_rank(shape, fraction) == min(settings.layer_rank(k, n), k, n), shape


def test_format_plans():
    assert lc.format_plan("x", "linear", (32, 8), F["float"]) is None
    fp8 = lc.format_plan("x", "linear", (32, 8), F["fp8"])
    assert fp8.fp8 and fp8.storage_bits == 8 and fp8.mode == "int"
    assert "fp8" not in lc.format_plan("x", "linear", (32, 8), F["w8a8"]).as_dict()
    assert LayerPlan.from_dict(fp8.as_dict()) == fp8
    lr = lc.format_plan("x", "conv", (3, 3, 8, 16), F["w4a4lr"], rank=4)
    assert (lr.group, lr.rank, lr.smooth, lr.storage_bits) == (64, 4, True, 4)
    with pytest.raises(ValueError, match="kind 'conv'"):
        lc.format_plan("x", "conv", (32, 8), F["w8a8"])
    with pytest.raises(ValueError, match="fp8 takes 8-bit storage"):
        LayerPlan(name="x", kind="linear", weight_shape=(4, 4), w_bits=4, a_bits=8,
                  storage_bits=4, symmetric=True, fp8=True)  # fmt: skip


# ------------------------------------------------------------------------------ the table
def test_table_schema(tmp_path):
    out = tmp_path / "costs.json"
    table = lc.cost_table(CONFIG, formats=ALL, batch=2, repeats=1, out=out,
                          layers=[CONV, BOS], progress=False)  # fmt: skip
    on_disk = lc.load_costs(out)
    assert on_disk == json.loads(json.dumps(table))
    assert table["schema"] == "mixdq-layer-costs/1" and table["complete"] is True
    for key in ("device", "backend", "jax_version", "dispatch_ms", "seconds", "totals_note"):
        assert key in table, key
    s = table["settings"]
    assert s["formats"] == ALL.split(",") and s["batch"] == 2 and s["latent"] == [4, 4]
    assert s["float_dtype"] == "float32" and s["kernel_backend"] == "auto"
    assert list(table["layers"]) == [CONV, BOS]
    for name, entry in table["layers"].items():
        assert set(entry) == {"kind", "input_shape", "weight_shape", "macs", "formats"}
        assert list(entry["formats"]) == ALL.split(",")
        for cost in entry["formats"].values():
            assert set(cost) == {"ms", "bytes", "bops"} and cost["ms"] > 0, (name, cost)
    for fmt, total in table["totals"].items():
        for key in ("ms", "bytes", "bops"):
            want = sum(e["formats"][fmt][key] for e in table["layers"].values())
            assert total[key] == pytest.approx(want), (fmt, key)
        assert total["float_fallback"] == 0


def test_resume_measures_only_what_is_missing(tmp_path, monkeypatch, shapes):
    out = tmp_path / "costs.json"
    kw = dict(formats="float,w8a8", batch=2, out=out, progress=False)
    first = _counting(monkeypatch, fail_at=9)
    with pytest.raises(RuntimeError, match="killed"):
        lc.cost_table(CONFIG, **kw)
    partial = lc.load_costs(out)
    assert partial["complete"] is False and 0 < len(partial["layers"]) < len(shapes)
    done = {s for n in partial["layers"] for s in (shapes[n].signature("float"),
                                                   shapes[n].signature("w8a8"))}  # fmt: skip
    second = _counting(monkeypatch)
    table = lc.cost_table(CONFIG, **kw)
    assert table["complete"] is True and list(table["layers"]) == list(shapes)
    assert not done & set(second)  # nothing measured twice ...
    assert len(second) == len(set(second))  # ... and layers of one shape measured once
    assert set(first[:8]) | set(second) == {shapes[n].signature(f) for n in shapes
                                            for f in ("float", "w8a8")}  # fmt: skip
    for name, entry in partial["layers"].items():  # finished layers are kept as they were
        assert table["layers"][name] == entry
    again = _counting(monkeypatch)
    assert lc.cost_table(CONFIG, **kw) == table and again == []


def test_budget_stops_cleanly(tmp_path, monkeypatch):
    out = tmp_path / "costs.json"
    _counting(monkeypatch)
    table = lc.cost_table(CONFIG, formats="float", out=out, budget_s=0.0, progress=False)
    assert table["complete"] is False and table["layers"] == {}
    assert lc.load_costs(out)["complete"] is False
    assert lc.cost_table(CONFIG, formats="float", out=out, progress=False)["complete"] is True


def test_other_settings_are_refused(tmp_path, monkeypatch):
    out = tmp_path / "costs.json"
    _counting(monkeypatch)
    lc.cost_table(CONFIG, formats="float,w8a8", batch=2, out=out, layers=[FC], progress=False)
    with pytest.raises(ValueError, match=r"batch = 2 \(this run: 1\).*another --out"):
        lc.cost_table(CONFIG, formats="float,w8a8", batch=1, out=out, progress=False)
    with pytest.raises(ValueError, match="formats"):
        lc.cost_table(CONFIG, formats="float,w4a8", batch=2, out=out, progress=False)
    other = UNetConfig.from_dict({**CONFIG_DICT, "cross_attention_dim": 16})
    with pytest.raises(ValueError, match="model_hash"):
        lc.cost_table(other, formats="float,w8a8", batch=2, out=out, progress=False)
    restarted = lc.cost_table(CONFIG, formats="float", out=out, layers=[FC], restart=True,
                              progress=False)  # fmt: skip
    assert restarted["settings"]["formats"] == ["float"]


def test_load_costs_names_what_is_wrong(tmp_path, monkeypatch):
    out = tmp_path / "costs.json"
    _counting(monkeypatch)
    good = lc.cost_table(CONFIG, formats="float,w8a8", out=out, layers=[FC], progress=False)

    def broken(edit, match):
        doc = json.loads(json.dumps(good))
        edit(doc)
        out.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=match):
            lc.load_costs(out)

    broken(lambda d: d.update(schema="other/1"), "not a layer cost table")
    broken(lambda d: d.pop("layers"), "'layers' missing")
    broken(lambda d: d["layers"][FC].pop("macs"), f"layer '{FC}': key 'macs' missing")
    broken(lambda d: d["layers"][FC]["formats"]["w8a8"].update(ms="fast"),
           f"layer '{FC}': format 'w8a8': ms 'fast'")  # fmt: skip
    broken(lambda d: d["layers"][FC]["formats"].update(w3a3={}), "unknown format 'w3a3'")
    out.write_text("[1, 2]")
    with pytest.raises(ValueError, match=str(out)):
        lc.load_costs(out)


def test_additivity_fit():
    def layer(f, w):
        return {"formats": {"float": {"ms": f, "bytes": 1, "bops": 1},
                            "w8a8": {"ms": w, "bytes": 1, "bops": 1}}}  # fmt: skip

    table = {"layers": {"a": layer(1.0, 0.5), "b": layer(2.0, 1.0), "c": layer(3.0, 3.0)}}
    mixed = {"a": "w8a8", "b": "w8a8"}  # c float: 0.5 + 1 + 3
    uniform = lc.uniform_assignment(table, "w8a8")
    assert lc.predicted_ms(table, mixed) == 4.5 and lc.predicted_ms(table, uniform) == 4.5
    result = lc.additivity(table, {"float": ({}, 2 * 6.0 + 1), "mixed": (mixed, 2 * 4.5 + 1),
                                   "odd": ({"a": "w8a8"}, 2 * 5.5 + 1)})  # fmt: skip
    assert result["unet"]["float"] == {"measured_ms": 13.0, "predicted_ms": 6.0,
                                       "ratio": round(13 / 6, 4)}  # fmt: skip
    fit = result["fit"]
    assert fit["a"] == pytest.approx(2.0) and fit["b_ms"] == pytest.approx(1.0, abs=1e-6)
    assert fit["residual_rms_ms"] < 1e-6 and fit["configs"] == 3
    assert fit["form"] == "affine"
    one = lc.additivity(table, {"float": ({}, 3.0)})["fit"]
    assert one["a"] == 0.5 and one["b_ms"] == 0.0 and one["form"] == "proportional"
    # two points fit any line; a falling line is no cost model: both are proportional
    two = lc.additivity(table, {"float": ({}, 10.0), "mixed": (mixed, 12.0)})["fit"]
    assert two["form"] == "proportional" and two["a"] == pytest.approx(22 / 10.5)
    falling = lc.additivity(table, {"float": ({}, 10.0), "mixed": (mixed, 12.0),
                                    "odd": ({"a": "w8a8"}, 11.0)})["fit"]  # fmt: skip
    assert falling["form"] == "proportional" and falling["b_ms"] == 0.0


# ------------------------------------------------------------------------------ deployed paths
def test_fp8_layers_equal_the_fake_quantizer():
    """Dense, BOS-aware Dense, convs (3x3, strided, a split 1x1): the deployed FP8 GEMM on the
    packed e4m3 codes against FakeQuant with ``QuantSpec(fp8=True)`` on the same inputs."""
    kw, x_bos = lm.inputs()
    params = _random_params(lambda: lm.MODEL.init(jax.random.key(0), **kw))
    ranges = lm.observed_ranges(params, kw, QuantSpec().to_qconfig(lm.SPLITS))
    qconfig = QuantSpec(weight_bits=8, act_bits=8, fp8=True).to_qconfig(lm.SPLITS, ranges)
    fake = lm.forward(FakeQuant(), qconfig)(params, kw)
    layers = {}
    for name in lm.NAMES:
        shape = tuple(layer_kernel(params, name).shape)
        kind = "linear" if len(shape) == 2 else "conv"
        layers[name] = lc.format_plan(name, kind, shape, F["fp8"], bos=is_bos_layer(name),
                                      split=lm.SPLITS[name])  # fmt: skip
    plan = DeployPlan(layers=layers)
    act = {n: qconfig.layers[n].a_range for n in plan.layers}
    packed = jax.jit(lambda p, r, xb: pack_unet_params(p, plan, r, xb))(params, act, x_bos)
    assert packed[lm.FC]["q0"]["w"].dtype == jnp.float8_e4m3fn
    assert set(packed[lm.SHORTCUT]) == {"bias", "q0", "q1"}
    real = lm.forward(Deployed(plan=plan))(packed, kw)
    for name in lm.NAMES:
        assert real[name].shape == fake[name].shape, name
        print(f"fp8 {name}: relative difference {lm.rel_err(real[name], fake[name]):.2e}")
        assert lm.rel_err(real[name], fake[name]) < 1e-5, name
    # and the quantization is real: FP8 differs from the float layer
    assert lm.rel_err(real[lm.CONV], lm.forward(Float())(params, kw)[lm.CONV]) > 1e-4


def test_mixed_plan_equals_fake_quant():
    """A mixed assignment of integer formats (float, w8a8, w4a8, w4a16): the deployed UNet
    forward of `plan_for_formats` equals the fake-quant forward of the same per-layer bits."""
    model = UNet2DConditionModel(config=CONFIG)
    rng = np.random.default_rng(0)
    example = example_inputs(CONFIG, batch=2, seq_len=6)
    params = _random_params(lambda: model.init(jax.random.key(0), **example))
    inputs = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), example)
    inputs["timesteps"] = jnp.asarray([999.0, 500.0])
    x_bos = jnp.asarray(rng.normal(size=8), jnp.float32)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].at[:, 0].set(x_bos)
    splits = layer_splits(build_registry(CONFIG))

    def run(mode, p, kw, qconfig=None):
        with intercept(mode, qconfig):
            return model.apply({"params": p}, **kw)

    # activation ranges: any will do (values outside are clipped alike on both paths)
    ranges = {n: np.array([[-2.0, 2.5]] * (1 if s is None else 2), np.float32)
              for n, s in splits.items()}  # fmt: skip
    choices = ["float", "w8a8", "w4a8", "w4a16"]
    assignment = {n: choices[i % 4] for i, n in enumerate(splits)}
    spec = QuantSpec(
        weight_bits={n: F[f].w_bits for n, f in assignment.items()},
        act_bits={n: F[f].a_bits for n, f in assignment.items()}, symmetric_weights=True,
    )  # fmt: skip
    qconfig = spec.to_qconfig(splits, ranges)
    plan = lc.plan_for_formats(CONFIG, params, assignment)
    assert {lp.w_bits for lp in plan.layers.values()} == {8, 4}
    assert len(plan.layers) == sum(f != "float" for f in assignment.values())
    act = {n: qconfig.layers[n].a_range for n, lp in plan.layers.items() if lp.a_bits < 16}
    packed = jax.jit(lambda p, r, xb: pack_unet_params(p, plan, r, xb))(params, act, x_bos)
    fake = jax.jit(lambda p, kw, qc: run(FakeQuant(), p, kw, qc))(params, inputs, qconfig)
    real = jax.jit(lambda p, kw: run(Deployed(plan=plan), p, kw))(packed, inputs)
    err = float(jnp.max(jnp.abs(real - fake)) / (1.0 + jnp.max(jnp.abs(fake))))
    print(f"mixed plan: relative difference {err:.2e} from fake quant")
    assert err < 1e-5, err
    with pytest.raises(ValueError, match="'nope' is not a Dense/Conv"):
        lc.plan_for_formats(CONFIG, params, {"nope": "w8a8"})
    with pytest.raises(ValueError, match="unknown format 'w3a3'"):
        lc.plan_for_formats(CONFIG, params, {FC: "w3a3"})


# ------------------------------------------------------------------------------ the CLI
def test_cli_smoke(tmp_path, capsys):
    from mixdq_jax import cli  # noqa: PLC0415

    config = tmp_path / "unet.json"
    config.write_text(json.dumps(CONFIG_DICT))
    out = tmp_path / "costs.json"
    argv = ["bench", "layers", "--model", str(config), "--formats", "w8a8", "--repeats", "1",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "71 layers" in printed and "w8a8" in printed and "complete" in printed
    table = lc.load_costs(out)
    assert table["complete"] and table["settings"]["formats"] == ["float", "w8a8"]
    assert cli.main(argv) == 0  # resumed: nothing left to measure
    assert lc.load_costs(out)["layers"] == table["layers"]
    bad = [a if a != "w8a8" else "w8a8,w3a3" for a in argv]
    assert cli.main(bad) == 2
    assert "w3a3" in capsys.readouterr().err
    other = [*argv, "--batch", "2"]
    assert cli.main(other) == 2
    assert "batch = 1 (this run: 2)" in capsys.readouterr().err
