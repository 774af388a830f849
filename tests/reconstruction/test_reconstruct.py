"""Block reconstruction on small flax models, checked with numpy: learned rounding lowers a
single layer's and a tiny block's output error below nearest rounding, learned step sizes end
as ordinary ranges, and a reconstruction killed after a unit resumes to the same codes."""

from __future__ import annotations

import re
from dataclasses import replace

import flax.linen as nn
import jax
import numpy as np
import pytest

from mixdq_jax.quant import Observe, QuantSpec, intercept
from mixdq_jax.reconstruction import ReconConfig, find_units, reconstruct
from mixdq_jax.rundir import RunDir
from tests.reconstruction.test_adaround import np_grid

BLOCKS = re.compile(r"^(resnets\.\d+)\.")


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(24, name="fc1")(x))
        return x + nn.Dense(x.shape[-1], name="fc2")(h)


class TwoBlocks(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Block(name="resnets.1")(Block(name="resnets.0")(x))


class OneLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="fc")(x)


def _data(n, d, seed=0):
    """Correlated features (a low-rank mix plus noise), where rounding choices matter."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(n, d))
    return z.astype(np.float32)


def _setup(model, x, names, w_bits, a_bits):
    params = model.init(jax.random.key(1), x)["params"]
    with intercept(Observe(), QuantSpec().to_qconfig(names)) as rec:
        model.apply({"params": params}, x)
    ranges = {k: np.asarray(v) for k, v in rec.data.items()}
    qconfig = QuantSpec(weight_bits=w_bits, act_bits=a_bits).to_qconfig(names, ranges)
    return params, ranges, qconfig


def _apply(model):
    return lambda p, b, **kw: model.apply({"params": p}, b["x"], **kw)


def np_quant(w, bits):
    """Nearest-rounding per-channel weights, the paper's min-max quantizer."""
    scale, zero, levels = np_grid(w, bits)
    return scale * (np.clip(np.round(w / scale) + zero, 0, levels) - zero)


def np_act(x, bits, lo, hi):
    levels = 2**bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) * np.float32(1.0 / levels), 1e-8)
    zero = np.round(-lo / scale)
    return scale * (np.clip(np.round(x / scale) + zero, 0, levels) - zero)


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_a_single_layer_beats_nearest_rounding():
    x = _data(64, 10)
    model = OneLayer()
    params, _, qconfig = _setup(model, x, ["fc"], 3, 16)
    config = ReconConfig(iters=300, act_iters=0, batch_size=32, lr=1e-2)
    res = reconstruct(_apply(model), params, qconfig, {"x": x}, config=config, progress=False)
    w, b = np.asarray(params["fc"]["kernel"]), np.asarray(params["fc"]["bias"])
    learned_w = np.asarray(res.params["fc"]["kernel"])
    ref = x @ w + b
    mse_nearest = np.mean((x @ np_quant(w, 3) + b - ref) ** 2)
    mse_learned = np.mean((x @ np_quant(learned_w, 3) + b - ref) ** 2)
    assert mse_learned < 0.8 * mse_nearest, (mse_learned, mse_nearest)
    # learned codes stay within one step of nearest rounding, on the same grid
    scale, zero, _ = np_grid(w, 3)
    assert np.array_equal(np_grid(learned_w, 3)[0], scale)
    codes = np.round(learned_w / scale) + zero
    assert np.max(np.abs(codes - (np.round(w / scale) + zero))) <= 1
    assert 0 < np.mean(codes != np.round(w / scale) + zero) < 0.5


def _np_block(x, p, prefix, wq, aq):
    def layer(name, inp):
        node = p[prefix][name]
        return aq(f"{prefix}.{name}", inp) @ wq(np.asarray(node["kernel"])) + np.asarray(
            node["bias"]
        )

    return x + layer("fc2", np_gelu(layer("fc1", x)))


class Killed(BaseException):
    """Stands for SIGKILL: nothing below the raise runs."""


