"""LoRA on a quantized model at run time (`mixdq_jax.deploy.lora`), per layer against the
float fusion (`weights_convert.lora.fuse_lora`, itself tested against PEFT's merge).

For every LoRA'd layer of a packed model of any format (per-channel W8A8, mixed W2..W8 with
A8/A16/W16 layers and a split conv, SVDQuant's grouped W4A4 with smoothing and a branch), on
identical inputs: the LoRA'd deployed layer == the same quantized base layer + ``x dW``, with
``dW`` = (fused float weights) - (float weights), to float rounding (REL_TOL): the quantized
weights are untouched, the LoRA is exact. A float layer of the export gets a branch too, and a
BOS row the LoRA's share. Several LoRAs at once, in PEFT and kohya naming; the scales change
without recompiling.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.deploy import Deployed
from mixdq_jax.deploy.lora import apply_lora, lora_count, lora_params, set_lora_scales
from mixdq_jax.deploy.packed import node_at
from mixdq_jax.quant import QuantSpec
from mixdq_jax.quant.quantized import QuantizedUNet
from tests.deploy import _layer_models as lm
from weights_convert.convert import _to_flax_layout, flax_to_torch
from weights_convert.lora import LoRAError, fuse_lora

REL_TOL = 2e-5  # max |got - want| / (1 + max |want|); measured <= 1e-6
TARGETS = [lm.CONV, lm.CONV_S2, lm.SHORTCUT, lm.FC, lm.BOS, lm.FLOAT]

SPECS = {
    "w8a8": QuantSpec(weight_bits=8, act_bits=8, protected_weights={lm.FLOAT},
                      protected_acts={lm.FLOAT}),
    "mixed": QuantSpec(
        weight_bits={lm.CONV: 4, lm.CONV_S2: 2, lm.SHORTCUT: 4, lm.FC: 8, lm.BOS: 16,
                     lm.FLOAT: 16},
        act_bits={lm.CONV: 8, lm.CONV_S2: 16, lm.SHORTCUT: 8, lm.FC: 16, lm.BOS: 8,
                  lm.FLOAT: 16},
        symmetric_weights=True,
    ),
    "grouped": "w4a4 with a branch",  # built in the fixture (it needs the params)
}  # fmt: skip


@pytest.fixture(scope="module")
def layers():
    params = lm.init_params()
    kw, x_bos = lm.inputs()
    return params, kw, x_bos


def _spec(name, params):
    if name != "grouped":
        return SPECS[name]
    quantized = [n for n in lm.NAMES if n != lm.FLOAT]
    return QuantSpec(
        weight_bits={**dict.fromkeys(quantized, 4), lm.SHORTCUT: 8, lm.FLOAT: 16},
        act_bits={**dict.fromkeys(quantized, 4), lm.FLOAT: 16},
        group_size=8, lowrank=lm.random_lowrank(params, quantized, 3, seed=2),
    )  # fmt: skip


def _peft_lora(params, names, rank, seed):
    """PEFT naming: ``unet.<module>.lora_A.weight`` (r, in[, kh, kw]) / ``lora_B.weight``."""
    rng = np.random.default_rng(seed)
    lora = {}
    for name in names:
        shape = params[name]["kernel"].shape
        down = (rank, shape[-2], *shape[:2]) if len(shape) == 4 else (rank, shape[-2])
        up = (shape[-1], rank, 1, 1) if len(shape) == 4 else (shape[-1], rank)
        lora[f"unet.{name}.lora_A.weight"] = rng.normal(0, 0.3, down).astype(np.float32)
        lora[f"unet.{name}.lora_B.weight"] = rng.normal(0, 0.3, up).astype(np.float32)
    return lora


def _kohya_lora(params, names, rank, seed, alpha):
    """kohya naming: ``lora_unet_<module with underscores>.lora_down/up.weight`` + alpha."""
    out = {}
    for key, value in _peft_lora(params, names, rank, seed).items():
        stem, kind = key.removeprefix("unet.").split(".lora_")
        flat = "lora_unet_" + stem.replace(".", "_")
        out[f"{flat}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        out[f"{flat}.alpha"] = np.asarray(alpha, np.float32)
    return out


def _deltas(params, loras):
    """``{layer: dW in the Flax layout}``: the fused float weights minus the float weights."""
    state = flax_to_torch(params)
    fused = {"unet": state}
    for lora, scale in loras:
        fused = fuse_lora(fused, lora, scale=scale)
    out = {}
    for name in lm.NAMES:
        key = f"{name}.weight"
        diff = fused["unet"][key].astype(np.float64) - state[key].astype(np.float64)
        out[name] = jnp.asarray(_to_flax_layout(diff, "conv" if diff.ndim == 4 else "linear"),
                                jnp.float32)  # fmt: skip
    return out


def _x_dw(name, x, dw):
    """``x dW`` through the layer's own geometry (no bias)."""
    module = {
        lm.CONV: nn.Conv(12, (3, 3), padding=1, use_bias=False),
        lm.CONV_S2: nn.Conv(10, (3, 3), strides=2, padding=1, use_bias=False),
        lm.SHORTCUT: nn.Conv(12, (1, 1), padding="VALID", use_bias=False),
    }.get(name, nn.Dense(16, use_bias=False))
    return module.apply({"params": {"kernel": dw}}, x)


