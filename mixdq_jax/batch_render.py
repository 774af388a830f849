"""Many candidate configurations rendered in one compiled program (the recipe's selection).

The candidate pick scores hundreds of configurations on the same held-out prompts. A pipeline
call per configuration encodes the prompts again, dispatches its own program and syncs the
host after every stage; on an accelerator that leaves the device mostly idle. Here the prompts
are encoded once and a chunk of configurations (their leaves stacked: bit-widths are data)
runs through one program, compiled once per pick:

- ``"vmap"`` (the default on accelerators): the chunk is one batch. Only the leaves that differ
  between the pick's candidates carry the configuration axis (an activation pick shares every
  kernel), and each layer's ``w_active`` hint keeps float layers on their shared kernel.
- ``"map"`` (the default on a CPU): ``lax.map`` over the chunk, each configuration the same
  computation as a pipeline call. On this project's 2-core CPU vmap measured slower: batched
  keep-float choices become selects that compute both sides.

Images match the pipeline call's up to XLA's rounding at another batch shape (a rounding flip
at 8-bit activations can grow through the network); ``tests/test_batch_render.py`` bounds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.compile_events import first_call
from mixdq_jax.pipeline import NonFiniteError, Pipeline, check_finite, seed_keys
from mixdq_jax.quant.qconfig import QConfig, mark_active_weights

PARALLEL = ("vmap", "map")


def default_parallel() -> str:
    """``"map"`` on a CPU, ``"vmap"`` elsewhere (see the module's docstring)."""
    return "map" if jax.default_backend() == "cpu" else "vmap"


@dataclass(frozen=True, kw_only=True)
class RenderSettings:
    """What every candidate is rendered with: prompt batch ``b`` (``batch_size`` prompts)
    draws its latents and step noise from seed ``seed + b``, as `Recipe.render` does."""

    prompts: tuple[str, ...]
    steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int
    batch_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise ValueError("RenderSettings: at least one prompt is needed")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("RenderSettings: steps and batch_size must be >= 1")


class BatchRenderer:
    """Renders stacked candidates of one pipeline with `RenderSettings`.

    `render` takes every configuration of a pick and yields their images chunk by chunk, so a
    caller can write scores as they come. Compiled programs are kept per (structure, batched
    leaves, chunk): the chunks of one pick share one compile, and under ``"map"`` the weight
    and activation picks share it too.
    """

    def __init__(
        self, pipe: Pipeline, settings: RenderSettings, *, parallel: str | None = None
    ) -> None:
        self.pipe, self.settings = pipe, settings
        self.parallel = default_parallel() if parallel is None else parallel
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        s = settings
        self.plan = jax.tree.map(jnp.asarray, pipe.scheduler.set_timesteps(s.steps))
        self.cfg = pipe.uses_cfg(s.guidance_scale)
        factor = pipe.vae_scale_factor
        self._batches = []
        for b, start in enumerate(range(0, len(s.prompts), s.batch_size)):
            prompts = list(s.prompts[start : start + s.batch_size])
            context, pooled = pipe.prompt_embeddings(prompts, None, s.guidance_scale)
            check_finite(context, "text encoder", "the prompt embeddings")
            key_latents, key_noise = seed_keys(s.seed + b)
            shape = (len(prompts), pipe.unet.config.in_channels, s.height // factor,
                     s.width // factor)  # fmt: skip
            latents = jax.random.normal(key_latents, shape, jnp.float32)
            cond = pipe.conditioning(context, pooled, s.guidance_scale, s.height, s.width)
            self._batches.append((latents, cond, key_noise))
        self.programs: dict[tuple, Any] = {}

    def render(
        self, qconfigs: Sequence[QConfig], *, chunk: int
    ) -> Iterator[tuple[range, np.ndarray]]:
        """``(indices, images)`` per chunk of ``qconfigs``: ``images`` is
        ``[len(indices), N, H, W, 3]`` in [0, 1] for the settings' N prompts. A non-finite
        latent or image is a `NonFiniteError` naming the stage and the configuration."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if not qconfigs:
            return
        qconfigs = list(qconfigs)
        if self.parallel == "vmap":
            qconfigs = _mark_active(qconfigs)
        flat = [jax.tree.flatten(q) for q in qconfigs]
        treedef = flat[0][1]
        for i, (_, td) in enumerate(flat[1:], 1):
            if td != treedef:
                raise ValueError(
                    f"configuration {i} has another structure (layer set, splits, BOS layers "
                    "or formats) than configuration 0: they cannot be rendered together"
                )
        columns = list(zip(*(leaves for leaves, _ in flat), strict=True))
        vary = batched_leaves(columns, self.parallel)
        shared = [np.asarray(c[0]) for c, v in zip(columns, vary, strict=True) if not v]
        key = (treedef, vary, chunk)
        fn = self.programs.get(key)
        if fn is None:
            fn = self.programs[key] = jax.jit(partial(self._program, treedef, vary))
        params = (self.pipe.params["unet"], self.pipe.params["vae"])
        g = jnp.float32(self.settings.guidance_scale)
        for start in range(0, len(qconfigs), chunk):
            idx = range(start, min(start + chunk, len(qconfigs)))
            rows = [*idx] + [idx[-1]] * (chunk - len(idx))  # fixed shape: one compile
            stacked = [
                np.stack([np.asarray(c[i]) for i in rows])
                for c, v in zip(columns, vary, strict=True)
                if v
            ]
            images, finite = [], []
            for latents, cond, noise_key in self._batches:
                args = (params, stacked, shared, latents, cond, g, noise_key)
                with first_call(f"the selection's batched ({self.parallel}) program", fn, *args):
                    out, ok = fn(*args)
                images.append(out)
                finite.append(ok)
            _check(np.asarray(jnp.stack(finite))[:, : len(idx)], start)
            out = np.concatenate([np.asarray(x, np.float32) for x in images], axis=1)
            yield idx, out[: len(idx)]

    def _one(self, params, qconfig, latents, cond, g, key):
        unet, vae = params
        x = self.pipe._denoise(unet, qconfig, self.plan, latents, cond, g, key, None,
                               cfg=self.cfg, mode=None)  # fmt: skip
        images = self.pipe.decode_with(vae, x)
        return images, jnp.stack([jnp.all(jnp.isfinite(x)), jnp.all(jnp.isfinite(images))])

    def _program(self, treedef, vary, params, stacked, shared, latents, cond, g, key):
        def one(varying):
            it_v, it_s = iter(varying), iter(shared)
            leaves = [next(it_v) if v else next(it_s) for v in vary]
            qconfig = jax.tree.unflatten(treedef, leaves)
            return self._one(params, qconfig, latents, cond, g, key)

        if self.parallel == "map":
            return jax.lax.map(one, stacked)
        return jax.vmap(one)(stacked)


def batched_leaves(columns: Sequence[Sequence[Any]], parallel: str) -> tuple[bool, ...]:
    """Which leaves carry the configuration axis (``columns``: each leaf's values over the
    configurations). Under vmap those that differ between configurations, and the first leaf
    when none does (one candidate left, or identical ones: vmap needs a batched argument);
    under lax.map every leaf, exactly as a pipeline call."""
    if parallel == "map":
        return (True,) * len(columns)
    vary = tuple(any(not _same(c[0], x) for x in c[1:]) for c in columns)
    return vary if any(vary) else (True, *vary[1:])


def _same(a: Any, b: Any) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def _mark_active(qconfigs: list[QConfig]) -> list[QConfig]:
    """Every configuration with the same ``w_active`` hints: whether any of them quantizes the
    layer's weights (`mark_active_weights` of the stack), so a layer no candidate quantizes
    keeps its float kernel, shared, behind a real ``lax.cond``."""
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *qconfigs)
    active = {n: lq.w_active for n, lq in mark_active_weights(stacked).layers.items()}
    return [
        replace(q, layers={n: replace(lq, w_active=active[n]) for n, lq in q.layers.items()})
        for q in qconfigs
    ]


def _check(finite: np.ndarray, start: int) -> None:
    """``finite``: ``[prompt batches, chunk, 2]`` (latents, images) flags."""
    for stage, col in (("UNet", 0), ("VAE decoder", 1)):
        bad = np.argwhere(~finite[:, :, col])
        if len(bad):
            b, k = (int(v) for v in bad[0])
            raise NonFiniteError(
                f"the {stage} produced non-finite values (NaN/inf) under candidate "
                f"{start + k}, prompt batch {b}",
                stage=stage,
            )
