"""The released MixDQ calibration loop (`ObserveQuantized`) against a numpy transcription of
the released quantizer (thu-nics/MixDQ ``quant_utils/qdiff/quantizer/base_quantizer.py``):
``running_stat`` min/max updated once per bit-width of ``mixed_precision`` [2, 4, 8] at every
call, then the input quantized at 8 bits with the updated range, so the next layer sees it."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from mixdq_jax.quant import ObserveQuantized, QuantSpec, intercept

MOMENTUM = 0.95
BITS = 8


class Chain(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="a")(x)
        return nn.Dense(3, name="b")(jax.nn.gelu(h))


def _released_layer(x, state, name):
    """One released activation quantizer call: the EMA of the clamped min/max, updated three
    times (one per bit-width) with the same value, then asymmetric 8-bit fake quantization."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    for _ in (2, 4, 8):
        if name not in state:
            state[name] = (lo, hi)
        else:
            plo, phi = state[name]
            m = MOMENTUM
            state[name] = (plo * m + lo * (1 - m), phi * m + hi * (1 - m))
    lo, hi = state[name]
    delta = (hi - lo) / (2**BITS - 1)
    zero = np.round(-lo / delta)
    q = np.clip(np.round(x / delta) + zero, 0, 2**BITS - 1)
    return ((q - zero) * delta).astype(np.float32)


def _released_forward(params, x, state):
    p = params["params"]
    h = _released_layer(x, state, "a") @ np.asarray(p["a"]["kernel"]) + np.asarray(p["a"]["bias"])
    h = np.asarray(jax.nn.gelu(h))
    return _released_layer(h, state, "b") @ np.asarray(p["b"]["kernel"]) + np.asarray(
        p["b"]["bias"]
    )


def test_running_ranges_and_quantized_inputs_match_the_released_loop():
    model = Chain()
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 5)).astype(np.float32) * s for s in (1.0, 3.0, 0.5)]
    params = model.init(jax.random.PRNGKey(0), batches[0])
    names = {"a": None, "b": None}
    mode = ObserveQuantized(momentum=MOMENTUM**3)  # three updates a call, as CalibConfig does

    @jax.jit
    def call(params, qconfig, x):
        with intercept(mode, qconfig) as rec:
            out = model.apply(params, x)
        return out, rec.data

    state: dict[str, tuple[float, float]] = {}
    base = QuantSpec(act_bits=BITS).to_qconfig(names, dict.fromkeys(names, (0.0, 0.0)))
    running = None  # none yet: the first call starts the ranges
    for x in batches:
        qconfig = ObserveQuantized.running(base, running)
        out, ranges = call(params, qconfig, x)
        want = _released_forward(params, x, state)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
        for n in names:
            np.testing.assert_allclose(np.asarray(ranges[n])[0], state[n], rtol=1e-6)
        running = {n: np.asarray(r) for n, r in ranges.items()}
    # the EMA moved: the last range is neither the first batch's nor the last batch's own
    first = min(float(batches[0].min()), 0.0)
    assert not np.isclose(state["a"][0], first) and not np.isclose(
        state["a"][0], min(float(batches[-1].min()), 0.0)
    )
