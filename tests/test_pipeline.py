"""Whole-pipeline parity with diffusers' PyTorch pipelines on tiny random checkpoints."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import diffusers
import jax
import numpy as np
import pytest
import torch

from mixdq_jax.api import load_pipeline
from mixdq_jax.pipeline import seed_keys
from tests.tiny_models import build_sd15, build_sdxl
from weights_convert.checkpoint import CheckpointError
from weights_convert.convert import ConversionError
from weights_convert.safetensors_io import load_safetensors, save_safetensors

PROMPTS = ["a red circle on a blue background", "a small green square, 4k!"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe", legacy_tokenizer_files=False)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    return load_pipeline(sdxl_dir)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return build_sd15(tmp_path_factory.mktemp("sd15") / "pipe")


def _latents(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _patch_step_noise(monkeypatch, module, seed, shape):
    """Feed diffusers' scheduler the same per-step noise our pipeline draws for ``seed``."""
    _, key = seed_keys(seed)
    calls = {"i": 0}

    def fake_randn(shape_, generator=None, device=None, dtype=None, layout=None):
        noise = jax.random.normal(jax.random.fold_in(key, calls["i"]), tuple(shape_))
        calls["i"] += 1
        return torch.from_numpy(np.asarray(noise)).to(dtype or torch.float32)

    monkeypatch.setattr(module, "randn_tensor", fake_randn)
    return calls


def _reference(folder, cls, scheduler_cls=None, **kwargs):
    pipe = cls.from_pretrained(folder)
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(output_type="np", **kwargs).images


