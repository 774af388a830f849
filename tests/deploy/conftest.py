"""Shared fixtures: a tiny SDXL pipeline, activation ranges, and a capture of layer inputs."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.api import load_pipeline, qconfig_for
from mixdq_jax.quant import Observe, QuantSpec, forward, update_ranges
from tests.tiny_models import SMALL_UNET, build_sdxl

PROMPTS = ["a red circle", "a blue square on a green background", "two yellow triangles"]
SIZE = 32  # image side; latents are 16x16


@pytest.fixture(scope="package")
def pipe_dir(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("deploy") / "pipe", unet_overrides=SMALL_UNET)


@pytest.fixture(scope="package")
def pipe(pipe_dir):
    return load_pipeline(pipe_dir)


def unet_inputs(pipe, prompts, seed=0):
    context, pooled = pipe.prompt_embeddings(list(prompts), None, 0.0)
    cond = pipe.conditioning(context, pooled, 0.0, SIZE, SIZE)
    x = jax.random.normal(jax.random.key(seed), (len(prompts), 4, SIZE // 2, SIZE // 2))
    return x, jnp.float32(999.0), cond


@pytest.fixture(scope="package")
def ranges(pipe):
    """Activation ranges observed on two UNet inputs (a small stand-in for calibration)."""
    qconfig = qconfig_for(pipe, QuantSpec())

    @jax.jit
    def observe(params, x, t, cond):
        return forward(pipe.unet, params, qconfig, x, t, cond, mode=Observe())[1]

    running = None
    for seed, t in ((0, 999.0), (1, 500.0)):
        x, _, cond = unet_inputs(pipe, PROMPTS, seed)
        stats = observe(pipe.params["unet"], x, jnp.float32(t), cond)
        running = update_ranges(running, stats)
    return {k: np.asarray(v) for k, v in running.items()}


def denoised(pipe, base, prompts, seed, qconfig=None):
    """One-step latents of ``pipe``'s UNet (under ``qconfig``) for ``prompts``, from ``base``'s
    text encoding, so two pipelines that differ only in their UNet are compared on the same
    inputs."""
    context, pooled = base.prompt_embeddings(list(prompts), None, 0.0)
    latents = jax.random.normal(jax.random.key(seed), (len(prompts), 4, SIZE // 2, SIZE // 2))
    return pipe.denoise(
        latents, context, pooled, num_inference_steps=1, guidance_scale=0.0, height=SIZE,
        width=SIZE, noise_key=jax.random.key(seed + 1), qconfig=qconfig,
    )  # fmt: skip


def capture_layer_io(pipe, params, x, t, cond, names, *, inner=None):
    """``{layer: (module, input, output)}`` of the named Dense/Conv calls of one jitted UNet
    forward, in the order the forward calls them. ``inner()``: a context (e.g. fake quant)
    entered inside the capture, so the outputs are that context's."""
    modules = {}

    @jax.jit
    def run(params, x, t, cond):
        seen = {}

        def capture(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            module = context.module
            if context.method_name == "__call__" and isinstance(module, nn.Dense | nn.Conv):
                name = ".".join(module.path)
                if name in names and name not in seen:
                    seen[name] = (args[0], out)
                    modules[name] = module
            return out

        with nn.intercept_methods(capture), inner() if inner else contextlib.nullcontext():
            pipe.unet.apply(
                {"params": params}, x, t, cond["context"], added_cond_kwargs=cond["added"]
            )
        return seen

    arrays = run(params, x, t, cond)  # a dict pytree: keys come back sorted
    return {name: (modules[name], *arrays[name]) for name in modules}  # tracing order
