"""MixDQ on your own Flax model: a tiny vision transformer written here, in Linen and in NNX.

Nothing in it is ours: a Conv patch embedding, two pre-norm blocks (self-attention with
Dense query/key/value/out, a GELU MLP) and a Dense head. The library only needs the model as
``apply(params, *inputs)``; it finds the layers, calibrates their input ranges, sweeps each
layer at 2/4/8 bits (one compiled program for the whole sweep), allocates bits to a budget and
hands back a fake-quantized function and its configuration.

    python examples/own_model.py            # both APIs, about half a minute on a laptop CPU
    python examples/own_model.py --api nnx  # one of them
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from mixdq_jax import any_model
from mixdq_jax.quant import QConfig, QuantSpec


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    image: int = 16
    channels: int = 3
    patch: int = 4
    dim: int = 32
    depth: int = 2
    heads: int = 2
    mlp: int = 64
    classes: int = 10

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Multi-head softmax attention on ``[batch, tokens, dim]`` projections."""
    b, t, d = q.shape

    def split(x):
        return x.reshape(b, t, heads, d // heads)

    logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(d // heads)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), split(v))
    return out.reshape(b, t, d)


# --- Linen --------------------------------------------------------------------------------


class LinenAttention(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(self.dim, name="query")(x)
        k = nn.Dense(self.dim, name="key")(x)
        v = nn.Dense(self.dim, name="value")(x)
        return nn.Dense(self.dim, name="out")(attention(q, k, v, self.heads))


class LinenBlock(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        x = x + LinenAttention(self.cfg.dim, self.cfg.heads, name="attn")(
            nn.LayerNorm(name="norm1")(x)
        )
        h = nn.Dense(self.cfg.mlp, name="fc1")(nn.LayerNorm(name="norm2")(x))
        return x + nn.Dense(self.cfg.dim, name="fc2")(jax.nn.gelu(h))


class LinenViT(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images):
        c = self.cfg
        p = (c.patch, c.patch)
        x = nn.Conv(c.dim, p, strides=p, padding="VALID", name="patch_embed")(images)
        x = x.reshape(x.shape[0], -1, c.dim)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (c.tokens, c.dim))
        for i in range(c.depth):
            x = LinenBlock(c, name=f"blocks_{i}")(x)
        return nn.Dense(c.classes, name="head")(nn.LayerNorm(name="norm")(x).mean(axis=1))


# --- NNX ----------------------------------------------------------------------------------


class NnxAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        return self.out(attention(self.query(x), self.key(x), self.value(x), self.heads))


class NnxBlock(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.attn = NnxAttention(cfg.dim, cfg.heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.fc1 = nnx.Linear(cfg.dim, cfg.mlp, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp, cfg.dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class NnxViT(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        p = (cfg.patch, cfg.patch)
        self.dim = cfg.dim
        self.patch_embed = nnx.Conv(cfg.channels, cfg.dim, p, strides=p, padding="VALID", rngs=rngs)
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.tokens, cfg.dim)))
        self.blocks = nnx.List([NnxBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.head = nnx.Linear(cfg.dim, cfg.classes, rngs=rngs)

    def __call__(self, images):
        x = self.patch_embed(images)
        x = x.reshape(x.shape[0], -1, self.dim) + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))


# --- the same weights in both -------------------------------------------------------------


def nnx_name(linen_name: str) -> str:
    """A Linen module path as the NNX model spells it (``blocks_0`` -> ``blocks.0``)."""
    parts = linen_name.split(".")
    if parts[0].startswith("blocks_"):
        parts[0:1] = ["blocks", parts[0].removeprefix("blocks_")]
    return ".".join(parts)


def nnx_state_from_linen(params: Any, state: nnx.State) -> nnx.State:
    """``state`` (from ``nnx_apply``) holding the Linen ``params``' weights."""
    flat = traverse_util.flatten_dict(params, sep=".")
    pure: dict = {}
    for name, value in flat.items():
        node = pure
        keys = [int(k) if k.isdigit() else k for k in nnx_name(name).split(".")]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    nnx.replace_by_pure_dict(state, pure)
    return state


def renamed(qconfig: QConfig) -> QConfig:
    """A Linen configuration keyed by the NNX layer names."""
    return QConfig(
        layers={nnx_name(n): lq for n, lq in qconfig.layers.items()},
        weight_format=qconfig.weight_format,
        act_format=qconfig.act_format,
    )


KINDS = ("weight", "act")

# --- the recipe ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Run:
    """One API's model, data and result."""

    api: str
    apply: any_model.ApplyFn
    params: Any
    batches: list[tuple[jax.Array]]
    quantized: any_model.Quantized
    sqnr_db: float  # the allocated configuration's output vs float, on a held-out batch
    seconds: float


def uniform(q: any_model.Quantized, weight_bits: int, act_bits: int) -> QConfig:
    """Every layer at the same bits, with the calibrated ranges (a baseline)."""
    spec = QuantSpec(
        weight_bits=weight_bits, act_bits=act_bits, bos_aware=False, shortcut_split=False
    )
    return spec.to_qconfig([layer.name for layer in q.layers], q.ranges)


def output_sqnr(run: Run, qconfig: QConfig, images: jax.Array) -> float:
    ref = jax.jit(run.apply)(run.params, images)
    out = jax.jit(run.quantized.apply)(run.params, qconfig, images)
    return float(any_model.sqnr(ref, out))


def _summary(run: Run, held_out: jax.Array) -> None:
    q = run.quantized
    sens = q.sensitivity
    w_bits, a_bits = q.qconfig.bits()
    print(
        f"\n[{run.api}] {len(q.layers)} layers; sweep: {sens.configurations} configurations, "
        f"{sens.compiles} compiled program; {run.seconds:.1f} s in all"
    )
    print(f"  {'layer':22s} {'kind':6s} {'W':>2s} {'A':>2s}   SQNR dB at 2/4/8 bits: weight | act")
    for layer in q.layers:
        w, a = (" ".join(f"{v:5.1f}" for v in sens.scores[k][layer.name]) for k in KINDS)
        print(
            f"  {layer.name:22s} {layer.kind:6s} {w_bits[layer.name]:2d} "
            f"{a_bits[layer.name]:2d}   {w} | {a}"
        )
    w_avg = sum(w_bits[x.name] * x.weight_params for x in q.layers) / sum(
        x.weight_params for x in q.layers
    )
    a_avg = sum(a_bits[x.name] * x.input_size for x in q.layers) / sum(
        x.input_size for x in q.layers
    )
    print(
        f"  average bits: weights {w_avg:.2f}, activations {a_avg:.2f}; output SQNR vs float: "
        f"{run.sqnr_db:.1f} dB (uniform W8A8 {output_sqnr(run, uniform(q, 8, 8), held_out):.1f},"
        f" W4A8 {output_sqnr(run, uniform(q, 4, 8), held_out):.1f})"
    )


def main(
    *,
    apis: Sequence[str] = ("linen", "nnx"),
    config: ViTConfig = ViTConfig(),  # noqa: B008 - frozen
    batches: int = 4,
    batch_size: int = 8,
    weight_bits: float = 4.5,
    act_bits: float = 8.0,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Run]:
    """Quantize the tiny ViT with each API in ``apis`` (identical weights: the NNX model gets
    the Linen model's) and return what each run produced."""
    key_init, key_data = jax.random.split(jax.random.key(seed))
    shape = (batch_size, config.image, config.image, config.channels)
    data = [(jax.random.normal(k, shape),) for k in jax.random.split(key_data, batches + 1)]
    calib, held_out = data[:batches], data[batches][0]

    linen = LinenViT(config)
    params = jax.jit(linen.init)(key_init, calib[0][0])["params"]
    models: dict[str, tuple[any_model.ApplyFn, Any]] = {
        "linen": (lambda params, *x: linen.apply({"params": params}, *x), params)
    }
    # the NNX model gets the Linen weights: build it abstract (no init work), then fill it
    nnx_model = nnx.eval_shape(lambda: NnxViT(config, rngs=nnx.Rngs(seed)))
    nnx_fn, state = any_model.nnx_apply(nnx_model)
    models["nnx"] = (nnx_fn, nnx_state_from_linen(params, state))

    budget = any_model.Budget(weight_bits=weight_bits, act_bits=act_bits)
    runs = {}
    for api in apis:
        apply, p = models[api]
        start = time.perf_counter()
        q = any_model.quantize(apply, p, calib, budget=budget)
        seconds = time.perf_counter() - start
        run = Run(
            api=api, apply=apply, params=p, batches=calib, quantized=q, sqnr_db=0.0, seconds=seconds
        )
        run = Run(**{**run.__dict__, "sqnr_db": output_sqnr(run, q.qconfig, held_out)})
        runs[api] = run
        if verbose:
            _summary(run, held_out)
    if verbose and {"linen", "nnx"} <= set(runs):
        lq, nq = runs["linen"].quantized, runs["nnx"].quantized
        out_l = jax.jit(lq.apply)(runs["linen"].params, lq.qconfig, held_out)
        out_n = jax.jit(nq.apply)(runs["nnx"].params, renamed(lq.qconfig), held_out)
        same = renamed(lq.qconfig).bits() == nq.qconfig.bits()
        print(
            f"\nLinen and NNX (same weights, Linen's bits): max |output difference| "
            f"{float(jnp.max(jnp.abs(out_l - out_n))):.3g}; same bits chosen: {same}"
        )
    return runs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", choices=("linen", "nnx", "both"), default="both")
    parser.add_argument("--weight-bits", type=float, default=4.5)
    parser.add_argument("--act-bits", type=float, default=8.0)
    args = parser.parse_args()
    main(
        apis=("linen", "nnx") if args.api == "both" else (args.api,),
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
    )