@pytest.mark.parametrize("height, width", [(32, 32), (32, 48)])
def test_sdxl_turbo_one_step_matches_diffusers(sdxl_dir, sdxl_pipe, height, width):
    latents = _latents((2, 4, height // 2, width // 2))
    ours = sdxl_pipe(
        PROMPTS,
        num_inference_steps=1,
        guidance_scale=0.0,
        height=height,
        width=width,
        latents=latents,
    )
    ref = _reference(
        sdxl_dir,
        diffusers.StableDiffusionXLPipeline,
        prompt=PROMPTS,
        num_inference_steps=1,
        guidance_scale=0.0,
        height=height,
        width=width,
        latents=torch.from_numpy(latents),
    )
    assert ours.shape == ref.shape == (2, height, width, 3)
    assert np.abs(ours - ref).max() <= ATOL
    assert ours.std() > 0.01  # not a constant image


def test_sdxl_multistep_ancestral_with_cfg_matches_diffusers(sdxl_dir, sdxl_pipe, monkeypatch):
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea

    latents = _latents((1, 4, 16, 16), seed=1)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, height=32, width=32)
    ours = sdxl_pipe(PROMPTS[:1], negative_prompt="blurry", latents=latents, seed=7, **kw)
    calls = _patch_step_noise(monkeypatch, ea, 7, latents.shape)
    ref = _reference(
        sdxl_dir,
        diffusers.StableDiffusionXLPipeline,
        prompt=PROMPTS[:1],
        negative_prompt="blurry",
        latents=torch.from_numpy(latents),
        **kw,
    )
    assert calls["i"] == 3
    assert np.abs(ours - ref).max() <= ATOL


def test_sdxl_cfg_zero_negative_matches_diffusers(sdxl_dir, sdxl_pipe):
    latents = _latents((2, 4, 16, 16), seed=2)
    kw = dict(num_inference_steps=1, guidance_scale=3.0, height=32, width=32)
    ours = sdxl_pipe(PROMPTS, latents=latents, **kw)
    ref = _reference(
        sdxl_dir,
        diffusers.StableDiffusionXLPipeline,
        prompt=PROMPTS,
        latents=torch.from_numpy(latents),
        **kw,
    )
    assert np.abs(ours - ref).max() <= ATOL


def test_sd15_lcm_four_steps_matches_diffusers(sd15_dir, monkeypatch):
    from diffusers.schedulers import scheduling_lcm

    latents = _latents((2, 4, 16, 16), seed=3)
    kw = dict(num_inference_steps=4, guidance_scale=1.0, height=32, width=32)
    ours = load_pipeline(sd15_dir, scheduler="LCMScheduler")(PROMPTS, latents=latents, seed=5, **kw)
    calls = _patch_step_noise(monkeypatch, scheduling_lcm, 5, latents.shape)
    ref = _reference(
        sd15_dir,
        diffusers.StableDiffusionPipeline,
        diffusers.LCMScheduler,
        prompt=PROMPTS,
        latents=torch.from_numpy(latents),
        **kw,
    )
    assert calls["i"] == 3  # LCM re-noises between steps, not after the last
    assert np.abs(ours - ref).max() <= ATOL


def _corrected(pipe, model):
    """``pipe`` running its float UNet with PTQD's ``model`` in the sampling loop."""
    from mixdq_jax.pipeline import QuantizedPipeline  # noqa: PLC0415
    from mixdq_jax.quant.quantized import QuantizedUNet  # noqa: PLC0415

    return QuantizedPipeline(pipe, QuantizedUNet(params=pipe.params["unet"], correction=model))


def _ptqd_model(plan, channels, std):
    """A PTQD noise model for ``plan`` (our side; the diffusers side reads the same numbers)."""
    from mixdq_jax.schedulers.noise_correction import NoiseModel  # noqa: PLC0415

    n = plan.num_inference_steps
    rng = np.random.default_rng(11)
    return NoiseModel(timesteps=np.asarray(plan.timesteps, np.float64),
                      k=rng.uniform(-0.1, 0.1, n), bias=rng.normal(size=(n, channels)) * 0.05,
                      std=np.asarray(std, np.float64))  # fmt: skip


def _ptqd_in_diffusers(monkeypatch, ref, module, seed, model, coeff, noise_std):
    """PTQD as its paper describes it, on a diffusers pipeline: the UNet's output of step ``i``
    becomes ``(eps - mu_i) / (1 + k_i)`` and the step's fresh noise is scaled so that its
    variance plus the carried residual ``coeff_i^2 std_i^2 / (1 + k_i)^2`` is the scheduler's
    ``noise_std_i^2`` (none when the residual alone exceeds it)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput  # noqa: PLC0415

    carried = (coeff * model.std / (1 + model.k)) ** 2
    factor = [np.sqrt(max(b * b - c, 0.0)) / b if b > 0 else 1.0
              for b, c in zip(noise_std, carried, strict=True)]  # fmt: skip
    calls = {"unet": 0, "noise": 0}
    forward = ref.unet.forward

    def corrected(*args, **kwargs):
        out = forward(*args, **kwargs)
        i = calls["unet"]
        calls["unet"] += 1
        eps = out[0] if isinstance(out, tuple) else out.sample
        bias = torch.tensor(model.bias[i], dtype=eps.dtype).view(1, -1, 1, 1)
        eps = (eps - bias) / float(1 + model.k[i])
        return (eps,) if isinstance(out, tuple) else UNet2DConditionOutput(sample=eps)

    _, key = seed_keys(seed)

    def fake_randn(shape_, generator=None, device=None, dtype=None, layout=None):
        i = calls["noise"]
        calls["noise"] += 1
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, i), tuple(shape_)))
        return torch.from_numpy(noise * np.float32(factor[i])).to(dtype or torch.float32)

    monkeypatch.setattr(ref.unet, "forward", corrected)
    monkeypatch.setattr(module, "randn_tensor", fake_randn)
    return calls, factor


def test_ptqds_correction_in_the_loop_matches_diffusers_with_ptqd(
    sdxl_dir, sdxl_pipe, sd15_dir, monkeypatch
):
    """Euler ancestral with CFG (SDXL) and LCM (SD1.5): our loop with a noise model equals
    diffusers' pipeline with PTQD's correction applied to its UNet output and step noise, the
    per-step factors computed here from diffusers' own scheduler values."""
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea  # noqa: PLC0415
    from diffusers.schedulers import scheduling_lcm  # noqa: PLC0415

    latents = _latents((1, 4, 16, 16), seed=1)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, height=32, width=32)
    model = _ptqd_model(sdxl_pipe.scheduler.set_timesteps(3), 4, [0.1, 1.0, 0.2])
    ours = _corrected(sdxl_pipe, model)(PROMPTS[:1], latents=latents, seed=7, **kw)
    plain = sdxl_pipe(PROMPTS[:1], latents=latents, seed=7, **kw)
    ref_pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler.set_timesteps(3)
    sig = ref_pipe.scheduler.sigmas.double().numpy()
    up = np.sqrt(sig[1:] ** 2 * (sig[:-1] ** 2 - sig[1:] ** 2) / sig[:-1] ** 2)
    down = np.sqrt(sig[1:] ** 2 - up**2)
    calls, factor = _ptqd_in_diffusers(monkeypatch, ref_pipe, ea, 7, model, down - sig[:-1], up)
    assert 0 < factor[0] < 1 and factor[1] == 0  # partly and wholly absorbed
    with torch.no_grad():
        ref = ref_pipe(prompt=PROMPTS[:1], latents=torch.from_numpy(latents), output_type="np",
                       **kw).images  # fmt: skip
    assert calls == {"unet": 3, "noise": 3}
    assert np.abs(ours - ref).max() <= ATOL
    assert np.abs(ours - plain).max() > 100 * ATOL  # the correction does change the images

    lcm = load_pipeline(sd15_dir, scheduler="LCMScheduler")
    latents = _latents((2, 4, 16, 16), seed=3)
    kw = dict(num_inference_steps=4, guidance_scale=1.0, height=32, width=32)
    model = _ptqd_model(lcm.scheduler.set_timesteps(4), 4, [0.2, 0.2, 0.2, 0.05])
    ours = _corrected(lcm, model)(PROMPTS, latents=latents, seed=5, **kw)
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd15_dir)
    ref_pipe.scheduler = diffusers.LCMScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    sched = ref_pipe.scheduler
    sched.set_timesteps(4)
    t = sched.timesteps.numpy()
    a = sched.alphas_cumprod.double().numpy()[t]
    a_prev = np.append(a[1:], 1.0)  # the last step does not re-noise
    c_out = np.asarray([sched.get_scalings_for_boundary_condition_discrete(int(s))[1]
                        for s in t], np.float64)  # fmt: skip
    coeff = np.where(np.arange(4) < 3, np.sqrt(a_prev), 1.0) * c_out * -np.sqrt((1 - a) / a)
    noise_std = np.where(np.arange(4) < 3, np.sqrt(1 - a_prev), 0.0)
    calls, factor = _ptqd_in_diffusers(monkeypatch, ref_pipe, scheduling_lcm, 5, model, coeff,
                                       noise_std)  # fmt: skip
    assert 0 < min(factor[:3]) < 1
    with torch.no_grad():
        ref = ref_pipe(prompt=PROMPTS, latents=torch.from_numpy(latents), output_type="np",
                       **kw).images  # fmt: skip
    assert calls == {"unet": 4, "noise": 3}
    assert np.abs(ours - ref).max() <= ATOL
    with pytest.raises(ValueError, match=r"fitted for 4 sampling step\(s\)"):
        _corrected(lcm, model)(PROMPTS, latents=latents, num_inference_steps=2,
                                    guidance_scale=1.0, height=32, width=32)  # fmt: skip


