"""SVDQuant's format against independent references: the group quantizer against a numpy
formula, the low-rank split against numpy's SVD (the residual's energy is the dropped singular
values'), smoothing against the float layer, the fake-quant layer against a numpy statement
of ``Q(x / s) Q(s W - L1 L2) + (x / s) L1 L2``, and one compile for every bit configuration."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.quant import lowrank as lr
from mixdq_jax.quant.intercept import intercept
from mixdq_jax.quant.modes import CollectInputs, FakeQuant
from mixdq_jax.quant.qconfig import QuantSpec, stack_qconfigs
from pallas_kernels import grid


def np_group_quant(x: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Symmetric per-group fake quant along the last axis, zero-padded (float64)."""
    c = x.shape[-1]
    pad = -c % group
    xp = np.concatenate([x, np.zeros((*x.shape[:-1], pad))], axis=-1) if pad else x
    g = xp.reshape(*x.shape[:-1], -1, group).astype(np.float64)
    half = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(g).max(axis=-1, keepdims=True) / half, grid.MIN_SCALE)
    q = np.clip(np.round(g / scale), -half - 1, half)
    return (q * scale).reshape(*x.shape[:-1], -1)[..., :c]


@pytest.mark.parametrize(("channels", "group", "bits"), [(128, 64, 4), (70, 64, 4), (96, 32, 2)])
def test_group_fake_quant_is_the_numpy_formula(channels, group, bits):
    x = np.random.default_rng(0).normal(size=(5, 3, channels)).astype(np.float32)
    x[0, 0, 3] = 40.0  # an outlier moves only its own group's scale
    got = np.asarray(grid.group_fake_quant(jnp.asarray(x), bits, group))
    np.testing.assert_allclose(got, np_group_quant(x, bits, group), rtol=1e-6, atol=1e-6)
    assert np.array_equal(np.asarray(grid.group_fake_quant(jnp.asarray(x), 16, group)), x)


