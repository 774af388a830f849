"""Train the testbed from scratch in JAX: judge, VAE, latents, UNet + text encoders, export.

Each stage checkpoints to ``work_dir`` atomically every ``checkpoint_every`` steps and on
completion; a rerun resumes where the last run stopped (the data and noise of step ``k`` are a
function of (seed, k), so a resumed run equals an uninterrupted one up to float reordering).

The UNet is trained with the v-prediction objective on SDXL's scaled-linear schedule, with
three choices aimed at few-step sampling of small objects:

- half of each batch sits on the timesteps the 1-step Euler-A (trailing) and 4-step LCM
  samplers visit, a quarter on t = 999 alone, where both samplers start;
- v (almost -x0 at t = 999) is predicted, so a 1-step sample is the network's direct image
  estimate (an epsilon model trained as briefly reached a content score of only 0.32 at 1
  step: its epsilon error is multiplied by sigma ~ 14.6 in a 1-step sample);
- the squared error is weighted up on the latent pixels that hold an object (objects and
  their edges cover ~20% of the latent; unweighted, 3000 steps drew every shape as the same
  blob: shape accuracy 0.29).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixdq_jax.io_utils import atomic_open, atomic_write_json
from mixdq_jax.schedulers import make_scheduler
from mixdq_jax.testbed import data, judge, model, vocab
from mixdq_jax.tokenizer import CLIPTokenizer
from weights_convert import flax_to_torch
from weights_convert.safetensors_io import (
    load_safetensors,
    read_safetensors_header,
    save_safetensors,
)

ASSETS = Path(__file__).parent / "assets"
DEFAULT_OUT = ASSETS / "testbed"
STAGES = ("judge", "vae", "latents", "unet", "export")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines the trained testbed (sizes are in ``model``)."""

    seed: int = 0
    judge_steps: int = 800
    judge_batch: int = 32
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_crop: int = 64  # crops are cheaper but shift GroupNorm and attention statistics
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 20.0
    num_images: int = 12000
    unet_steps: int = 10000
    unet_batch: int = 16
    unet_lr: float = 1e-3
    unet_object_weight: float = 10.0
    ema_decay: float = 0.995
    checkpoint_every: int = 200


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, step: int, tree: Any) -> None:
    """Leaves of ``tree`` in order, with the step in the metadata (written atomically)."""
    leaves = jax.device_get(jax.tree.leaves(tree))
    tensors = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    save_safetensors(path, tensors, metadata={"step": str(step)})


def load_checkpoint(path: Path, like: Any) -> tuple[int, Any] | None:
    """(step, tree shaped as ``like``) or None when no checkpoint exists."""
    if not path.is_file():
        return None
    _, meta, _ = read_safetensors_header(path)
    flat = load_safetensors(path, mmap=False)
    leaves, treedef = jax.tree.flatten(like)
    if len(flat) != len(leaves):
        raise ValueError(f"{path}: checkpoint holds {len(flat)} arrays, expected {len(leaves)}")
    # reshape: 0-d arrays come back 1-d from the safetensors writer (np.ascontiguousarray)
    new = [jnp.asarray(flat[f"{i:05d}"], dtype=jnp.asarray(x).dtype).reshape(np.shape(x))
           for i, x in enumerate(leaves)]  # fmt: skip
    return int(meta["step"]), jax.tree.unflatten(treedef, new)


def _run_steps(
    *,
    name: str,
    path: Path,
    steps: int,
    every: int,
    state: Any,
    step_fn: Callable[[int, Any], tuple[Any, float]],
    progress: bool,
) -> Any:
    """Drive ``state = step_fn(step, state)`` with resume, checkpoints and a progress bar."""
    start = 0
    restored = load_checkpoint(path, state)
    if restored is not None:
        start, state = restored
    bar = None
    if progress and start < steps:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True)
    for step in range(start, steps):
        state, loss = step_fn(step, state)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % every == 0 or step + 1 == steps:
            save_checkpoint(path, step + 1, state)
    if bar is not None:
        bar.close()
    return state


def _step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step])