def test_sd15_euler_cfg_with_negative_prompt_matches_diffusers(sd15_dir):
    latents = _latents((2, 4, 16, 24), seed=4)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, height=32, width=48)
    ours = load_pipeline(sd15_dir, scheduler="EulerDiscreteScheduler")(
        PROMPTS, negative_prompt=["ugly", "blurry"], latents=latents, **kw
    )
    ref = _reference(
        sd15_dir,
        diffusers.StableDiffusionPipeline,
        diffusers.EulerDiscreteScheduler,
        prompt=PROMPTS,
        negative_prompt=["ugly", "blurry"],
        latents=torch.from_numpy(latents),
        **kw,
    )
    assert np.abs(ours - ref).max() <= ATOL


def test_pil_output_and_seed_determinism(sdxl_dir, sdxl_pipe):
    pipe = sdxl_pipe
    a = pipe("a cat", height=32, width=32, seed=3)
    b = pipe("a cat", height=32, width=32, seed=3)
    c = pipe("a cat", height=32, width=32, seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    (img,) = pipe("a cat", height=32, width=32, seed=3, output_type="pil")
    assert img.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(img), (a[0] * 255).round().astype(np.uint8))


def test_long_prompt_is_truncated_with_warning(sdxl_dir, sdxl_pipe):
    pipe = sdxl_pipe
    with pytest.warns(UserWarning, match="truncated"):
        pipe(" ".join(["red circle"] * 60), height=32, width=32)


