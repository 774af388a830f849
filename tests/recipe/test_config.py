"""Targets, methods and presets are data; the CLI offers exactly them."""

from __future__ import annotations

import pytest

from mixdq_jax.cli import build_parser as cli_main_parser
from mixdq_jax.cli import quantize as cli
from mixdq_jax.cli.allocate import options_from_args
from mixdq_jax.cli.preset_args import PRESET_NAMES, allocation_options
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
    [("W8A8", 8, 8, "W8A8"), ("w4a8", 4, 8, "W4A8"), ("W3.66A16", 3.66, 16, "W3.66A16"),
     ("W4A4", 4, 4, "W4A4")],  # fmt: skip
)
def test_targets_parse_as_the_paper_writes_them(text, weight, act, name):
    target = Target.parse(text)
    assert (target.weight_bits, target.act_bits, target.name) == (weight, act, name)
    assert target.quantizes_acts == (act < 16)


@pytest.mark.parametrize(
    ("text", "match"),
    [("W4", "expected W<bits>A<bits>"), ("W9A8", "outside"), ("W4A6", "A4 .mixed"), ("", "W8A8")],
)
def test_bad_targets_say_what_is_expected(text, match):
    with pytest.raises(ValueError, match=match):
        Target.parse(text)


def test_methods_are_the_papers_rows():
    assert tuple(METHODS) == PAPER_ROWS == (
        "naive", "naive+bos", "sqnr-mp", "fp8", "fp8+bos", "mixdq-no-bos", "mixdq",
    )  # fmt: skip
    assert tuple(RECONSTRUCTION_METHODS) == RECONSTRUCTION_ROWS
    built_in = PAPER_ROWS + RECONSTRUCTION_ROWS
    assert method_names()[: len(built_in)] == built_in
    assert STAGE_NAMES == cli.STAGES
    # the paper's naive PTQ has no BOS handling (Table 3: BOS is the next row's technique)
    assert METHODS["naive"].bos_aware is False and METHODS["naive+bos"].bos_aware is True
    assert METHODS["mixdq-no-bos"].bos_aware is False
    # Table 2's FP8 and MP-only rows ran without BOS handling; FP8 + BOS is its own row
    assert METHODS["fp8"].bos_aware is False and METHODS["fp8+bos"].bos_aware is True
    assert METHODS["fp8"].format == METHODS["fp8+bos"].format
    assert METHODS["sqnr-mp"].allocator.name == "sqnr"
    assert METHODS["sqnr-mp"].settings()["weights"] == METHODS["sqnr-mp"].settings()["acts"]


def test_method_support_is_stated():
    assert METHODS["naive"].supports(Target.parse("W3.66A16")) is not None
    assert METHODS["mixdq"].supports(Target.parse("W3.66A16")) is None
    assert METHODS["fp8"].supports(Target.parse("W8A8")) is None
    assert "W8A8 only" in METHODS["fp8"].supports(Target.parse("W4A8"))


def test_presets_are_what_their_sources_state():
    """Each preset's settings, as docs/departures.md names them."""
    paper, official, ours = PRESETS["paper"], PRESETS["official"], PRESETS["ours"]
    # the paper (sec. 4.1): asymmetric min-max, its summed SSIM / SQNR dB objective
    assert not paper.symmetric_weights and paper.range_method == "minmax"
    assert paper.knobs().objective == "official" and paper.selection == "mse"
    # the released code: symmetric weights (its config), EMA(0.95) updated once per bit-width
    # of [2, 4, 8], observed on the W8 model with 8-bit activations, SQNR a ratio of sums,
    # its budget split, act_8.00, its uint8 pick
    assert official.symmetric_weights and official.range_method == "ema"
    assert (official.momentum, official.ema_updates) == (0.95, 3)
    assert (official.observe_weight_bits, official.observe_act_bits) == (8, 8)
    assert official.sqnr == "ratio_of_sums" and official.selection == "released"
    knobs = official.knobs()
    assert (knobs.objective, knobs.act_average, knobs.protect_top) == ("official", 8.0, 1.0)
    # ours: the paper's quantizer, observed on the float model, the noise objective
    assert not ours.symmetric_weights and ours.observe_weight_bits == 16
    assert ours.knobs().objective == "noise" and ours.knobs().act_average is None
    # an option the user gives wins; one left None keeps the preset's
    assert official.knobs(objective="noise", act_average=None).objective == "noise"
    assert official.knobs(act_average=None).act_average == 8.0


def test_preset_settings_keep_earlier_runs_resumable():
    """Runs recorded before the later fields resume: ours records exactly the old fields."""
    assert set(PRESETS["ours"].settings()) == {
        "name", "symmetric_weights", "range_method", "momentum", "observe_weight_bits",
    }  # fmt: skip
    assert PRESETS["official"].settings()["ema_updates"] == 3


def test_every_command_shares_the_presets_defaults():
    assert set(PRESET_NAMES) == set(PRESETS)  # --help lists them without importing the recipe
    parser = cli_main_parser()
    for argv in (["quantize", "--target", "W4A8", "--run", "r"], ["demo"]):
        for preset in ("ours", "paper", "official"):
            args = parser.parse_args([*argv, "--preset", preset])
            assert allocation_options(args) == PRESETS[preset].knobs(), (argv, preset)
    args = parser.parse_args(["demo", "--preset", "official", "--objective", "noise"])
    assert allocation_options(args).objective == "noise"
    # mixdq allocate: the same defaults (its --target is explicit, so no act_average)
    for preset in ("ours", "paper", "official"):
        args = parser.parse_args(["allocate", "--sensitivity", ".", "--kind", "act",
                                  "--target", "7.7", "--out", "x.yaml", "--preset", preset])
        got, want = options_from_args(args), PRESETS[preset].knobs()
        assert (got.objective, got.protect_top, got.budget_rule) == (
            want.objective, want.protect_top, want.budget_rule
        ), preset