X_OF = {lm.CONV: "img", lm.CONV_S2: "img", lm.SHORTCUT: "img", lm.FC: "tok", lm.BOS: "ctx",
        lm.FLOAT: "tok"}  # fmt: skip


@pytest.mark.parametrize("fmt", list(SPECS))
def test_runtime_lora_equals_quantized_base_plus_lora_update(layers, fmt):
    params, kw, x_bos = layers
    _, plan, packed = lm.freeze(_spec(fmt, params), params, kw, x_bos)
    loras = [
        (_peft_lora(params, TARGETS, 2, seed=0), 0.8),
        (_kohya_lora(params, [lm.CONV, lm.FC, lm.BOS], 3, seed=1, alpha=1.5), -0.6),
    ]
    new_plan, new_params, _ = lora_params(plan, packed, loras)
    assert lm.FLOAT not in plan.layers and new_plan.layers[lm.FLOAT].mode == "float"
    assert lora_count(new_params) == 2
    base = lm.forward(Deployed(plan=plan, backend="xla"))(packed, kw)
    run = lm.forward(Deployed(plan=new_plan, backend="xla"))
    got = run(new_params, kw)
    dws = _deltas(params, loras)
    for name in TARGETS:
        want = base[name] + _x_dw(name, kw[X_OF[name]], dws[name])
        assert lm.rel_err(got[name], want) <= REL_TOL, (fmt, name, lm.rel_err(got[name], want))
        assert lm.rel_err(base[name], want) > 1e-2, name  # the LoRA visibly changes the layer
    # the BOS row: the stored float row plus the LoRA's share
    node = node_at(packed, lm.BOS)
    if "bos_row" in node:
        np.testing.assert_allclose(got[lm.BOS][:, 0], node["bos_row"] + _x_dw(
            lm.BOS, kw["ctx"][:, :1], dws[lm.BOS])[:, 0], rtol=1e-5, atol=1e-5)  # fmt: skip

    # new scales: only the traced branch_scale leaves change, the compiled forward is reused
    for scales in ([0.3, 1.0], [0.0, 0.0], 1.0):
        rescaled = set_lora_scales(new_params, scales)
        assert jax.tree.structure(rescaled) == jax.tree.structure(new_params)
        out = run(rescaled, kw)
        pairs = [(lo, s) for (lo, _), s in zip(loras, np.broadcast_to(scales, 2), strict=True)]
        dws = _deltas(params, pairs)
        for name in TARGETS:
            want = base[name] + _x_dw(name, kw[X_OF[name]], dws[name])
            assert lm.rel_err(out[name], want) <= REL_TOL, (fmt, scales, name)
    assert run._cache_size() == 1  # one compile for every scale


def test_apply_lora_to_a_loaded_unet_and_errors(layers, tmp_path):
    """The `QuantizedUNet` API (what a loaded export holds), and clear errors."""
    params, kw, x_bos = layers
    _, plan, packed = lm.freeze(SPECS["w8a8"], params, kw, x_bos)
    unet = QuantizedUNet(params=packed, mode=Deployed(plan=plan, backend="xla"))
    lora = _peft_lora(params, [lm.FC], 2, seed=3)
    lored = apply_lora(unet, lora, 0.5)
    assert lored.mode is unet.mode  # no float layer targeted: the same plan, the same mode
    again = set_lora_scales(lored, 2.0)
    assert again.mode is lored.mode  # same mode object: cached programs are reused
    np.testing.assert_array_equal(node_at(again.params, lm.FC)["branch_scale"], [2.0, 2.0])
    stacked = apply_lora(lored, [(lora, 1.0)])
    assert lora_count(stacked.params) == 2
    with pytest.raises(ValueError, match="2 LoRA"):
        set_lora_scales(stacked, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="carries no LoRA"):
        set_lora_scales(unet, 1.0)
    bad = {"unet.blocks.0.no_such_layer.lora_A.weight": np.zeros((2, 4), np.float32),
           "unet.blocks.0.no_such_layer.lora_B.weight": np.zeros((4, 2), np.float32)}  # fmt: skip
    with pytest.raises(LoRAError, match="no_such_layer"):
        apply_lora(unet, bad)
    wrong = _peft_lora(params, [lm.FC], 2, seed=3)
    wrong[f"unet.{lm.FC}.lora_A.weight"] = np.zeros((2, 7), np.float32)
    with pytest.raises(LoRAError, match="do not fit layer"):
        apply_lora(unet, wrong)
    text = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((2, 4)),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.zeros((4, 2))}
    with pytest.raises(LoRAError, match="QuantizedPipeline"):
        apply_lora(unet, text)
    with pytest.raises(ValueError, match="loaded from a mixdq export"):
        apply_lora(QuantizedUNet(params=params), lora)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        apply_lora(unet, tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="3 LoRA scales for 2"):
        apply_lora(unet, [lora, lora], [1.0, 2.0, 3.0])
