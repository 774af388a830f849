"""EDA-DM (Liu et al. 2024) against hand computations: TDAC's density and variety scores and
its split of the samples over the steps (numpy loops over the paper's formulas), the
fine-grained block loss (numpy), the default loss left as Q-Diffusion's, an EDA-DM
reconstruction of a tiny block beating nearest rounding; the ``edadm`` method records the
authors' released MS-COCO settings and hands them (or ``edadm-testbed``'s) to the loop, and
TDAC takes the first ``calib_samples`` prompts."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.methods import METHODS, RECONSTRUCTION_METHODS, BlockReconstruction, get_method
from mixdq_jax.reconstruction import ReconConfig, find_units, reconstruct
from mixdq_jax.reconstruction.blocks import unit_inputs
from mixdq_jax.reconstruction.calib_select import (
    CalibSelect,
    assign,
    density,
    select,
    step_counts,
    step_weights,
    variety,
)
from mixdq_jax.reconstruction.loop import _nearest_v, _unit_run, fbr_layers
from mixdq_jax.reconstruction.mode import Rounding
from mixdq_jax.reconstruction.samples import sample_positions
from tests.reconstruction.test_reconstruct import (
    BLOCKS,
    TwoBlocks,
    _apply,
    _data,
    _np_block,
    _setup,
    np_quant,
)


# ------------------------------------------------------------------------------ TDAC
def _features(seed=0):
    """[steps 5, rows 2, 3, 3, channels 4]: three close steps, two far ones."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(2, 3, 3, 4))
    near = [base + 0.1 * rng.normal(size=base.shape) for _ in range(3)]
    far = [rng.normal(size=base.shape) * s for s in (1.0, 2.0)]
    return np.stack(near + far)


