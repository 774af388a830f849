"""The recipe's allocation rules against the official SDXL-turbo release."""

from __future__ import annotations

import math

import pytest
import yaml

from mixdq_jax import official_format as fmt
from mixdq_jax.allocation import is_content_layer
from mixdq_jax.cli import main
from mixdq_jax.methods import (
    METHODS,
    AllocationContext,
    AllocationOptions,
    Layers,
    Target,
    act_budget,
)
from mixdq_jax.quant.qconfig import OFFICIAL_PROTECTED_ACT_LAYERS
from tests.reference_data import official as official_data


def _ctx(sens, layers, target, knobs):
    return AllocationContext(layers=layers, knobs=knobs, target=target, scores=lambda: sens)


def protected_acts(sens, layers, method, knobs):
    return method.allocator.protected(_ctx(sens, layers, Target.parse("W8A8"), knobs))


def act_candidates(sens, layers, method, target, knobs, protected):
    return method.allocator.acts(_ctx(sens, layers, target, knobs), protected)


def weight_candidates(sens, layers, method, target, knobs):
    return method.allocator.weights(_ctx(sens, layers, target, knobs))


@pytest.fixture(scope="module")
def official():
    sens = {
        (kind, metric): fmt.read_sensitivity(official_data("sensitivity", f"{kind}_{metric}.yaml"))
        for kind in ("weight", "act")
        for metric in ("sqnr", "ssim")
    }
    w = fmt.read_sizes(official_data("tensor_ratio", "weight_ratio.yaml"))
    a = fmt.read_sizes(official_data("tensor_ratio", "act_ratio.yaml"))
    names = sorted(w)
    layers = Layers(
        names=names,
        content=[n for n in names if is_content_layer(n)],
        quality=[n for n in names if not is_content_layer(n)],
        w_size=w,
        a_size=a,
    )
    return sens, layers


def test_top_one_percent_at_8_bits_is_exactly_the_official_protected_set(official):
    sens, layers = official
    got = protected_acts(sens, layers, METHODS["mixdq"], AllocationOptions())
    assert got == set(OFFICIAL_PROTECTED_ACT_LAYERS)  # 5 content + 4 quality layers
    # uniform activations protect nothing; SQNR-only ranks all layers in one group
    assert protected_acts(sens, layers, METHODS["naive"], AllocationOptions()) == set()
    sqnr_only = protected_acts(sens, layers, METHODS["sqnr-mp"], AllocationOptions())
    assert len(sqnr_only) == math.ceil(0.01 * len(layers.names))


