"""NNX layers through the one interceptor: named by graph path, handed to the mode with the
same ``LayerCall`` contract as linen (params, own math), routed only inside ``intercept`` and
only on the thread that opened it; an unnamed NNX model is an error, not a silent float run."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixdq_jax.quant import FakeQuant, LayerCall, Mode, QuantSpec, Records, intercept
from mixdq_jax.quant.intercept import name_nnx_layers


class Net(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(4, 2, use_bias=False, rngs=rngs)

    def __call__(self, x):
        x = self.conv(x).mean(axis=(1, 2))
        for block in self.blocks:
            x = jax.nn.relu(block(x))
        return self.head(x)


@dataclass(frozen=True, kw_only=True)
class Twice(Mode):
    """Records what the mode sees and runs the layer's own math on doubled weights."""

    collects = True

    def handle(self, call: LayerCall, qconfig: Any, records: Records) -> jax.Array:
        params = call.params
        records.add(
            call.name,
            (call.kind, {k: v.shape for k, v in params.items()}, call.x.shape),
            lambda old, new: old,
        )
        np.testing.assert_array_equal(call.apply(params, call.x), call.original())
        return call.apply({**params, "kernel": 2 * params["kernel"]}, call.x)


@pytest.fixture
def net():
    return Net(rngs=nnx.Rngs(0))


X = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
ORIGINAL = {cls: cls.__dict__["__call__"] for cls in (nnx.Linear, nnx.Conv)}  # no block open


def test_named_layers_reach_the_mode_with_params_and_own_math(net):
    with name_nnx_layers(net) as layers, intercept(Twice(), prefix="enc") as records:
        out = net(X)
    assert sorted(layers) == ["blocks.0", "blocks.1", "conv", "head"]
    assert records.data == {
        "enc.conv": ("conv", {"kernel": (3, 3, 3, 4), "bias": (4,)}, (2, 5, 5, 3)),
        "enc.blocks.0": ("linear", {"kernel": (4, 4), "bias": (4,)}, (2, 4)),
        "enc.blocks.1": ("linear", {"kernel": (4, 4), "bias": (4,)}, (2, 4)),
        "enc.head": ("linear", {"kernel": (4, 2)}, (2, 4)),
    }
    # doubled weights by hand (conv bias is zero-initialised, so only the kernels matter)
    h = (
        jax.lax.conv_general_dilated(
            X, 2 * net.conv.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ).mean(axis=(1, 2))
        + net.conv.bias[...]
    )
    for block in net.blocks:
        h = jax.nn.relu(h @ (2 * block.kernel[...]) + block.bias[...])
    np.testing.assert_allclose(out, h @ (2 * net.head.kernel[...]), rtol=1e-5, atol=1e-6)


def test_unnamed_nnx_model_is_an_error_and_routing_ends_with_the_block(net):
    with pytest.raises(TypeError, match="nnx_apply"), intercept(Twice()):
        net(X)
    with intercept(Twice()):
        with intercept(FakeQuant(), QuantSpec().to_qconfig([])):
            pass
        for cls, original in ORIGINAL.items():  # still routed: the outer block is open
            assert cls.__dict__["__call__"] is not original
    for cls, original in ORIGINAL.items():
        assert cls.__dict__["__call__"] is original


def test_another_thread_runs_nnx_layers_as_written(net):
    expected = net(X)
    got = {}

    def other():
        got["out"] = net(X)  # no names, no block on this thread: no error

    with name_nnx_layers(net), intercept(Twice()):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    np.testing.assert_array_equal(got["out"], expected)


def test_nnx_and_linen_layers_give_the_same_fake_quant():
    """One Dense and one Linear with the same weights, W4A8: identical outputs."""
    x = jax.random.normal(jax.random.key(1), (3, 6))
    dense = nn.Dense(5)
    params = dense.init(jax.random.key(2), x)["params"]
    linear = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    linear.kernel[...] = params["kernel"]
    linear.bias[...] = jnp.arange(5.0)
    params = {**params, "bias": jnp.arange(5.0)}
    qc = QuantSpec(weight_bits=4, act_bits=8, bos_aware=False).to_qconfig([""], {"": [[-3.0, 3.0]]})

    @jax.jit
    def linen_q(params, qc, x):
        with intercept(FakeQuant(), qc):
            return dense.apply({"params": params}, x)

    def nnx_q(qc, x):
        with name_nnx_layers(linear), intercept(FakeQuant(), qc):
            return linear(x)

    np.testing.assert_array_equal(linen_q(params, qc, x), nnx_q(qc, x))