def np_scores(f, radius, lam):
    """The paper's scores with explicit loops: D_t counts the other steps within ``radius``
    (feature MSE), V_t sums 1 - cos over channels (averaged over rows and positions) to the
    other steps; both min-max normalised, w = D + lam V."""
    steps = f.shape[0]
    d, v = np.zeros(steps), np.zeros(steps)
    for i in range(steps):
        for j in range(steps):
            if i == j:
                continue
            if np.mean((f[i] - f[j]) ** 2) <= radius:
                d[i] += 1
            dist = []
            for r in range(f.shape[1]):
                for y in range(f.shape[2]):
                    for x in range(f.shape[3]):
                        a, b = f[i, r, y, x], f[j, r, y, x]
                        dist.append(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            v[i] += np.mean(dist)

    def norm(s):
        return (s - s.min()) / (s.max() - s.min())

    return d, v, norm(d) + lam * norm(v)


def test_density_and_variety_scores_match_the_formulas():
    f = _features()
    d, v, w = np_scores(f, radius=0.05, lam=1.5)
    np.testing.assert_array_equal(density(f, 0.05), d)
    assert d.tolist() == [2, 2, 2, 0, 0]  # the three close steps see each other
    np.testing.assert_allclose(variety(f), v, rtol=1e-10)
    np.testing.assert_allclose(step_weights(f, radius=0.05, lam=1.5), w, rtol=1e-10)
    # channels first gives the same variety
    np.testing.assert_allclose(variety(np.moveaxis(f, -1, 2), channel_axis=2), v, rtol=1e-10)


def test_counts_sum_to_n_with_the_rounding_given_back():
    # 10/3 each rounds to 3: the missing one goes to the (first) step with the most
    assert step_counts(np.array([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]
    # 1.5 rounds to 2 twice: the extra one comes off the last step
    assert step_counts(np.array([1.0, 1.0]), 3).tolist() == [2, 1]
    assert step_counts(np.array([0.0, 3.0, 1.0]), 8).tolist() == [0, 6, 2]
    assert step_counts(np.zeros(4), 8).tolist() == [2, 2, 2, 2]  # no information: even


def _grid(steps, trajectories):
    """`samples.sample_positions`'s layout: per step, every trajectory."""
    return np.repeat(np.arange(steps), trajectories), np.tile(np.arange(trajectories), steps)


def test_selection_keeps_one_sample_per_trajectory_spread_by_the_scores():
    f = _features(1)  # 5 steps, features of 2 trajectories
    step_of, traj_of = _grid(5, 12)
    asked = []

    def features(idx):
        asked.append(np.asarray(idx))
        steps, rows = step_of[idx], traj_of[idx]
        return f[steps, rows]

    config = CalibSelect(radius=0.05, lam=1.5, rows=2, seed=3)
    keep = select(step_of, traj_of, features, config)
    # the first two trajectories at every step were scored
    assert sorted(zip(step_of[asked[0]], traj_of[asked[0]], strict=True)) == [
        (s, r) for s in range(5) for r in range(2)
    ]
    want = step_counts(np_scores(f, 0.05, 1.5)[2], 12)
    assert np.bincount(step_of[keep], minlength=5).tolist() == want.tolist()
    assert sorted(traj_of[keep].tolist()) == list(range(12))  # each trajectory once
    assert np.array_equal(keep, np.sort(keep))
    np.testing.assert_array_equal(keep, assign(step_of, traj_of, want, 3))  # seeded


def test_positions_follow_the_unet_samples_layout():
    """`unet_samples` runs batch by batch, step by step, row by row."""
    batches = [
        SimpleNamespace(inputs=np.zeros((2, 3, 1))),
        SimpleNamespace(inputs=np.zeros((2, 2, 1))),
    ]
    step_of, traj_of = sample_positions(SimpleNamespace(batches=batches))
    assert step_of.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert traj_of.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 3, 4]


def test_one_step_keeps_every_sample_without_features():
    step_of, traj_of = _grid(1, 7)

    def never(idx):
        raise AssertionError("one step needs no features")

    np.testing.assert_array_equal(select(step_of, traj_of, never), np.arange(7))


# ------------------------------------------------------------------------------ FBR
def _block_setup():
    x = _data(16, 8, seed=5)
    model = TwoBlocks()
    names = ["resnets.0.fc1", "resnets.0.fc2", "resnets.1.fc1", "resnets.1.fc2"]
    params, _, qconfig = _setup(model, x, names, 3, 16)  # weights only: activations float
    unit = find_units(names, BLOCKS)[0]
    return model, x, params, qconfig, unit


def _loss_at_nearest(model, x, params, qconfig, unit, config):
    """The unit's training loss with the rounding at nearest (hard), no regulariser."""
    v = {
        n: _nearest_v(params["resnets.0"][n.split(".")[-1]]["kernel"], 3, "int", None)
        for n in unit.layers
    }
    state = Rounding(qconfig=qconfig, soft=jnp.float32(0.0))
    ref = _np_block(x, params, "resnets.0", lambda w: w, lambda n, a: a)
    run = _unit_run(_apply(model), unit, config)
    # the block's inputs, captured as the reconstruction does (float: the first block's is x)
    run.call, arrays = unit_inputs(_apply(model), params, {"x": jnp.asarray(x)}, unit.name, 16)
    inputs = [jnp.asarray(a) for a in arrays]
    total, rec = run._loss({"v": v, "a_step": {}}, state, params, inputs, jnp.asarray(ref), 2.0,
                           0.0, params, inputs)  # fmt: skip
    return float(total), float(rec), ref


def np_lp(a, b):
    return np.mean(np.sum((a - b) ** 2, axis=-1))


def test_the_fine_grained_loss_adds_the_inner_layers_errors():
    model, x, params, qconfig, unit = _block_setup()
    assert fbr_layers(unit) == ("resnets.0.fc1",)  # the last layer is the block's own
    config = ReconConfig(iters=1, act_iters=0, batch_size=16, layer_loss_weight=0.7)
    total, rec, ref = _loss_at_nearest(model, x, params, qconfig, unit, config)
    p = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in params["resnets.0"].items()}
    got = _np_block(x, params, "resnets.0", lambda w: np_quant(w, 3), lambda n, a: a)
    fc1_q = x @ np_quant(p["fc1"]["kernel"], 3) + p["fc1"]["bias"]
    fc1_f = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    np.testing.assert_allclose(rec, np_lp(got, ref), rtol=1e-5)
    np.testing.assert_allclose(total, np_lp(got, ref) + 0.7 * np_lp(fc1_q, fc1_f), rtol=1e-5)


def test_the_default_loss_is_q_diffusions():
    model, x, params, qconfig, unit = _block_setup()
    config = ReconConfig(iters=1, act_iters=0, batch_size=16)
    total, rec, ref = _loss_at_nearest(model, x, params, qconfig, unit, config)
    got = _np_block(x, params, "resnets.0", lambda w: np_quant(w, 3), lambda n, a: a)
    assert total == rec
    np.testing.assert_allclose(rec, np_lp(got, ref), rtol=1e-5)
    # runs started before the option existed keep their settings
    assert "layer_loss_weight" not in ReconConfig().settings()
    assert ReconConfig(layer_loss_weight=0.5).settings()["layer_loss_weight"] == 0.5
    with pytest.raises(ValueError, match="layer_loss_weight"):
        ReconConfig(layer_loss_weight=-1.0)


def test_an_edadm_reconstruction_beats_nearest_rounding():
    x = _data(64, 8, seed=3)
    model = TwoBlocks()
    names = ["resnets.0.fc1", "resnets.0.fc2", "resnets.1.fc1", "resnets.1.fc2"]
    params, _, qconfig = _setup(model, x, names, 3, 8)
    config = ReconConfig(iters=200, act_iters=40, batch_size=32, lr=1e-2, layer_loss_weight=0.5)
    res = reconstruct(_apply(model), params, qconfig, {"x": x}, config=config,
                      units=find_units(names, BLOCKS), progress=False)  # fmt: skip
    for unit, (nearest, learned) in res.mse.items():
        assert learned < 0.8 * nearest, (unit, nearest, learned)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           params, res.params)  # fmt: skip
    assert any(jax.tree.leaves(changed))


