"""Q-Diffusion at its authors' settings: the activation-step pass minimises BRECQ's Lp loss
with p = 2.4 under Adam at 4e-4 (cosine-decayed), checked step by step against a numpy LSQ +
Adam; the weight pass keeps p = 2; the settings reach the CLI, the run's records and the old
runs' resume; and ``--method qdiffusion`` searches the clipping ranges before it reconstructs."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.cli import main
from mixdq_jax.cli.recon_args import add_recon_args, recon_config
from mixdq_jax.quant import Observe, QuantSpec, intercept
from mixdq_jax.reconstruction import ReconConfig, reconstruct
from mixdq_jax.reconstruction.loop import lp_loss
from mixdq_jax.rundir import RunDir


class OneLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="fc")(x)


def _setup(w_bits, a_bits, n=16, d=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(n, d))
    x = x.astype(np.float32)
    model = OneLayer()
    params = model.init(jax.random.key(1), x)["params"]
    with intercept(Observe(), QuantSpec().to_qconfig(["fc"])) as rec:
        model.apply({"params": params}, x)
    ranges = {k: np.asarray(v) for k, v in rec.data.items()}
    qconfig = QuantSpec(weight_bits=w_bits, act_bits=a_bits).to_qconfig(["fc"], ranges)
    apply = lambda p, b, **kw: model.apply({"params": p}, b["x"], **kw)  # noqa: E731
    return x, params, ranges["fc"][0], qconfig, apply


def test_lp_loss_is_brecqs():
    rng = np.random.default_rng(0)
    out, target = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
    for p in (2.0, 2.4):
        want = np.mean(np.sum(np.abs(out.astype(np.float64) - target) ** p, axis=-1))
        assert float(lp_loss(jnp.asarray(out), jnp.asarray(target), p)) == pytest.approx(
            want, rel=1e-5
        )


def np_lsq_adam(x, w, b, lo, hi, bits, *, p, lr, steps):
    """The activation pass in numpy: LSQ (zero point held, straight-through rounding, step
    gradient scaled by 1/sqrt(N L)) on the Lp loss, Adam with a cosine-decayed rate. Returns
    the final ``(lo, hi)``."""
    levels = 2**bits - 1
    s = max((hi - lo) / levels, 1e-8)
    z = np.round(-lo / s)
    factor = 1.0 / np.sqrt(x.shape[1] * levels)
    target = x @ w + b
    m = v = 0.0
    for t in range(steps):
        u = x / s + z
        q = np.clip(np.round(x / s) + z, 0, levels)
        xq = (q - z) * s
        d = xq @ w + b - target
        g_out = p * np.abs(d) ** (p - 1) * np.sign(d) / x.shape[0]
        g_x = g_out @ w.T
        inside = (u > 0) & (u < levels)
        dxq_ds = np.where(inside, np.round(x / s) - x / s, q - z)
        g = factor * np.sum(g_x * dxq_ds)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
        rate = lr * 0.5 * (1 + np.cos(np.pi * t / steps))
        s = s - rate * m_hat / (np.sqrt(v_hat) + 1e-8)
    return np.array([-z * s, (levels - z) * s])


def test_the_activation_pass_runs_lsq_on_the_lp_loss_at_its_rate():
    x, params, (lo, hi), qconfig, apply = _setup(16, 3)
    w = np.asarray(params["fc"]["kernel"], np.float64)
    b = np.asarray(params["fc"]["bias"], np.float64)
    got = {}
    for p, lr in ((2.4, 0.3), (2.0, 0.3), (2.4, 0.1)):  # large rates: 20 steps move far
        config = ReconConfig(iters=0, act_iters=20, batch_size=16, act_lr=lr, p=p)
        res = reconstruct(apply, params, qconfig, {"x": x}, config=config, progress=False)
        got[p, lr] = res.act_ranges["fc"][0]
        want = np_lsq_adam(x.astype(np.float64), w, b, float(lo), float(hi), 3, p=p, lr=lr,
                           steps=20)  # fmt: skip
        np.testing.assert_allclose(got[p, lr], want, rtol=2e-5, err_msg=f"p {p}, lr {lr}")
    # the settings move the result far more than the tolerance
    for other in ((2.0, 0.3), (2.4, 0.1)):
        assert np.abs(got[2.4, 0.3] - got[other]).max() > 1e-2 * np.abs(got[other]).max()


def test_the_weight_pass_keeps_p_2():
    x, params, _, qconfig, apply = _setup(3, 16)
    configs = [ReconConfig(iters=30, act_iters=0, batch_size=8, lr=1e-2, p=p) for p in (2.4, 5.0)]
    results = [reconstruct(apply, params, qconfig, {"x": x}, config=c, progress=False)
               for c in configs]  # fmt: skip
    a, b = (np.asarray(r.params["fc"]["kernel"]) for r in results)
    assert a.tobytes() == b.tobytes()
    assert results[0].mse == results[1].mse


def test_defaults_settings_and_old_runs(tmp_path):
    config = ReconConfig()
    assert (config.act_lr, config.p) == (4e-4, 2.4)
    assert config.settings()["p"] == 2.4
    assert "p" not in ReconConfig(p=2.0).settings()  # what runs before `p` recorded
    with pytest.raises(ValueError, match="p 0.5 outside"):
        ReconConfig(p=0.5)
    x, params, _, qconfig, apply = _setup(4, 8)
    old = ReconConfig(iters=1, act_iters=1, batch_size=8, act_lr=4e-5, p=2.0)
    run = RunDir(tmp_path / "run")
    reconstruct(apply, params, qconfig, {"x": x}, config=old, run=run, progress=False)
    recorded = json.loads((run.reconstruction_dir("reconstruct") / "settings.json").read_text())
    assert recorded["act_lr"] == 4e-5 and "p" not in recorded  # an old run's record
    new = replace(old, act_lr=4e-4, p=2.4)
    with pytest.raises(ValueError, match=r"act_lr, p\).*--recon-act-lr 4e-5 --recon-p 2"):
        reconstruct(apply, params, qconfig, {"x": x}, config=new, run=run, progress=False)
    reconstruct(apply, params, qconfig, {"x": x}, config=old, run=run, progress=False)


def _parser():
    p = argparse.ArgumentParser(prog="mixdq quantize")
    add_recon_args(p)
    p.add_argument("--seed", type=int, default=0)
    return p


def test_cli_flags_reach_the_config_and_are_range_checked(capsys):
    config = recon_config(_parser().parse_args(["--recon-act-lr", "1e-3", "--recon-p", "3"]))
    assert (config.act_lr, config.p) == (1e-3, 3.0)
    assert recon_config(_parser().parse_args([])) == ReconConfig()  # the same defaults
    for bad, why in ((["--recon-p", "0.5"], "the Lp exponent is in [1, 10]"),
                     (["--recon-act-lr", "0"], "must be > 0")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            _parser().parse_args(bad)
        assert exit_.value.code == 2
        assert why in capsys.readouterr().err


# ------------------------------------------------------------------ the method end to end


def test_qdiffusion_searches_ranges_then_reconstructs_from_them(tmp_path):
    """`mixdq quantize --method qdiffusion` up to the reconstruct stage on a tiny SDXL: the
    weight ratios are numpy's argmin, the learned block starts its activation steps from the
    searched ranges, and the settings name the search and the activation pass."""
    from mixdq_jax.api import load_pipeline
    from mixdq_jax.deploy.packed import node_at
    from mixdq_jax.methods import RECONSTRUCTION_METHODS, BlockReconstruction, RangeSearch
    from tests.reconstruction.test_recipe import BLOCK, PROMPTS, SMALL_UNET
    from tests.tiny_models import build_sdxl

    method = RECONSTRUCTION_METHODS["qdiffusion"]
    assert [type(r) for r in method.refiners] == [RangeSearch, BlockReconstruction]
    pipe_dir = build_sdxl(tmp_path / "pipe", unet_overrides=SMALL_UNET)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run = tmp_path / "run"
    code = main(["quantize", "--model", str(pipe_dir), "--prompts", str(tmp_path / "prompts.txt"),
                 "--num-calib", "2", "--num-select", "1", "--batch-size", "2",
                 "--recon-batch", "2", "--recon-blocks", BLOCK, "--run", str(run),
                 "--method", "qdiffusion", "--target", "W4A8", "--recon-iters", "2",
                 "--recon-act-iters", "1", "--stop-after", "reconstruct"])  # fmt: skip
    assert code == 0
    key = run / "quantize" / "W4A8_qdiffusion"
    recorded = json.loads((key / "settings.json").read_text())["method"]
    assert recorded["range_search"] == {"weights": True, "acts": True, "candidates": 80,
                                        "step": 0.01, "p": 2.4}  # fmt: skip
    recon = json.loads((key / "reconstruct" / "settings.json").read_text())
    assert (recon["act_lr"], recon["p"]) == (4e-4, 2.4)

    weights = dict(np.load(key / "range_search" / "weights.npz"))
    w_bits = json.loads((key / "weight_bits.json").read_text())
    assert set(weights) == {n for n, b in w_bits.items() if b < 16}
    ratios = 1.0 - 0.01 * np.arange(80)
    unet = load_pipeline(pipe_dir).params["unet"]
    shortcut = "up_blocks.0.resnets.0.conv_shortcut"  # split: [upsampled, skip] parts
    for name in ("conv_in", shortcut):
        kernel = np.asarray(node_at(unet, name)["kernel"], np.float64)
        parts = [(0, kernel.shape[-2])] if name == "conv_in" else [(0, 32), (32, 64)]
        assert weights[name].shape == (len(parts), kernel.shape[-1])
        for j, (a, b) in enumerate(parts):
            w = kernel[..., a:b, :].reshape(-1, kernel.shape[-1])
            lo, hi = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
            errors = []
            for r in ratios:  # numpy's own asymmetric 4-bit quantizer on r * [lo, hi]
                scale = (r * hi - r * lo) / 15
                zero = np.round(-r * lo / scale)
                q = (np.clip(np.round(w / scale) + zero, 0, 15) - zero) * scale
                errors.append(np.mean(np.abs(w - q) ** 2.4, axis=0))
            np.testing.assert_array_equal(weights[name][j], np.argmin(np.stack(errors), axis=0))
    assert any((i > 0).any() for i in weights.values())

    acts = dict(np.load(key / "range_search" / "acts.npz"))
    calibrated = RunDir(run).act_ranges()
    learned = RunDir(run).reconstructed_unit("W4A8_qdiffusion", 0)
    layers = [k[len("range/") :] for k in learned if k.startswith("range/")]
    assert layers and all(n.startswith(BLOCK) for n in layers)
    for name in layers:  # one step of Adam at 4e-4 from the searched range: lr g/(|g| + eps)
        (lo, hi), (lo_l, hi_l) = acts[f"range/{name}"][0], learned[f"range/{name}"][0]
        step, moved = (hi - lo) / 255, (hi_l - lo_l) / 255
        assert 2e-4 < abs(moved - step) < 4e-4 * (1 + 1e-4), (name, step, moved)
        assert np.round(-lo / step) == np.round(-lo_l / moved)  # the zero point is held
    clipped = [n for n in layers if (acts[f"index/{n}"] > 0).any()]
    assert clipped, "a learned layer whose searched range is narrower than min/max"
    assert not np.allclose(acts[f"range/{clipped[0]}"], calibrated[clipped[0]], rtol=1e-3)