def test_cli_protect_top_leaves_out_exactly_the_official_layers(tmp_path):
    out = tmp_path / "act.yaml"
    args = ["allocate", "--sensitivity", str(official_data("sensitivity")), "--sizes",
            str(official_data("tensor_ratio", "act_ratio.yaml")), "--kind", "act",
            "--target", "7.7", "--protect-top", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    written = {k.removeprefix("model."): v for k, v in yaml.safe_load(out.read_text()).items()}
    sizes = fmt.read_sizes(official_data("tensor_ratio", "act_ratio.yaml"))
    assert set(sizes) - set(written) == set(OFFICIAL_PROTECTED_ACT_LAYERS)


def test_a8_budget_on_sdxl_is_the_papers_and_stays_within_8_bits(official):
    sens, layers = official
    knobs, target = AllocationOptions(), Target.parse("W4A8")
    protected = protected_acts(sens, layers, METHODS["mixdq"], knobs)
    share = sum(layers.a_size[n] for n in protected) / sum(layers.a_size.values())
    assert share == pytest.approx(0.031, abs=0.001)  # the 3.1% of elements
    assert act_budget(layers, target, knobs, protected) == 7.7
    cands = act_candidates(sens, layers, METHODS["mixdq"], target, knobs, protected)
    assert len(cands) > 10
    total = sum(layers.a_size.values())
    for bits in cands:
        assert {n for n, b in bits.items() if b == 16} == protected
        effective = sum(layers.a_size[n] * b for n, b in bits.items()) / total
        assert effective <= 8.0 + 1e-9


def test_a8_budget_is_lowered_when_float_layers_are_large():
    names = ["big", "a", "b", "c"]
    a_size = {"big": 1.0, "a": 3.0, "b": 3.0, "c": 3.0}
    w_size = dict.fromkeys(names, 1.0)
    layers = Layers(names=names, content=["a"], quality=["big", "b", "c"], w_size=w_size,
                    a_size=a_size)  # fmt: skip
    knobs = AllocationOptions()
    b = act_budget(layers, Target.parse("W8A8"), knobs, {"big"})
    # 16 * 1 + b * 9 <= 8 * 10 with the band kept inside: b = 64 / 9 - 0.02
    assert b == pytest.approx(64 / 9 - knobs.band)
    with pytest.raises(ValueError, match="--protect-top"):
        act_budget(layers, Target.parse("W8A8"), knobs, {"big", "a", "b"})


def test_weight_candidates_per_method(official):
    sens, layers = official
    knobs = AllocationOptions(b_num=2)
    w4 = Target.parse("W4A16")
    (uniform,) = weight_candidates(sens, layers, METHODS["naive"], w4, knobs)
    assert set(uniform.values()) == {4}
    (sqnr,) = weight_candidates(sens, layers, METHODS["sqnr-mp"], w4, knobs)
    avg = sum(layers.w_size[n] * b for n, b in sqnr.items()) / sum(layers.w_size.values())
    assert abs(avg - 4.0) <= knobs.band + 1e-6
    mixdq = weight_candidates(sens, layers, METHODS["mixdq"], w4, knobs)
    assert len(mixdq) > 1 and len({tuple(sorted(c.items())) for c in mixdq}) == len(mixdq)
    for bits in mixdq:  # quality layers never go below 4 bits (official candidates)
        assert all(bits[n] >= 4 for n in layers.quality)
    (w8,) = weight_candidates(sens, layers, METHODS["mixdq"], Target.parse("W8A8"), knobs)
    assert set(w8.values()) == {8}


def test_objectives_trade_summed_db_for_noise_power_on_the_official_data(official):
    """On the real SDXL-turbo sensitivities, each objective's weight candidates are optimal for
    their own measure: the noise objective's quality layers add less summed noise power (by
    the formula, computed here with numpy), the official one's sum more dB."""
    import numpy as np  # noqa: PLC0415

    sens, layers = official
    target = Target.parse("W4A16")
    picks = {
        o: weight_candidates(
            sens, layers, METHODS["mixdq"], target, AllocationOptions(objective=o, b_num=1)
        )
        for o in ("official", "noise")
    }
    assert picks["official"] != picks["noise"]
    sqnr = sens["weight", "sqnr"]
    idx = {2: 0, 4: 1, 8: 2}

    def quality(bits, f):
        return sum(f(sqnr[n][idx[bits[n]]]) for n in layers.quality)

    def power(db):
        return float(np.power(10.0, -db / 10.0))

    # the first candidate of each is the same (B, k) point: the same group budgets
    official, noise = picks["official"][0], picks["noise"][0]
    assert quality(noise, power) < quality(official, power)
    assert quality(official, float) > quality(noise, float)


def test_objective_choices_match_the_library():
    import argparse  # noqa: PLC0415

    from mixdq_jax.allocation.objectives import OBJECTIVES  # noqa: PLC0415
    from mixdq_jax.cli import allocate, quantize  # noqa: PLC0415

    for module in (allocate, quantize):
        parser = argparse.ArgumentParser()
        module.register(parser.add_subparsers())
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        (cmd,) = sub.choices.values()
        (action,) = [a for a in cmd._actions if a.dest == "objective"]
        assert tuple(action.choices) == OBJECTIVES