def test_a_tiny_block_beats_nearest_rounding_and_a_killed_run_resumes_to_the_same_codes(
    tmp_path, monkeypatch
):
    x = _data(64, 8, seed=3)
    model = TwoBlocks()
    names = ["resnets.0.fc1", "resnets.0.fc2", "resnets.1.fc1", "resnets.1.fc2"]
    params, ranges, qconfig = _setup(model, x, names, 3, 8)
    units = find_units(names, BLOCKS)
    # lr 1e-2 instead of BRECQ's 1e-3: 300 steps instead of 20000
    config = ReconConfig(iters=300, act_iters=60, batch_size=32, lr=1e-2)
    apply = _apply(model)  # one function: the compiled programs are reused by the reruns

    def run(path):
        return reconstruct(apply, params, qconfig, {"x": x}, config=config, units=units,
                           run=RunDir(path), progress=False)  # fmt: skip

    res = run(tmp_path / "whole")
    assert set(res.act_ranges) == set(names) and set(res.mse) == {"resnets.0", "resnets.1"}
    ref = _np_block(x, params, "resnets.0", lambda w: w, lambda n, a: a)

    def calibrated(n, a):
        return np_act(a, 8, *ranges[n][0])

    def learned(n, a):
        return np_act(a, 8, *res.act_ranges[n][0])

    nearest = _np_block(x, params, "resnets.0", lambda w: np_quant(w, 3), calibrated)
    got = _np_block(x, res.params, "resnets.0", lambda w: np_quant(w, 3), learned)
    mse_nearest, mse_learned = np.mean((nearest - ref) ** 2), np.mean((got - ref) ** 2)
    assert mse_learned < 0.8 * mse_nearest, (mse_learned, mse_nearest)

    # killed after the first unit's file is written, then run again
    original = RunDir.write_reconstructed_unit
    calls = {"n": 0}

    def dying(self, key, index, arrays):
        if calls["n"] >= 1:
            raise Killed
        calls["n"] += 1
        return original(self, key, index, arrays)

    monkeypatch.setattr(RunDir, "write_reconstructed_unit", dying)
    with pytest.raises(Killed):
        run(tmp_path / "killed")
    monkeypatch.setattr(RunDir, "write_reconstructed_unit", original)
    assert [p.name for p in sorted((tmp_path / "killed").rglob("unit_*.npz"))] == ["unit_00000.npz"]
    resumed = run(tmp_path / "killed")
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(resumed.params), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert res.act_ranges.keys() == resumed.act_ranges.keys()
    for name, value in res.act_ranges.items():
        assert value.tobytes() == resumed.act_ranges[name].tobytes()
    # other settings are refused rather than mixed into the finished units
    with pytest.raises(ValueError, match="other settings"):
        reconstruct(apply, params, qconfig, {"x": x}, config=replace(config, iters=301),
                    units=units, run=RunDir(tmp_path / "killed"), progress=False)  # fmt: skip


def test_units_group_blocks_and_leave_other_layers_alone():
    names = ["conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2",
             "down_blocks.1.attentions.0.proj_in",
             "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
             "down_blocks.1.attentions.0.proj_out", "conv_out"]  # fmt: skip
    units = find_units(names)
    assert [u.name for u in units] == [
        "conv_in", "down_blocks.0.resnets.0", "down_blocks.1.attentions.0.proj_in",
        "down_blocks.1.attentions.0.transformer_blocks.0",
        "down_blocks.1.attentions.0.proj_out", "conv_out",
    ]  # fmt: skip
    assert units[3].layers == tuple(names[4:6])


def test_bad_requests_are_named():
    x = _data(8, 4)
    model = OneLayer()
    params, _, qconfig = _setup(model, x, ["fc"], 4, 16)
    with pytest.raises(ValueError, match="not in the configuration"):
        reconstruct(_apply(model), params, qconfig, {"x": x},
                    units=find_units(["fc", "other"]), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="no unit named"):
        reconstruct(_apply(model), params, qconfig, {"x": x},
                    config=ReconConfig(blocks=("fcc",)), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="iters"):
        ReconConfig(iters=-1)
    with pytest.raises(ValueError, match="lr"):
        ReconConfig(lr=0.0)
    fp8 = QuantSpec(weight_bits=8, fp8=True).to_qconfig(["fc"])
    with pytest.raises(ValueError, match="integer weights"):
        reconstruct(_apply(model), params, fp8, {"x": x}, progress=False)