def _adam(lr: float, steps: int) -> optax.GradientTransformation:
    warmup = min(100, max(steps // 10, 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


# ------------------------------------------------------------------------------ judge
def train_judge_stage(cfg: TrainConfig, work: Path, progress: bool) -> dict:
    params = judge.init_params(cfg.seed)
    opt = optax.adamw(optax.cosine_onecycle_schedule(cfg.judge_steps, 2e-3, pct_start=0.1))
    step = jax.jit(partial(judge.train_step, opt))

    def step_fn(i, state):
        params, opt_state = state
        rng = _step_rng(cfg.seed, 0, i)
        scenes = data.sample_scenes(cfg.judge_batch, seed=int(rng.integers(2**31)),
                                    split=data.SPLITS[i % 3])  # fmt: skip
        images = judge.augment(data.render(scenes), rng)
        labels = {k: jnp.asarray(v) for k, v in scenes.cell_labels().items()}
        params, opt_state, loss = step(params, opt_state, jnp.asarray(images), labels)
        return (params, opt_state), float(loss)

    params, _ = _run_steps(
        name="judge", path=work / "judge.ckpt.safetensors", steps=cfg.judge_steps,
        every=cfg.checkpoint_every, state=(params, opt.init(params)), step_fn=step_fn,
        progress=progress,
    )  # fmt: skip
    return params


# ------------------------------------------------------------------------------ VAE
def _to_model(images: np.ndarray) -> jnp.ndarray:
    """[B, H, W, 3] in [0, 1] -> NCHW in [-1, 1]."""
    return jnp.asarray(np.transpose(images, (0, 3, 1, 2)) * 2.0 - 1.0)


def vae_loss(vae, params, x, weight, key, kl_weight):
    """L1 + L2 reconstruction weighted per pixel, plus a small KL to N(0, 1)."""
    mean, logvar = vae.apply({"params": params}, x, method="encode")
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = vae.apply({"params": params}, z, method="decode")
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    err = rec - x
    rec_loss = jnp.sum(weight * (jnp.abs(err) + err**2)) / (jnp.sum(weight) * x.shape[1])
    return rec_loss + kl_weight * kl


def object_pixels(scenes: data.Scenes, images: np.ndarray) -> np.ndarray:
    """bool [B, H, W]: pixels of ``images`` (renders of ``scenes``) not of the background."""
    bg = data.BACKGROUND_RGB[scenes.background][:, None, None, :]
    return np.abs(images - bg).sum(-1) > 0.02


def object_weight(scenes: data.Scenes, images: np.ndarray, boost: float) -> np.ndarray:
    """[B, 1, H, W] loss weights: 1 on the background, ``1 + boost`` on object pixels.

    Objects cover a few percent of the pixels; unweighted, a small VAE learns the background
    and blurs the objects' colours (measured: judge content 0.78 on its reconstructions)."""
    return (1.0 + boost * object_pixels(scenes, images))[:, None].astype(np.float32)


def train_vae_stage(cfg: TrainConfig, work: Path, progress: bool) -> dict:
    vae = model.build_vae()
    c = cfg.vae_crop
    params = vae.init(jax.random.key(cfg.seed), jnp.zeros((1, 3, c, c)))["params"]
    opt = _adam(cfg.vae_lr, cfg.vae_steps)

    @jax.jit
    def step(params, opt_state, x, weight, key):
        loss, grads = jax.value_and_grad(partial(vae_loss, vae))(
            params, x, weight, key, cfg.vae_kl_weight
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def step_fn(i, state):
        params, opt_state = state
        rng = _step_rng(cfg.seed, 1, i)
        # All splits: the VAE is an image codec that never sees captions (as SD's VAE was
        # trained apart from the diffusion model); held-out combinations are the UNet's test.
        scenes = data.sample_scenes(cfg.vae_batch, seed=int(rng.integers(2**31)),
                                    split=data.SPLITS[i % 3])  # fmt: skip
        images = data.render(scenes)
        weight = object_weight(scenes, images, cfg.vae_object_weight)
        oy, ox = rng.integers(0, data.SIZE - c + 1, 2)
        x = _to_model(images[:, oy:oy + c, ox:ox + c])
        weight = jnp.asarray(weight[:, :, oy:oy + c, ox:ox + c])
        params, opt_state, loss = step(params, opt_state, x, weight, jax.random.key(i))
        return (params, opt_state), float(loss)

    params, _ = _run_steps(
        name="vae", path=work / "vae.ckpt.safetensors", steps=cfg.vae_steps,
        every=cfg.checkpoint_every, state=(params, opt.init(params)), step_fn=step_fn,
        progress=progress,
    )  # fmt: skip
    return params


# ------------------------------------------------------------------------------ latents
def training_set(cfg: TrainConfig) -> data.Scenes:
    return data.sample_scenes(cfg.num_images, seed=cfg.seed + 1, split="train")


def encode_latents(cfg: TrainConfig, vae_params: Mapping, work: Path) -> tuple[np.ndarray, float]:
    """Latent means of the training images (cached in ``work``) and the VAE scaling factor
    (1 / their standard deviation, as SD's 0.18215 was chosen)."""
    path = work / "latents.npy"
    if path.is_file():
        latents = np.load(path)
    else:
        vae = model.build_vae()
        encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode")[0])
        scenes = training_set(cfg)
        parts = []
        for i in range(0, len(scenes), 500):
            images = data.render(scenes[i:i + 500])
            parts.append(np.asarray(encode(vae_params, _to_model(images))))
        latents = np.concatenate(parts).astype(np.float32)
        with atomic_open(path) as f:
            np.save(f, latents)
    return latents, float(1.0 / latents.std())


def latent_object_mask(scenes: data.Scenes) -> np.ndarray:
    """bool [B, 16, 16]: latent pixels whose 4x4 image patch, or a neighbour's, shows an object
    (the VAE's receptive field carries an object's edge one latent pixel further)."""
    from scipy import ndimage  # noqa: PLC0415

    n, f = model.LATENT_SIZE, data.SIZE // model.LATENT_SIZE
    on = object_pixels(scenes, data.render(scenes))  # [B, 64, 64]
    patch = on.reshape(len(scenes), n, f, n, f).any(axis=(2, 4))
    return ndimage.binary_dilation(patch, structure=np.ones((1, 3, 3), bool))


# ------------------------------------------------------------------------------ UNet
def focus_timesteps() -> np.ndarray:
    """The timesteps the shipped samplers visit: Euler-A trailing at 1 step, LCM at 4 steps."""
    euler = make_scheduler(model.SCHEDULER_CONFIG).set_timesteps(1).timesteps
    lcm = make_scheduler({**model.SCHEDULER_CONFIG, "_class_name": "LCMScheduler"})
    steps = np.concatenate([np.asarray(euler), np.asarray(lcm.set_timesteps(4).timesteps)])
    return np.unique(np.round(steps).astype(np.int32))


def encode_text(encoders, params, ids1, ids2):
    """SDXL conditioning: penultimate states of both encoders concatenated; pooled from #2."""
    out1 = encoders[0].apply({"params": params["text_encoder"]}, ids1)
    out2 = encoders[1].apply({"params": params["text_encoder_2"]}, ids2)
    context = jnp.concatenate([out1.hidden_states[-2], out2.hidden_states[-2]], axis=-1)
    return context, out2.text_embeds


@dataclass(frozen=True)
class UNetTrainer:
    """The UNet + text-encoder objective and update, as pure functions."""

    unet: Any
    encoders: tuple
    alphas_cumprod: np.ndarray
    focus: np.ndarray
    opt: optax.GradientTransformation = field(repr=False)

    def loss(self, params, x0, ids1, ids2, key, weight=None):
        """Weighted MSE on v; ``weight`` [B, 1, H, W] (None: uniform).

        Rows ``i % 4 == 0`` sit at the last focus timestep (999: where 1-step and LCM sampling
        start), ``i % 4 == 1`` at a random focus timestep, the rest uniform over all."""
        b = x0.shape[0]
        context, pooled = encode_text(self.encoders, params, ids1, ids2)
        k_t, k_f, k_n = jax.random.split(key, 3)
        uniform = jax.random.randint(k_t, (b,), 0, len(self.alphas_cumprod))
        focus = jnp.asarray(self.focus)[jax.random.randint(k_f, (b,), 0, len(self.focus))]
        slot = jnp.arange(b) % 4
        t = jnp.where(slot == 0, int(self.focus[-1]), jnp.where(slot == 1, focus, uniform))
        ab = jnp.asarray(self.alphas_cumprod)[t]
        noise = jax.random.normal(k_n, x0.shape)
        xt = jnp.sqrt(ab)[:, None, None, None] * x0 + jnp.sqrt(1 - ab)[:, None, None, None] * noise
        time_ids = jnp.broadcast_to(jnp.asarray(model.TIME_IDS, jnp.float32), (b, 6))
        pred = self.unet.apply(
            {"params": params["unet"]}, xt, t.astype(jnp.float32), context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        )  # fmt: skip
        # v-prediction target: at the 1-step sampler's timestep (alpha_bar ~ 0.005) v is
        # almost -x0, so the network predicts the image directly instead of an epsilon whose
        # error a 1-step sample multiplies by sigma ~ 14.6.
        sa, sb = jnp.sqrt(ab)[:, None, None, None], jnp.sqrt(1 - ab)[:, None, None, None]
        target = sa * noise - sb * x0
        err = (pred - target) ** 2
        if weight is None:
            return jnp.mean(err)
        weight = jnp.broadcast_to(weight, err.shape)
        return jnp.sum(weight * err) / jnp.sum(weight)

    def step(self, params, ema, opt_state, x0, ids1, ids2, key, decay, weight=None):
        loss, grads = jax.value_and_grad(self.loss)(params, x0, ids1, ids2, key, weight)
        updates, opt_state = self.opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, ema, opt_state, loss


def init_unet_params(cfg: TrainConfig, text_configs) -> dict:
    from mixdq_jax.models.unet import example_inputs  # noqa: PLC0415

    unet = model.build_unet()
    encoders = model.build_text_encoders(text_configs)
    k = jax.random.split(jax.random.key(cfg.seed + 2), 3)
    ids = jnp.zeros((1, 77), jnp.int32)
    return {
        "unet": jax.jit(unet.init)(k[0], **example_inputs(unet.config))["params"],
        "text_encoder": encoders[0].init(k[1], ids)["params"],
        "text_encoder_2": encoders[1].init(k[2], ids)["params"],
    }


def make_trainer(cfg: TrainConfig, text_configs) -> UNetTrainer:
    sched = make_scheduler(model.SCHEDULER_CONFIG)
    return UNetTrainer(
        unet=model.build_unet(), encoders=model.build_text_encoders(text_configs),
        alphas_cumprod=np.asarray(sched.alphas_cumprod(), np.float32), focus=focus_timesteps(),
        opt=_adam(cfg.unet_lr, cfg.unet_steps),
    )  # fmt: skip


def tokenize_captions(out: Path, captions) -> tuple[np.ndarray, np.ndarray]:
    toks = [CLIPTokenizer.from_pretrained(out / n) for n in ("tokenizer", "tokenizer_2")]
    return toks[0](list(captions)), toks[1](list(captions))


def train_unet_stage(
    cfg: TrainConfig, work: Path, out: Path, text_configs, latents: np.ndarray, progress: bool
) -> dict:
    trainer = make_trainer(cfg, text_configs)
    scenes = training_set(cfg)
    ids1, ids2 = tokenize_captions(out, scenes.captions)
    weights = (1.0 + cfg.unet_object_weight * latent_object_mask(scenes)[:, None]).astype(
        np.float32
    )
    params = init_unet_params(cfg, text_configs)
    state = (params, params, trainer.opt.init(params))
    step = jax.jit(trainer.step)

    def step_fn(i, state):
        params, ema, opt_state = state
        rng = _step_rng(cfg.seed, 3, i)
        idx = rng.choice(len(latents), cfg.unet_batch, replace=False)
        decay = min(cfg.ema_decay, (1 + i) / (10 + i))
        params, ema, opt_state, loss = step(
            params, ema, opt_state, jnp.asarray(latents[idx]), jnp.asarray(ids1[idx]),
            jnp.asarray(ids2[idx]), jax.random.key(int(rng.integers(2**31))), decay,
            jnp.asarray(weights[idx]),
        )  # fmt: skip
        return (params, ema, opt_state), float(loss)

    _, ema, _ = _run_steps(
        name="unet", path=work / "unet.ckpt.safetensors", steps=cfg.unet_steps,
        every=cfg.checkpoint_every, state=state, step_fn=step_fn, progress=progress,
    )  # fmt: skip
    return ema


# ------------------------------------------------------------------------------ export
def _clip_state(params: Mapping) -> dict[str, np.ndarray]:
    """transformers CLIP key names, in the classic layout (``text_model.`` prefix) that every
    transformers version loads."""
    return {
        (k if k.startswith("text_projection") else f"text_model.{k}"): v
        for k, v in flax_to_torch(params).items()
    }


def export_pipeline(
    out: Path, *, unet: Mapping, vae: Mapping, text: tuple[Mapping, Mapping], text_configs,
    scaling_factor: float,
) -> Path:
    """Write the diffusers folder (tokenizers are already there)."""
    version = {"_diffusers_version": "0.42.1"}
    atomic_write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionXLPipeline", **version,
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })  # fmt: skip
    atomic_write_json(out / "unet" / "config.json", {**model.UNET_CONFIG, **version})
    save_safetensors(out / "unet" / "diffusion_pytorch_model.safetensors", flax_to_torch(unet))
    vae_cfg = {**model.VAE_CONFIG, **version, "scaling_factor": scaling_factor}
    atomic_write_json(out / "vae" / "config.json", vae_cfg)
    save_safetensors(out / "vae" / "diffusion_pytorch_model.safetensors", flax_to_torch(vae))
    for name, cfg, params in zip(("text_encoder", "text_encoder_2"), text_configs, text,
                                 strict=True):  # fmt: skip
        atomic_write_json(out / name / "config.json", {**cfg, "dtype": "float32"})
        save_safetensors(out / name / "model.safetensors", _clip_state(params))
    atomic_write_json(out / "scheduler" / "scheduler_config.json",
                      {**model.SCHEDULER_CONFIG, **version})  # fmt: skip
    return out


def write_tokenizers(out: Path) -> tuple[dict, dict]:
    """Both tokenizers and the text-encoder configs matching their vocabulary."""
    configs = []
    for i, (name, pad) in enumerate((("tokenizer", vocab.EOS), ("tokenizer_2", "!"))):
        info = vocab.write_tokenizer(out / name, pad_token=pad)
        configs.append(model.text_config(i, info["vocab_size"], bos=info["bos"],
                                         eos=info["eos"], pad=info["pad"]))  # fmt: skip
    return configs[0], configs[1]


# ------------------------------------------------------------------------------ driver
def train(
    cfg: TrainConfig = TrainConfig(),  # noqa: B008
    *,
    work_dir: str | os.PathLike,
    out: str | os.PathLike = DEFAULT_OUT,
    judge_path: str | os.PathLike = judge.JUDGE_PATH,
    stages: tuple[str, ...] = STAGES,
    progress: bool = True,
) -> Path:
    """Run the requested stages (later stages load what earlier ones checkpointed)."""
    work, out = Path(work_dir), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {STAGES}")
    cfg_path = work / "train_config.json"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != asdict(cfg):
        raise ValueError(f"{work} holds a run with a different config; use a fresh work dir")
    atomic_write_json(cfg_path, asdict(cfg))
    text_configs = write_tokenizers(out)

    if "judge" in stages:
        judge.save_judge(train_judge_stage(cfg, work, progress), judge_path)
    vae_params = None
    if {"vae", "latents", "unet", "export"} & set(stages):
        vae_params = train_vae_stage(cfg, work, progress)
    if not {"latents", "unet", "export"} & set(stages):
        return out
    latents, scale = encode_latents(cfg, vae_params, work)
    if not {"unet", "export"} & set(stages):
        return out
    ema = train_unet_stage(cfg, work, out, text_configs, latents * scale, progress)
    if "export" in stages:
        export_pipeline(
            out, unet=ema["unet"], vae=vae_params,
            text=(ema["text_encoder"], ema["text_encoder_2"]), text_configs=text_configs,
            scaling_factor=scale,
        )  # fmt: skip
    return out