def test_group_kernel_quant_groups_input_channels_per_position():
    k = np.random.default_rng(1).normal(size=(3, 3, 80, 24)).astype(np.float32)
    got = np.asarray(grid.group_fake_quant_kernel(jnp.asarray(k), 4, 64))
    want = np.moveaxis(np_group_quant(np.moveaxis(k, -2, -1), 4, 64), -1, -2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_low_rank_residual_energy_is_the_dropped_singular_values():
    w = np.random.default_rng(2).normal(size=(3, 3, 16, 40)).astype(np.float32)
    down, up = lr.low_rank(jnp.asarray(w), 6)
    assert down.shape == (3, 3, 16, 6) and up.shape == (6, 40)
    sv = np.linalg.svd(w.reshape(-1, 40).astype(np.float64), compute_uv=False)
    resid = w.reshape(-1, 40) - np.asarray(down).reshape(-1, 6) @ np.asarray(up)
    np.testing.assert_allclose(np.sum(resid.astype(np.float64) ** 2), np.sum(sv[6:] ** 2),
                               rtol=1e-4)  # fmt: skip


def test_wide_layers_take_a_randomized_svd_within_a_percent_of_the_optimum():
    rng = np.random.default_rng(5)
    k, n = lr.EXACT_SVD_MAX + 100, 300  # [1124, 300]: the smaller side is not wide enough
    u, _ = np.linalg.qr(rng.normal(size=(k, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    w = ((u * (0.97 ** np.arange(n))) @ v.T).astype(np.float32)  # a decaying spectrum
    sv = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    optimum = np.sum(sv[16:] ** 2)
    for shape in ((k, n), (k + 200, k + 50)):  # exact, then randomized (both sides > 1024)
        a = w if shape == (k, n) else np.pad(w, ((0, 200), (0, k + 50 - n)))
        down, up = lr.low_rank(jnp.asarray(a), 16)
        resid = a.astype(np.float64) - np.asarray(down, np.float64) @ np.asarray(up, np.float64)
        assert np.sum(resid**2) <= optimum * (1.0 + (1e-4 if shape == (k, n) else 1e-2))


def test_smoothing_is_smoothquant_and_leaves_the_float_layer_unchanged():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(48, 20)).astype(np.float32)
    x = rng.normal(size=(7, 48)).astype(np.float32) * np.linspace(0.1, 30, 48)
    a_max = np.abs(x).max(axis=0)
    s = np.asarray(lr.smoothing(jnp.asarray(a_max), jnp.asarray(w), 0.4))
    np.testing.assert_allclose(s, a_max**0.4 / np.abs(w).max(axis=1) ** 0.6, rtol=1e-5)
    ws = np.asarray(lr.smoothed_kernel(jnp.asarray(w), jnp.asarray(s)))
    np.testing.assert_allclose((x / s) @ ws, x @ w, rtol=1e-4, atol=1e-4)
    dead = a_max.copy()
    dead[5] = 0.0
    assert float(lr.smoothing(jnp.asarray(dead), jnp.asarray(w), 0.5)[5]) == 1.0


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(40, (3, 3), strides=(2, 2), padding=1, name="conv")(x)
        return nn.Dense(24, name="dense")(nn.silu(h))


@pytest.fixture(scope="module")
def net():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 72)) * jnp.linspace(0.2, 6.0, 72)
    params = Net().init(jax.random.key(1), x)["params"]
    return Net(), params, x


def test_patch_rows_are_the_conv_gemm(net):
    model, params, x = net
    qc = QuantSpec(group_size=64).to_qconfig(["conv", "dense"])
    with intercept(CollectInputs(rows=10_000), qc) as rec:
        model.apply({"params": params}, x)
    rows = np.asarray(rec.data["conv#rows"])
    assert rows.shape == (2 * 4 * 4, 9, 72)
    k = np.asarray(params["conv"]["kernel"])
    conv = nn.Conv(40, (3, 3), strides=(2, 2), padding=1, use_bias=False).apply(
        {"params": {"kernel": k}}, x
    )
    np.testing.assert_allclose(rows.reshape(32, -1) @ k.reshape(-1, 40),
                               np.asarray(conv).reshape(-1, 40), rtol=1e-4, atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(rec.data["conv"], np.abs(np.asarray(x)).max(axis=(0, 1, 2)))


def _lowrank(params, name, x_absmax, rank):
    return lr.decompose(params[name]["kernel"], x_absmax, alpha=0.5, rank=rank)


def test_fake_quant_layer_is_the_numpy_statement(net):
    model, params, x = net
    hidden = nn.silu(nn.Conv(40, (3, 3), strides=(2, 2), padding=1).apply(
        {"params": params["conv"]}, x))  # fmt: skip
    branch = _lowrank(params, "dense", jnp.max(jnp.abs(hidden), axis=(0, 1, 2)), 4)
    for w_bits, on in ((4, True), (8, False)):
        qc = QuantSpec(group_size=32, lowrank={"dense": branch}, weight_bits=w_bits,
                       act_bits=4).to_qconfig(["dense"])  # fmt: skip
        with intercept(FakeQuant(), qc):
            got = np.asarray(model.apply({"params": params}, x))
        h = np.asarray(hidden, np.float64).reshape(-1, 40)
        s = np.asarray(branch.smooth, np.float64)
        l1, l2 = np.asarray(branch.down, np.float64), np.asarray(branch.up, np.float64)
        w = np.asarray(params["dense"]["kernel"], np.float64)
        resid = s[:, None] * w - (l1 @ l2 if on else 0.0)
        wq = np_group_quant(resid.T, w_bits, 32).T
        want = np_group_quant(h / s, 4, 32) @ wq + np.asarray(params["dense"]["bias"])
        if on:
            want = want + (h / s) @ l1 @ l2
        np.testing.assert_allclose(got.reshape(-1, 24), want, rtol=2e-3, atol=2e-3)


def test_float_bits_are_the_model_as_written_and_one_compile_serves_every_config(net):
    model, params, x = net
    ref = jax.jit(model.apply)({"params": params}, x)  # jitted as `run` is: the same XLA program
    branches = {"conv": _lowrank(params, "conv", jnp.max(jnp.abs(x), axis=(0, 1, 2)), 8),
                "dense": _lowrank(params, "dense", jnp.ones(40), 4)}  # fmt: skip

    def qconfig(w, a):
        return QuantSpec(group_size=64, lowrank=branches, weight_bits=w, act_bits=a).to_qconfig(
            ["conv", "dense"])  # fmt: skip

    @jax.jit
    def run(qc):
        with intercept(FakeQuant(), qc):
            return model.apply({"params": params}, x)

    assert np.array_equal(np.asarray(run(qconfig(16, 16))), np.asarray(ref))
    errors = [float(jnp.mean((run(qconfig(w, a)) - ref) ** 2)) for w, a in ((8, 8), (4, 4),
                                                                           (2, 4))]  # fmt: skip
    assert 0 < errors[0] < errors[1] < errors[2]
    assert run._cache_size() == 1
    batched = jax.jit(jax.vmap(run))(stack_qconfigs([qconfig(16, 16), qconfig(4, 4)]))
    np.testing.assert_allclose(batched[1], run(qconfig(4, 4)), rtol=1e-5, atol=1e-5)


def test_the_search_keeps_the_alpha_of_least_output_error(net):
    model, params, x = net
    qc = QuantSpec(group_size=64).to_qconfig(["conv", "dense"])
    with intercept(CollectInputs(rows=64), qc) as rec:
        model.apply({"params": params}, x)
    k = params["conv"]["kernel"]
    alphas = (0.0, 0.3, 0.6, 0.9)
    branch, alpha, errors = lr.search(k, rec.data["conv"], rec.data["conv#rows"], rank=4,
                                      group=64, alphas=alphas)  # fmt: skip
    rows = np.asarray(rec.data["conv#rows"], np.float64)
    ref = rows.reshape(len(rows), -1) @ np.asarray(k, np.float64).reshape(-1, 40)
    for a, err in zip(alphas, errors, strict=True):  # each error: the numpy statement's
        b = lr.decompose(k, rec.data["conv"], alpha=a, rank=4)
        s = np.asarray(b.smooth, np.float64)
        xs = rows / s
        l1 = np.asarray(b.down, np.float64).reshape(-1, 4)
        resid = (s[:, None] * np.asarray(k, np.float64)).reshape(-1, 40) - l1 @ np.asarray(b.up)
        wq = np_group_quant(resid.reshape(9, 72, 40).transpose(0, 2, 1), 4, 64).transpose(0, 2, 1)
        out = np_group_quant(xs, 4, 64).reshape(len(rows), -1) @ wq.reshape(-1, 40)
        out = out + xs.reshape(len(rows), -1) @ l1 @ np.asarray(b.up, np.float64)
        np.testing.assert_allclose(err, np.mean((out - ref) ** 2), rtol=2e-2)
    assert alpha == alphas[int(np.argmin(errors))]
    assert branch.rank == 4 and branch.smooth.shape == (72,)
