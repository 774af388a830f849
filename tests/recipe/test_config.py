"""Targets, methods and presets are data; the CLI offers exactly them."""

from __future__ import annotations

import pytest

from mixdq_jax.cli import quantize as cli
from mixdq_jax.methods import (
    METHODS,
    PAPER_ROWS,
    RECONSTRUCTION_METHODS,
    RECONSTRUCTION_ROWS,
    Target,
    method_names,
)
from mixdq_jax.recipe import PRESETS, STAGE_NAMES


@pytest.mark.parametrize(
    ("text", "weight", "act", "name"),
    [("W8A8", 8, 8, "W8A8"), ("w4a8", 4, 8, "W4A8"), ("W3.66A16", 3.66, 16, "W3.66A16")],
)
def test_targets_parse_as_the_paper_writes_them(text, weight, act, name):
    target = Target.parse(text)
    assert (target.weight_bits, target.act_bits, target.name) == (weight, act, name)
    assert target.quantizes_acts == (act < 16)


@pytest.mark.parametrize(
    ("text", "match"),
    [("W4", "expected W<bits>A<bits>"), ("W9A8", "outside"), ("W4A6", "only A8"), ("", "W8A8")],
)
def test_bad_targets_say_what_is_expected(text, match):
    with pytest.raises(ValueError, match=match):
        Target.parse(text)


def test_methods_are_the_papers_rows():
    assert tuple(METHODS) == PAPER_ROWS == (
        "naive", "naive+bos", "sqnr-mp", "fp8", "mixdq-no-bos", "mixdq",
    )  # fmt: skip
    assert tuple(RECONSTRUCTION_METHODS) == RECONSTRUCTION_ROWS
    built_in = PAPER_ROWS + RECONSTRUCTION_ROWS
    assert method_names()[: len(built_in)] == built_in
    assert STAGE_NAMES == cli.STAGES
    # the paper's naive PTQ has no BOS handling (Table 3: BOS is the next row's technique)
    assert METHODS["naive"].bos_aware is False and METHODS["naive+bos"].bos_aware is True
    assert METHODS["mixdq-no-bos"].bos_aware is False
    assert METHODS["sqnr-mp"].allocator.name == "sqnr"
    assert METHODS["sqnr-mp"].settings()["weights"] == METHODS["sqnr-mp"].settings()["acts"]


def test_method_support_is_stated():
    assert METHODS["naive"].supports(Target.parse("W3.66A16")) is not None
    assert METHODS["mixdq"].supports(Target.parse("W3.66A16")) is None
    assert METHODS["fp8"].supports(Target.parse("W8A8")) is None
    assert "W8A8 only" in METHODS["fp8"].supports(Target.parse("W4A8"))


def test_official_preset_is_the_official_quantizer():
    official = PRESETS["official"]
    assert official.symmetric_weights and official.range_method == "ema"
    assert official.momentum == 0.95 and official.observe_weight_bits == 8
    assert PRESETS["ours"].observe_weight_bits == 16
