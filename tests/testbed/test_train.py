"""Training code: a few optimizer steps reduce the loss; checkpoints round-trip and resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixdq_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs
from mixdq_jax.testbed import model, train

TINY_UNET = {
    **model.UNET_CONFIG,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [2, 2],
    "norm_num_groups": 4,
    "cross_attention_dim": 16,
    "projection_class_embeddings_input_dim": 8 + 6 * model.TIME_EMBED_DIM,
    "sample_size": 8,
}


def _tiny_text(hidden, cls):
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=hidden, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, projection_dim=8,
                         max_position_embeddings=16, bos_token_id=48, eos_token_id=49)
    return cls(config=cfg)


def _tiny_trainer():
    unet = UNet2DConditionModel(config=UNetConfig.from_dict(TINY_UNET))
    encoders = (_tiny_text(8, CLIPTextModel), _tiny_text(8, CLIPTextModelWithProjection))
    sched_ac = np.linspace(0.99, 0.01, 1000).astype(np.float32)
    trainer = train.UNetTrainer(unet=unet, encoders=encoders, alphas_cumprod=sched_ac,
                                focus=np.array([499, 999]), opt=optax.adam(3e-3))  # fmt: skip
    k = jax.random.split(jax.random.key(0), 4)
    ids = jax.random.randint(k[0], (4, 16), 0, 48)
    params = {
        "unet": unet.init(k[1], **example_inputs(unet.config))["params"],
        "text_encoder": encoders[0].init(k[2], ids)["params"],
        "text_encoder_2": encoders[1].init(k[3], ids)["params"],
    }
    return trainer, params, ids


def test_unet_steps_reduce_loss():
    trainer, params, ids = _tiny_trainer()
    x0 = jax.random.normal(jax.random.key(5), (4, 4, 8, 8))
    key = jax.random.key(6)  # the same noise every step: the loss must fall
    step = jax.jit(trainer.step)
    ema, opt_state = params, trainer.opt.init(params)
    losses = []  # each step reports the loss before its update
    for _ in range(10):
        params, ema, opt_state, loss = step(params, ema, opt_state, x0, ids, ids, key, 0.9)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    # the EMA moved towards the trained weights
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), ema, params))
    assert max(float(m) for m in moved) > 0


def test_checkpoint_round_trip_and_resume(tmp_path):
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": (jnp.int32(7), jnp.ones(2, jnp.bfloat16))}
    path = tmp_path / "c.safetensors"
    train.save_checkpoint(path, 12, tree)
    step, back = train.load_checkpoint(path, jax.tree.map(jnp.zeros_like, tree))
    assert step == 12
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(back), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))

    calls = []

    def step_fn(i, state):
        calls.append(i)
        return state + 1.0, float(i)

    kw = dict(name="t", path=tmp_path / "run.safetensors", every=2, progress=False)
    # a run "killed" after 4 of 10 steps, then resumed
    state = train._run_steps(steps=4, state=jnp.float32(0), step_fn=step_fn, **kw)
    state = train._run_steps(steps=10, state=jnp.float32(0), step_fn=step_fn, **kw)
    assert float(state) == 10.0 and calls == list(range(10))


def test_focus_timesteps_are_the_sampler_timesteps():
    # diffusers: SDXL-turbo's Euler-A trailing at 1 step samples at 999, LCM at 4 steps at
    # 999, 759, 499, 259
    np.testing.assert_array_equal(train.focus_timesteps(), [259, 499, 759, 999])


def test_weighted_loss_is_a_weighted_mean_of_the_squared_error():
    trainer, params, ids = _tiny_trainer()
    x0 = jax.random.normal(jax.random.key(5), (4, 4, 8, 8))
    key = jax.random.key(6)
    plain = float(trainer.loss(params, x0, ids, ids, key))
    # a constant weight changes nothing; weight on one half only is the mean over that half
    assert np.isclose(float(trainer.loss(params, x0, ids, ids, key, jnp.full((4, 1, 8, 8), 3.0))),
                      plain, rtol=1e-6)  # fmt: skip
    left = jnp.zeros((4, 1, 8, 8)).at[..., :4].set(1.0)
    right = 1.0 - left
    l_left = float(trainer.loss(params, x0, ids, ids, key, left))
    l_right = float(trainer.loss(params, x0, ids, ids, key, right))
    assert np.isclose((l_left + l_right) / 2, plain, rtol=1e-5)
    assert not np.isclose(l_left, l_right)


def test_latent_object_mask_covers_the_objects_patches():
    from mixdq_jax.testbed import data

    scenes = data.sample_scenes(6, seed=4, split="train")
    mask = train.latent_object_mask(scenes)
    images = data.render(scenes)
    f = data.SIZE // model.LATENT_SIZE
    for b in range(len(scenes)):
        bg = data.BACKGROUND_RGB[scenes.background[b]]
        obj = np.abs(images[b] - bg).sum(-1) > 0.02
        ys, xs = np.nonzero(obj)
        expect = np.zeros((model.LATENT_SIZE,) * 2, bool)
        for y, x in zip(ys // f, xs // f, strict=True):  # the pixel's latent cell and its ring
            expect[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = True
        np.testing.assert_array_equal(mask[b], expect)
        assert 0 < expect.mean() < 0.5
