"""A handful of standalone Dense/Conv layers named like diffusers modules (so LoRA files in
PEFT / kohya naming target them), for fast layer-level tests of the deployed path: convs
(3x3, strided, 1x1 shortcut with a split input), a Dense, a BOS-aware ``attn2.to_k`` and a
layer every spec keeps float."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.deploy import DeployPlan, pack_unet_params
from mixdq_jax.deploy.packed import layer_kernel
from mixdq_jax.quant import Observe, intercept, update_ranges
from mixdq_jax.quant.lowrank import LowRank

CONV = "blocks.0.resnets.0.conv1"
CONV_S2 = "blocks.0.downsamplers.0.conv"
SHORTCUT = "blocks.0.resnets.0.conv_shortcut"
FC = "blocks.0.attentions.0.attn1.to_q"
BOS = "blocks.0.attentions.0.attn2.to_k"
FLOAT = "blocks.0.attentions.0.proj_out"  # protected: never planned by the specs below
NAMES = [CONV, CONV_S2, SHORTCUT, FC, BOS, FLOAT]
SPLITS = {n: (8 if n == SHORTCUT else None) for n in NAMES}


class Layers(nn.Module):
    @nn.compact
    def __call__(self, img, tok, ctx):
        return {
            CONV: nn.Conv(12, (3, 3), padding=1, name=CONV)(img),
            CONV_S2: nn.Conv(10, (3, 3), strides=2, padding=1, name=CONV_S2)(img),
            SHORTCUT: nn.Conv(12, (1, 1), padding="VALID", name=SHORTCUT)(img),
            FC: nn.Dense(16, name=FC)(tok),
            BOS: nn.Dense(16, use_bias=False, name=BOS)(ctx),
            FLOAT: nn.Dense(16, name=FLOAT)(tok),
        }


MODEL = Layers()


def inputs(seed: int = 0) -> tuple[dict, jax.Array]:
    """``({img, tok, ctx}, x_bos)``: channels of very different scales (what smoothing is
    for), and context token 0 a fixed BOS embedding."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(2, 6, 6, 20)) * rng.uniform(0.1, 5.0, 20)
    tok = rng.normal(size=(2, 5, 24)) * rng.uniform(0.1, 5.0, 24)
    ctx = rng.normal(size=(2, 7, 24))
    x_bos = np.random.default_rng(99).normal(size=24)
    ctx[:, 0] = x_bos
    arrays = {"img": img, "tok": tok, "ctx": ctx}
    return {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}, jnp.asarray(x_bos)


def init_params(seed: int = 0) -> dict:
    kw, _ = inputs()
    params = MODEL.init(jax.random.key(seed), **kw)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype), params)


def observed_ranges(params: dict, kw: dict, qconfig) -> dict:
    @jax.jit
    def observe(p, kw):
        with intercept(Observe(), qconfig) as rec:
            MODEL.apply({"params": p}, **kw)
        return rec.data

    return {k: np.asarray(v) for k, v in update_ranges(None, observe(params, kw)).items()}


def random_lowrank(params: dict, names, rank: int, seed: int = 0, *, fp16: bool = False):
    """A ``LowRank`` of the right shapes per layer (random: the deployed path must follow
    whatever decomposition the spec holds); ``fp16``: values exactly representable in fp16."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        shape = layer_kernel(params, name).shape
        arrays = {
            "smooth": rng.uniform(0.2, 4.0, shape[-2]),
            "down": rng.normal(0, 0.3, (*shape[:-1], rank)),
            "up": rng.normal(0, 0.3, (rank, shape[-1])),
        }
        if fp16:
            arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
        out[name] = LowRank(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})
    return out


def freeze(spec, params: dict, kw: dict, x_bos):
    """``(qconfig, plan, packed)`` of ``spec`` (activation ranges observed on ``kw``)."""
    from mixdq_jax.quant import QuantSpec  # noqa: PLC0415

    ranges = None  # the group format scales activations per token: no calibration
    if spec.group_size is None:
        ranges = observed_ranges(params, kw, QuantSpec().to_qconfig(SPLITS))
    qconfig = spec.to_qconfig(SPLITS, ranges)
    plan = DeployPlan.from_qconfig(qconfig, params)
    act = {n: lq.a_range for n, lq in qconfig.layers.items()
           if n in plan.layers and plan.layers[n].group is None}  # fmt: skip
    lowrank = {n: lq.lowrank for n, lq in qconfig.layers.items() if lq.lowrank is not None}
    packed = pack_unet_params(params, plan, act, x_bos, lowrank=lowrank)
    return qconfig, plan, packed


def forward(mode, qconfig=None):
    """A jitted ``params, kw -> {layer: output}`` in ``mode``. With a ``qconfig`` (fake
    quantization) the configuration is an argument of one program per mode: configurations of
    one structure share it (the bits are data)."""
    if qconfig is None:  # a deployed mode: its plan is part of the program

        @jax.jit
        def run(params, kw):
            return _run(mode, params, kw, None)

        return run
    if mode not in _FAKE:
        _FAKE[mode] = jax.jit(lambda params, kw, qc, m=mode: _run(m, params, kw, qc))
    fake = _FAKE[mode]
    return lambda params, kw: fake(params, kw, qconfig)


def _run(mode, params, kw, qconfig):
    with intercept(mode, qconfig):
        return MODEL.apply({"params": params}, **kw)


_FAKE: dict = {}


def rel_err(got, want) -> float:
    """``max |got - want| / (1 + max |want|)``."""
    return float(jnp.max(jnp.abs(got - want)) / (1.0 + jnp.max(jnp.abs(want))))
