"""SVDQuant's group format (W4A4 + a 16-bit low-rank branch) exported and run for real.

Layer level (standalone layers, `_layer_models`): the deployed layer against the fake-quant
layer (the ground truth, `quant.modes._grouped_call`) on identical inputs, Dense and Conv
(3x3, strided, 1x1), BOS-aware, with and without the branch, every route (the W4A4 GEMM,
dequantized weights, weight-only, activation-only). With a decomposition that is exactly
representable in fp16 the two agree to float rounding (REL_TOL); with an arbitrary f32 one the
fp16 storage of the smoothing and the branch is the only difference (FP16_TOL). Whole UNet:
export -> load (the very tree freezing makes in memory) -> generate on the tiny SDXL pipeline,
and ``mixdq generate --lora`` on the exported folder (the runtime LoRA path).
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mixdq_jax import cli
from mixdq_jax.api import load_pipeline
from mixdq_jax.deploy import (
    Deployed,
    export_quantized_pipeline,
    freeze,
    load_quantized_pipeline,
    run_layer,
)
from mixdq_jax.deploy.checkpoint import _flatten
from mixdq_jax.deploy.grouped import BRANCH_DTYPE, dequantized_kernel, gemm_k
from mixdq_jax.deploy.lora import lora_count
from mixdq_jax.deploy.memory import stored_param_bytes
from mixdq_jax.deploy.packed import LayerPlan, layer_kernel, node_at
from mixdq_jax.quant import FakeQuant, QuantSpec
from mixdq_jax.quant.lowrank import decompose
from mixdq_jax.quant.registry import unet_layers
from pallas_kernels import grid
from tests.deploy import _layer_models as lm
from tests.deploy.conftest import PROMPTS, SIZE
from weights_convert.safetensors_io import save_safetensors

REL_TOL = 2e-5  # fp16-exact decomposition: float summation order only (measured <= 5e-7)
# An f32 decomposition with the branch stored in fp16: the branch's output moves by ~2^-11 of
# itself, linearly (the codes, the smoothing and so every activation code are the fake
# quantizer's); relative RMS difference measured <= 2e-4, quantization errors 4e-2 .. 1e-1.
FP16_TOL = 2e-3
GROUP = 8
QUANTIZED = [lm.CONV, lm.CONV_S2, lm.SHORTCUT, lm.FC, lm.BOS]


@pytest.fixture(scope="module")
def layers():
    params = lm.init_params()
    kw, x_bos = lm.inputs()
    return params, kw, x_bos


def _spec(w_bits, a_bits, lowrank, group=GROUP):
    return QuantSpec(
        weight_bits=w_bits, act_bits=a_bits, group_size=group, lowrank=lowrank,
        protected_weights={lm.FLOAT}, protected_acts={lm.FLOAT},
    )  # fmt: skip


def _both(layers, spec, backend="xla"):
    """``(fake, deployed, plan, packed)`` outputs of every layer on the same inputs."""
    params, kw, x_bos = layers
    qconfig, plan, packed = lm.freeze(spec, params, kw, x_bos)
    fake = lm.forward(FakeQuant(), qconfig)(params, kw)
    real = lm.forward(Deployed(plan=plan, backend=backend))(packed, kw)
    return fake, real, plan, packed


# (w_bits, a_bits) per layer: every route on Dense and Conv layers across three specs
# (W4A4 and W2A4: the W4A4 GEMM; 8-bit weights or 8-bit activations: dequantized weights;
# A16: weight-only; W16: activation-only, the smoothed float kernel)
MIXES = [
    {lm.CONV: (4, 4), lm.CONV_S2: (2, 4), lm.SHORTCUT: (8, 4), lm.FC: (4, 8), lm.BOS: (4, 16)},
    {lm.CONV: (16, 4), lm.CONV_S2: (4, 8), lm.SHORTCUT: (4, 4), lm.FC: (4, 4), lm.BOS: (4, 4)},
    {lm.CONV: (4, 16), lm.CONV_S2: (8, 8), lm.SHORTCUT: (2, 4), lm.FC: (16, 4), lm.BOS: (8, 4)},
]


def _mixed_spec(mix, lowrank, group=GROUP):
    return _spec({**{n: w for n, (w, _) in mix.items()}, lm.FLOAT: 16},
                 {**{n: a for n, (_, a) in mix.items()}, lm.FLOAT: 16}, lowrank, group)  # fmt: skip


@pytest.mark.parametrize("branch", [True, False], ids=["branch", "no_branch"])
@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_deployed_layers_match_fake_quant(layers, mix, branch):
    lowrank = lm.random_lowrank(layers[0], QUANTIZED, 3, fp16=True) if branch else None
    fake, real, plan, packed = _both(layers, _mixed_spec(MIXES[mix], lowrank))
    assert set(plan.layers) == set(QUANTIZED)
    for name, (w_bits, _) in MIXES[mix].items():
        lp = plan.layers[name]
        assert lp.group == GROUP and lp.split is None and lp.smooth == branch, name
        assert lp.rank == (3 if branch and w_bits <= 4 else 0), name
        assert real[name].shape == fake[name].shape and real[name].dtype == fake[name].dtype
        err = lm.rel_err(real[name], fake[name])
        assert err <= REL_TOL, (name, MIXES[mix][name], err)
    # the float layer is untouched; the BOS row is the float layer's
    np.testing.assert_array_equal(real[lm.FLOAT], fake[lm.FLOAT])
    float_out = lm.MODEL.apply({"params": layers[0]}, **layers[1])
    np.testing.assert_allclose(real[lm.BOS][:, 0], float_out[lm.BOS][:, 0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def decomposed(layers):
    """A real decomposition of every quantized layer (SmoothQuant alpha 0.5, rank 3)."""
    params, kw, _ = layers
    x_of = {lm.CONV: "img", lm.CONV_S2: "img", lm.SHORTCUT: "img", lm.FC: "tok", lm.BOS: "ctx"}
    lowrank = {}
    for name in QUANTIZED:
        x = kw[x_of[name]]
        absmax = jnp.max(jnp.abs(x.reshape(-1, x.shape[-1])), axis=0)
        lowrank[name] = decompose(params[name]["kernel"], absmax, alpha=0.5, rank=3)
    return lowrank


@pytest.mark.parametrize("a_bits", [4, 8])
def test_fp16_branch_is_the_only_difference(layers, decomposed, a_bits):
    """A real f32 decomposition (`quant.lowrank.decompose`, not fp16-representable): the
    stored codes are the fake quantizer's, the smoothing is stored in f32, the branch rounded
    to fp16, and the outputs differ from the fake-quant ones by far less than the
    quantization error."""
    params, kw, _ = layers
    lowrank = decomposed
    fake, real, plan, packed = _both(layers, _spec(4, a_bits, lowrank))
    float_out = lm.MODEL.apply({"params": params}, **kw)
    for name in QUANTIZED:
        node, lp, lr = node_at(packed, name), plan.layers[name], lowrank[name]
        np.testing.assert_array_equal(node["smooth"], lr.smooth)  # f32, exactly
        for key in ("down", "up"):
            assert node[key].dtype == BRANCH_DTYPE, (name, key)
            np.testing.assert_array_equal(node[key], getattr(lr, key).astype(BRANCH_DTYPE))
        # the codes are those of the f32 residual, exactly as the fake quantizer makes them
        resid = params[name]["kernel"] * lr.smooth[:, None] - (
            lr.down.reshape(-1, 3) @ lr.up
        ).reshape(*lr.down.shape[:-1], -1)
        deq = dequantized_kernel(node["q0"]["w"], node["q0"]["w_scale"], lp.weight_shape,
                                 lp.storage_bits, lp.group)  # fmt: skip
        np.testing.assert_array_equal(deq, grid.group_fake_quant_kernel(resid, 4, GROUP))
        diff, quant_err = _rms(real[name], fake[name]), _rms(fake[name], float_out[name])
        print(f"{name}: |deployed - fake| {diff:.1e}, quantization error {quant_err:.1e}")
        assert diff <= FP16_TOL and diff < 0.05 * quant_err, (name, diff, quant_err)


def _rms(got, want) -> float:
    """``||got - want|| / ||want||``: a flipped code (a whole step, in a few outputs) counts
    for its share, not for the whole layer."""
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def test_grouped_node_layout(layers):
    params, kw, x_bos = layers
    lowrank = lm.random_lowrank(params, QUANTIZED, 3, fp16=True)
    w = {lm.CONV: 4, lm.CONV_S2: 2, lm.SHORTCUT: 8, lm.FC: 4, lm.BOS: 16}
    spec = _spec({**w, lm.FLOAT: 16}, 4, lowrank)
    _, plan, packed = lm.freeze(spec, params, kw, x_bos)
    conv = node_at(packed, lm.CONV)  # 3x3, 20 -> 12: each position's 20 channels padded to 24
    k_pad = 9 * 24
    assert gemm_k((3, 3, 20, 12), GROUP) == k_pad
    assert conv["q0"]["w"].dtype == jnp.int8 and conv["q0"]["w"].shape == (k_pad // 2, 12)
    assert conv["q0"]["w_scale"].dtype == jnp.float32
    assert conv["q0"]["w_scale"].shape == (k_pad // GROUP, 12)
    assert conv["smooth"].shape == (20,) and conv["down"].shape == (3, 3, 20, 3)
    assert conv["up"].shape == (3, 12) and conv["bias"].shape == (12,)
    assert set(conv["q0"]) == {"w", "w_scale"}  # no activation range: per-token scales
    s2 = node_at(packed, lm.CONV_S2)  # 2-bit weights in int4 fields
    assert plan.layers[lm.CONV_S2].storage_bits == 4 and s2["q0"]["w"].shape == (k_pad // 2, 10)
    sc = node_at(packed, lm.SHORTCUT)  # 8-bit: int8 codes, no branch (w_bits > 4), smoothing
    assert sc["q0"]["w"].shape == (24, 12) and "down" not in sc and "smooth" in sc
    bos = node_at(packed, lm.BOS)  # float weights, 4-bit activations: the smoothed kernel
    np.testing.assert_allclose(bos["kernel"], params[lm.BOS]["kernel"]
                               * lowrank[lm.BOS].smooth[:, None], rtol=1e-6)  # fmt: skip
    fc = node_at(packed, lm.FC)
    assert fc["q0"]["w"].shape == (24 // 2, 16) and "bos_row" not in fc
    # a per-channel plan reads and writes as before: no new keys in its metadata
    old = LayerPlan(name="x", kind="linear", weight_shape=(4, 4), w_bits=8, a_bits=8,
                    storage_bits=8, symmetric=True)  # fmt: skip
    assert set(old.as_dict()) == {"name", "kind", "weight_shape", "w_bits", "a_bits",
                                  "storage_bits", "symmetric", "split", "bos"}  # fmt: skip
    assert LayerPlan.from_dict(plan.layers[lm.CONV].as_dict()) == plan.layers[lm.CONV]


def test_pallas_w4a4_kernel_matches_xla(layers):
    """Group 32 (the Pallas kernel tiles group / 2 >= 16), interpret mode off-GPU: the kernel
    route and the XLA route of the deployed layers agree to float rounding."""
    params, kw, x_bos = layers
    names = [lm.CONV, lm.FC]
    lowrank = lm.random_lowrank(params, names, 3, fp16=True)
    spec = QuantSpec(weight_bits={lm.CONV: 4, lm.FC: 4}, act_bits={lm.CONV: 4, lm.FC: 4},
                     default_weight_bits=16, default_act_bits=16, group_size=32,
                     lowrank=lowrank)  # fmt: skip
    _, plan, packed = lm.freeze(spec, params, kw, x_bos)
    modules = {lm.CONV: nn.Conv(12, (3, 3), padding=1), lm.FC: nn.Dense(16)}
    x = {lm.CONV: kw["img"][:1, :4, :4], lm.FC: kw["tok"][:1]}  # interpret mode is slow
    for name in names:
        p = dict(node_at(packed, name))
        ref = run_layer(modules[name], plan.layers[name], p, x[name], backend="xla")
        got = run_layer(modules[name], plan.layers[name], p, x[name], backend="pallas")
        assert lm.rel_err(got, ref) <= REL_TOL, name


# ------------------------------------------------------------------------------ whole UNet
def _unet_lowrank(pipe, rank=2):
    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    return names, lm.random_lowrank(pipe.params["unet"], names, rank, seed=3)


@pytest.fixture(scope="module")
def grouped_export(pipe, tmp_path_factory):
    names, lowrank = _unet_lowrank(pipe)
    rng = np.random.default_rng(4)
    spec = QuantSpec(
        weight_bits={n: int(rng.choice([4, 4, 8])) for n in names},
        act_bits={n: int(rng.choice([4, 4, 8, 16])) for n in names},
        group_size=16, lowrank=lowrank,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("grouped") / "w4a4"
    meta = export_quantized_pipeline(pipe, spec, out, float_dtype=jnp.float32)
    return spec, out, meta


@pytest.mark.slow
def test_unet_export_load_generate(pipe, grouped_export):
    spec, out, meta = grouped_export
    config = json.loads((out / "unet" / "config.json").read_text())["quantization_config"]
    assert config["weight_granularity"] == "per_group" and config["group_size"] == 16
    assert config["act_granularity"] == "per_token_group" and config["lowrank_dtype"] == "float16"
    assert config["lowrank_rank"] and set(config["lowrank_rank"].values()) == {2}
    assert meta["act_ranges"] == {} and meta["spec"]["group_size"] == 16
    # the bytes the study reports (shapes only) are the exported arrays' bytes
    assert stored_param_bytes(pipe.unet.config, spec, float_dtype=jnp.float32) == meta[
        "param_bytes"
    ]
    # loading gives exactly the packed tree freezing gives in memory (the branch as stored:
    # fp16; a float32 export keeps it so) ...
    loaded = load_quantized_pipeline(out)
    plan, packed, _ = freeze(pipe, spec, float_dtype=jnp.float32)
    assert loaded.quantized.mode.plan == plan
    want, got = _flatten(packed), _flatten(loaded.quantized.params)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # it generates: test_cli_generate_with_runtime_lora (one UNet compile for both tests)


def _unet_lora(pipe, names, rank=2, seed=0):
    """A PEFT-named LoRA on some attention projections and a conv of the tiny UNet."""
    rng = np.random.default_rng(seed)
    picks = [n for n in names if n.endswith(("attn1.to_q", "attn2.to_k", "resnets.0.conv1"))]
    lora = {}
    for name in picks:
        shape = layer_kernel(pipe.params["unet"], name).shape
        down = (rank, shape[-2], *shape[:2]) if len(shape) == 4 else (rank, shape[-2])
        up = (shape[-1], rank, 1, 1) if len(shape) == 4 else (shape[-1], rank)
        lora[f"unet.{name}.lora_A.weight"] = rng.normal(0, 0.2, down).astype(np.float32)
        lora[f"unet.{name}.lora_B.weight"] = rng.normal(0, 0.2, up).astype(np.float32)
    return lora


@pytest.mark.slow
def test_cli_generate_with_runtime_lora(pipe, grouped_export, tmp_path):
    """``mixdq generate --model QDIR --lora A --lora B --lora-scale ...`` on a quantized
    export: the LoRAs run as branches (the export is untouched) and the images are written."""
    _, out, _ = grouped_export
    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    files = []
    for seed in (0, 1):
        path = tmp_path / f"lora{seed}.safetensors"
        save_safetensors(path, _unet_lora(pipe, names, seed=seed))
        files.append(path)
    images = tmp_path / "images"
    argv = ["generate", "--model", str(out), "--prompt", PROMPTS[0], "--lora", str(files[0]),
            "--lora", str(files[1]), "--lora-scale", "0.5", "1.0", "--height", str(SIZE),
            "--width", str(SIZE), "--out", str(images)]  # fmt: skip
    assert cli.main(argv) == 0
    index = json.loads((images / "prompts.json").read_text())
    assert index["settings"]["lora"] == [str(f) for f in files]
    assert index["settings"]["lora_scale"] == [0.5, 1.0]
    assert (images / "0000.png").is_file()
    pixels = np.asarray(Image.open(images / "0000.png"))
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.std() > 0
    # a wrong count of scales is named before anything loads
    assert cli.main([*argv[:-1], str(tmp_path / "other"), "--lora-scale", "1", "2", "3"]) == 2
    assert not (tmp_path / "other").exists()
    assert lora_count(load_quantized_pipeline(out).quantized.params) == 0  # export untouched
    # the Python API: load_pipeline(QDIR, lora=...) takes the runtime path, not a fusion
    lored = load_pipeline(out, lora=files[0], lora_scale=0.5)
    assert lora_count(lored.quantized.params) == 1
    assert jax.tree.leaves(pipe.params["unet"])  # the float pipeline is untouched too
