"""Methods as plug-ins: a method from the user's own file registers through the public API
and its refiner does what its paper says (checked against numpy). The example method's run
through the whole recipe from the command line is in test_quantize.py (it reuses that
file's calibration and sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.methods import (
    METHODS,
    Method,
    QuantizedUNet,
    RefineContext,
    Uniform,
    get_method,
    load_plugin,
    method_names,
    register_method,
)
from mixdq_jax.quant.qconfig import LayerQConfig, QConfig
from mixdq_jax.rundir import RunDir

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_method.py"


def test_the_example_registers_a_method_once(tmp_path):
    names = load_plugin(EXAMPLE)
    assert names == ("example",) and load_plugin(EXAMPLE) == names
    method = get_method("example")
    assert method.allocator == METHODS["mixdq"].allocator
    assert [r.name for r in method.refiners] == ["clip_search"]
    assert "example" in method_names()


def test_bad_plugins_and_names_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'mixdq'"):
        get_method("mixdqq")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match=f"{empty}: the file registered no method"):
        load_plugin(empty)
    broken = tmp_path / "broken.py"
    broken.write_text("import mixdq_jax.methods\nraise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=f"{broken}: importing it failed: RuntimeError: boom"):
        load_plugin(broken)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_plugin(tmp_path / "missing.py")
    # a taken name with other settings is refused; the same method again is not
    other = Method(name="mixdq", title="mine", allocator=Uniform())
    with pytest.raises(ValueError, match="already registered"):
        register_method(other)
    assert register_method(METHODS["mixdq"]) is METHODS["mixdq"]


def _np_fake_quant(w: np.ndarray, bits: int) -> np.ndarray:
    """Asymmetric min/max per output channel (the paper's sec. 4.1), in numpy."""
    lo = np.minimum(w.min(axis=0), 0.0)
    hi = np.maximum(w.max(axis=0), 0.0)
    scale = (hi - lo) / (2**bits - 1)
    zero = np.round(-lo / scale)
    q = np.clip(np.round(w / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def test_clip_search_picks_the_ratio_of_lowest_lp_error(tmp_path):
    plugin = __import__("examples.custom_method", fromlist=["ClipSearch"])
    rng = np.random.default_rng(0)
    kernel = rng.standard_t(2.0, size=(64, 16)).astype(np.float32)  # heavy tails: clip pays
    params = {"lin": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(16)}}
    layer = LayerQConfig(w_bits=jnp.int32(3), a_bits=jnp.int32(16), a_range=jnp.zeros((1, 2)))
    model = QuantizedUNet(params=params, qconfig=QConfig(layers={"lin": layer}), act_ranges={})
    refiner = plugin.ClipSearch()
    ctx = RefineContext(pipe=None, run=RunDir(tmp_path / "run"), key="W3A16_example",
                        recon=None)  # fmt: skip
    out = refiner.refine(model, ctx)

    errors = []
    for r in refiner.ratios:
        lo, hi = np.minimum(kernel.min(0), 0), np.maximum(kernel.max(0), 0)
        clipped = np.clip(kernel, r * lo, r * hi)
        errors.append(np.mean(np.abs(kernel - _np_fake_quant(clipped, 3)) ** 2.4))
    best = refiner.ratios[int(np.argmin(errors))]
    chosen = json.loads((tmp_path / "run/quantize/W3A16_example/clip_search/ratios.json")
                        .read_text())  # fmt: skip
    assert chosen == {"lin": best} and best < 1.0
    lo, hi = np.minimum(kernel.min(0), 0), np.maximum(kernel.max(0), 0)
    np.testing.assert_allclose(out.params["lin"]["kernel"], np.clip(kernel, best * lo, best * hi))
    assert min(errors) < errors[0]  # clipping beats the min/max range here
    # resumed from the file: the same params without searching again
    again = refiner.refine(model, ctx)
    np.testing.assert_array_equal(again.params["lin"]["kernel"], out.params["lin"]["kernel"])