# the authors' released MS-COCO / Stable Diffusion run, BienLuky/EDA-DM scripts/for_coco.sh:
# W4A8 "--calib_num_samples 256 --batch_samples 8 --lamda 5.0 --recon --lr_w 3e-2 --lr_a 1e-4
# --add_loss 0.8", W8A8 the same with "--lr_w 5e-4"
RELEASED = {"calib_samples": 256, "tdac_lambda": 5.0, "weight_lr": 3e-2, "weight_lr_w8": 5e-4,
            "act_lr": 1e-4, "layer_loss_weight": 0.8}  # fmt: skip
EDADM_KEYS = {"calib_select", "layer_loss_weight", "tdac_lambda", "calib_samples", "weight_lr",
              "weight_lr_w8", "act_lr", "label"}  # fmt: skip


def test_the_edadm_row_records_the_released_settings():
    m = RECONSTRUCTION_METHODS["edadm"]
    assert (m.allocator.name, m.bos_aware) == ("uniform", False)
    settings = m.settings()
    assert settings["calib_select"] is True
    assert {k: settings[k] for k in RELEASED} == RELEASED
    assert "released" in settings["label"]
    testbed = get_method("edadm-testbed").settings()
    assert (testbed["layer_loss_weight"], testbed["tdac_lambda"]) == (0.5, 50.0)
    assert "testbed" in testbed["label"]
    assert {"calib_samples", "weight_lr", "weight_lr_w8", "act_lr"}.isdisjoint(testbed)
    assert CalibSelect().lam == 5.0  # TDAC's default is the released run's too
    # the other rows' settings keep their keys
    for other in (*METHODS.values(), RECONSTRUCTION_METHODS["qdiffusion"]):
        assert EDADM_KEYS.isdisjoint(other.settings())
    with pytest.raises(ValueError, match="set calib_select=True"):
        BlockReconstruction(calib_samples=4)


def _bits(w_bits):
    return SimpleNamespace(bits=lambda: (w_bits, {}))


