"""The study's rows are data: methods validate, and each allocation rule does what it says."""

from __future__ import annotations

import pytest

from mixdq_jax.quant.registry import LayerInfo
from mixdq_jax.study import METHODS, Method
from mixdq_jax.study.allocate import Layers, act_bits, protected_acts, uniform_weights


def _layer(name: str, group: str, size: int) -> LayerInfo:
    return LayerInfo(
        name=name, kind="linear", group=group, weight_shape=(size, 1), weight_params=size,
        bias_params=0, input_shape=(size,), input_size=size,
    )  # fmt: skip


LAYERS = Layers.of(
    [_layer(f"c{i}", "content", 10 + i) for i in range(150)]
    + [_layer(f"q{i}", "quality", 20 + i) for i in range(150)]
)


def test_methods_are_the_papers_rows_and_validate():
    assert [m.name for m in METHODS] == ["naive", "sqnr_only", "mixdq_no_bos", "mixdq"]
    assert {m.name: m.bos_aware for m in METHODS}["mixdq_no_bos"] is False
    with pytest.raises(ValueError, match="weight allocation 'magic'"):
        Method(name="x", title="x", weights="magic", acts="uniform", bos_aware=True)
    with pytest.raises(ValueError, match="activation policy"):
        Method(name="x", title="x", weights="uniform", acts="top", bos_aware=True)


def test_uniform_weights_only_for_whole_bit_widths():
    assert set(uniform_weights(LAYERS, 4).values()) == {4}
    assert uniform_weights(LAYERS, 3.66) is None


def test_mixdq_activation_policy_keeps_the_top_percent_of_each_group_float():
    # SQNR/SSIM at (2, 4, 8) bits: lower is more sensitive; layer 0 of each group is worst
    sens = {
        ("act", "ssim"): {n: (0.1, 0.5 + 0.001 * int(n[1:]), 0.9) for n in LAYERS.content},
        ("act", "sqnr"): {n: (1.0, 10.0 + int(n[1:]), 30.0) for n in LAYERS.quality},
    }
    protected = protected_acts(sens, LAYERS, 0.01)  # ceil(1% of 150) = 2 per group
    assert protected == {"c0", "c1", "q0", "q1"}
    mixdq = act_bits("mixdq", 8, LAYERS, protected)
    assert {n for n, b in mixdq.items() if b == 16} == protected
    assert set(act_bits("uniform", 8, LAYERS, protected).values()) == {8}
    assert set(act_bits("mixdq", 16, LAYERS, protected).values()) == {16}