def test_a_unit_of_each_kind_runs_alone_as_inside_the_sdxl_unet(tmp_path):
    """Reconstruction steps run each unit alone on its captured inputs (`unit_inputs`,
    `UnitCall.run`): on a tiny SDXL UNet at W4A8 a unit's output, and every layer's inside it,
    equals what the whole model computes at that module (flax's capture_intermediates)."""
    import jax.numpy as jnp

    from mixdq_jax.api import load_pipeline
    from mixdq_jax.quant import FakeQuant
    from mixdq_jax.quant.registry import layer_splits, unet_layers
    from mixdq_jax.reconstruction import unet_apply
    from mixdq_jax.reconstruction.blocks import capture, unit_inputs
    from tests.tiny_models import build_sdxl

    pipe = load_pipeline(build_sdxl(tmp_path / "pipe", unet_overrides=dict(
        layers_per_block=1, transformer_layers_per_block=(1, 1))))  # fmt: skip
    h, w = pipe.image_size
    rng = np.random.default_rng(0)
    context, pooled = pipe.encode_prompt(pipe.tokenize(["a red cube", "a cat", "two cones"]))
    cond = pipe.conditioning(context, pooled, 0.0, h, w)
    f = pipe.vae_scale_factor
    data = {
        "sample": rng.normal(size=(3, pipe.unet.config.in_channels, h // f, w // f)).astype(
            np.float32),
        "t": np.array([999.0, 500.0, 20.0], np.float32),
        **jax.tree.map(np.asarray, cond),
    }  # fmt: skip
    splits = layer_splits(unet_layers(pipe.unet.config))
    observed = {n: np.array([[-3.0, 3.0]] * (1 if s is None else 2), np.float32)
                for n, s in splits.items()}  # fmt: skip
    qconfig = QuantSpec(weight_bits=4, act_bits=8).to_qconfig(splits, observed)
    apply, params = unet_apply(pipe.unet), pipe.params["unet"]
    units = find_units(list(splits))
    assert len(units) > 10 and any(u.name == "conv_in" for u in units)
    # one of each kind (every unit costs two compilations): single layers in and out, a down
    # ResBlock, a transformer block, an up ResBlock (its shortcut's input split in two)
    kinds = [lambda n: n == "time_embedding.linear_1", lambda n: n == "conv_out",
             lambda n: n.startswith("down_blocks") and ".resnets." in n,
             lambda n: "transformer_blocks" in n,
             lambda n: n.startswith("up_blocks") and ".resnets." in n]  # fmt: skip
    chosen = [next(u for u in units if kind(u.name)) for kind in kinds]
    assert any(splits[n] is not None for n in chosen[-1].layers)
    # op by op, both sides: a compiled program may round an activation that sits on an 8-bit
    # boundary the other way, and one flipped code grows through every later quantized layer
    # (a third of conv_out's elements on this CPU); the same ops on the same inputs give the
    # same bits, so any difference left is the plumbing's. One pass captures every unit.
    names = [n for unit in chosen for n in unit.layers if n != unit.name]
    with jax.disable_jit():
        whole = capture(apply, params, data, [u.name for u in chosen] + names,
                        mode=FakeQuant(), qconfig=qconfig)  # fmt: skip
    for unit in chosen:
        inner = tuple(n for n in unit.layers if n != unit.name)
        with jax.disable_jit():
            call, arrays = unit_inputs(apply, params, data, unit.name, 3, mode=FakeQuant(),
                                       qconfig=qconfig)  # fmt: skip
            alone = call.run(params, [jnp.asarray(a) for a in arrays], mode=FakeQuant(),
                             qconfig=qconfig, layers=inner)  # fmt: skip
        for name in (unit.name, *inner):
            np.testing.assert_allclose(np.asarray(alone[name]), np.asarray(whole[name]),
                                       rtol=1e-5, atol=1e-5, err_msg=name)  # fmt: skip