@pytest.mark.parametrize(
    ("method", "w_bits", "want"),
    [
        ("edadm", {"a": 4, "b": 8, "c": 16}, (3e-2, 1e-4, 0.8)),  # W4A8's rate
        ("edadm", {"a": 8, "b": 8, "c": 16}, (5e-4, 1e-4, 0.8)),  # W8A8's rate
        ("edadm-testbed", {"a": 4}, (5e-3, 4e-5, 0.5)),  # the run's rates
    ],
)
def test_the_settings_reach_the_loop(monkeypatch, tmp_path, method, w_bits, want):
    """The `ReconConfig` the reconstruction loop receives from each EDA-DM method."""
    import mixdq_jax.methods.reconstruction as mr  # noqa: PLC0415

    got = {}

    def fake_reconstruct(apply, params, qconfig, data, *, config, **kwargs):
        got["config"], got["data"] = config, data
        return SimpleNamespace(params=params, qconfig=qconfig, act_ranges={})

    monkeypatch.setattr(mr, "reconstruct", fake_reconstruct)
    monkeypatch.setattr(mr, "unet_apply", lambda unet: None)
    monkeypatch.setattr(mr, "unet_samples", lambda pipe, calib: {"x": np.arange(8)})
    monkeypatch.setattr(mr, "tdac_samples", lambda pipe, calib, data, **kw: (data, [8]))
    run_config = ReconConfig(iters=3, lr=5e-3, act_lr=4e-5, seed=1)
    pipe = SimpleNamespace(unet=None, params={"unet": None})
    ctx = SimpleNamespace(pipe=pipe, calibration=None, recon=run_config,
                          run=SimpleNamespace(recipe_dir=lambda key: tmp_path), key="k",
                          progress=False, log=lambda message: None)  # fmt: skip
    model = SimpleNamespace(params={}, qconfig=_bits(w_bits), act_ranges={},
                            replace=lambda **kw: kw)  # fmt: skip
    refiner = get_method(method).refiners[-1]  # the reconstruction (after any range search)
    refiner.refine(model, ctx)
    config = got["config"]
    assert (config.lr, config.act_lr, config.layer_loss_weight) == want
    # the released run's single pass uses p = 2 (sample_txt2img.py); the testbed the run's
    assert config.p == (2.0 if method == "edadm" else run_config.p)
    assert (config.iters, config.seed) == (3, 1)  # the rest is the run's
    assert config.settings()["lr"] == want[0]  # what reconstruct/settings.json records


def _calib(prompts_per_batch, steps, cfg=False):
    """Batches as `sample_positions` and `prompt_of_trajectory` read them."""
    return SimpleNamespace(steps=steps, batches=[
        SimpleNamespace(latents=np.zeros((b, 1)), inputs=np.zeros((steps, 2 * b if cfg else b)))
        for b in prompts_per_batch
    ])  # fmt: skip


def test_tdac_takes_the_first_prompts_of_the_calibration(monkeypatch):
    """``calib_samples``: the first that many prompts, one sample per trajectory; on several
    steps spread by the scores (of the first trajectories); too few prompts is an error."""
    import mixdq_jax.methods.reconstruction as mr  # noqa: PLC0415

    calib = _calib((3, 4), steps=5)  # 7 trajectories
    step_of, traj_of = sample_positions(calib)
    f = _features(2)  # [5 steps, 2 rows, ...]
    monkeypatch.setattr(mr, "unet_apply", lambda unet: None)
    monkeypatch.setattr(mr, "feature_fn", lambda apply, params, data: (
        lambda idx: f[step_of[idx], traj_of[idx]]))  # fmt: skip
    monkeypatch.setattr(mr, "CalibSelect", lambda seed, lam=5.0: CalibSelect(
        seed=seed, lam=lam, radius=0.05, rows=2))  # fmt: skip
    pipe = SimpleNamespace(unet=None, params={"unet": None})
    data = {"i": np.arange(step_of.size)}
    kept, per_step = mr.tdac_samples(pipe, calib, data, seed=3, lam=1.5, samples=5)
    keep = kept["i"]
    assert sorted(traj_of[keep].tolist()) == [0, 1, 2, 3, 4]  # the first 5 prompts, once each
    assert per_step == step_counts(np_scores(f, 0.05, 1.5)[2], 5).tolist()
    with pytest.raises(ValueError, match=r"takes 8 calibration prompts.*has 7.*--num-calib 8"):
        mr.tdac_samples(pipe, calib, data, samples=8)
    # one step with guidance: both rows of each of the first 3 prompts, nothing scored
    calib = _calib((2, 2), steps=1, cfg=True)  # rows: [n0 n1 p0 p1] [n2 n3 p2 p3]
    kept, per_step = mr.tdac_samples(pipe, calib, {"i": np.arange(8)}, samples=3)
    assert kept["i"].tolist() == [0, 1, 2, 3, 4, 6] and per_step == [6]