# ------------------------------------------------------------------------ bad input
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)


def test_missing_tensor_names_key_and_file(sdxl_dir, tmp_path):
    folder = _copy(sdxl_dir, tmp_path / "p")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = dict(load_safetensors(path, mmap=False))
    del state["conv_in.weight"]
    save_safetensors(path, state)
    with pytest.raises(ConversionError, match=r"missing.*diffusion_pytorch_model.*conv_in\.weight"):
        load_pipeline(folder)


def test_wrong_shape_names_key(sdxl_dir, tmp_path):
    folder = _copy(sdxl_dir, tmp_path / "p")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = dict(load_safetensors(path, mmap=False))
    state["decoder.conv_out.bias"] = np.zeros(5, np.float32)
    save_safetensors(path, state)
    with pytest.raises(ConversionError, match=r"'decoder\.conv_out\.bias'.*shape \(5,\)"):
        load_pipeline(folder)


def test_truncated_weights(sdxl_dir, tmp_path):
    folder = _copy(sdxl_dir, tmp_path / "p")
    path = folder / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        load_pipeline(folder)


def test_unknown_scheduler_class(sdxl_dir, tmp_path):
    folder = _copy(sdxl_dir, tmp_path / "p")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "HeunDiscreteScheduler"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="HeunDiscreteScheduler"):
        load_pipeline(folder)


def test_default_size_is_the_models_native_size_as_in_diffusers(sdxl_dir, sdxl_pipe):
    """Without height/width, diffusers draws at ``unet.sample_size * vae_scale_factor``."""
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    size = ref.unet.config.sample_size * ref.vae_scale_factor
    ours = sdxl_pipe(PROMPTS[:1], num_inference_steps=1, guidance_scale=0.0)
    assert ours.shape == (1, size, size, 3)


def test_text_encoders_leave_memory_once_every_prompt_is_encoded(sdxl_dir):
    """Commands encode every prompt first and drop the text encoders (3.3 GB of SDXL float32)
    before the UNet work: their parameters are freed, and the images are the same."""
    pipe = load_pipeline(sdxl_dir)
    kwargs = dict(num_inference_steps=1, guidance_scale=0.0, height=32, width=32)
    kwargs.update(output_type="latent")  # the same latents: the same images
    want = pipe(PROMPTS, **kwargs)
    embeds = pipe.prompt_embeddings(PROMPTS, None, kwargs["guidance_scale"])
    text = {name: pipe.params[name] for name in ("text_encoder", "text_encoder_2")}
    alive = [weakref.ref(a) for a in jax.tree.leaves(text)]
    del text
    pipe = pipe.without_text_encoders()  # the only reference to the full pipeline
    gc.collect()
    assert alive and not [r for r in alive if r() is not None]
    assert set(pipe.params) == {"unet", "vae"}
    np.testing.assert_array_equal(pipe(PROMPTS, **kwargs, prompt_embeds=embeds), want)
    with pytest.raises(ValueError, match="text encoders were released"):
        pipe(PROMPTS, **kwargs)
    with pytest.raises(ValueError, match="2 rows for 1 prompt"):
        pipe(PROMPTS[:1], **kwargs, prompt_embeds=embeds)
