"""Bad numbers and missing files fail at parse time, before any model loads: exit 2, one
message naming the option and the value, no traceback, nothing written."""

from __future__ import annotations

import argparse

import pytest

from mixdq_jax import cli
from mixdq_jax.cli import argtypes
from tests.cli.conftest import failed, mixdq

BAD_NUMBERS = [
    (["generate", "--prompt", "a", "--steps", "0"], ["--steps", "must be >= 1", "0"]),
    (["generate", "--prompt", "a", "--height", "-64"], ["--height", "-64"]),
    (["generate", "--prompt", "a", "--guidance", "nan"], ["--guidance", "finite", "nan"]),
    (["generate", "--prompt", "a", "--seed", "4294967296"], ["--seed", "4294967296"]),
    (["generate", "--prompt", "a", "--weight-bits", "9"], ["--weight-bits", "9", "2..8"]),
    (["calibrate", "--batch-size", "0"], ["--batch-size", "0"]),
    (["calibrate", "--num-prompts", "two"], ["--num-prompts", "'two'"]),
    (["sensitivity", "--bits", "2,4,9"], ["--bits", "[9]"]),
    (["sensitivity", "--chunk", "-8"], ["--chunk", "-8"]),
    (["sensitivity", "--beta", "0"], ["--beta", "must be > 0"]),
    (["evaluate", "--num", "0"], ["--num", "0"]),
    (["evaluate", "--seed", "-1"], ["--seed", "-1"]),
    (["export", "--weight-bits", "4", "--lora-scale", "inf"], ["--lora-scale", "inf"]),
]


def _with_target(argv: list[str], out) -> list[str]:
    if argv[0] in ("calibrate", "sensitivity"):
        return [*argv, "--run", str(out)]
    return argv if argv[0] == "evaluate" else [*argv, "--out", str(out)]


@pytest.mark.parametrize(("argv", "names"), BAD_NUMBERS)
def test_out_of_range_numbers_fail_at_parse_time(tmp_path, capsys, argv, names):
    """In process (the same ``main``; a subprocess each would cost seconds)."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_with_target(argv, out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixdq {argv[0]}: error: argument") and "Traceback" not in err
    assert all(name in err for name in names), err
    assert len(err.strip().splitlines()) <= 2, err  # the message, then where to look
    assert not out.exists()  # nothing created


@pytest.mark.parametrize("case", [0, 5, 7])
def test_bad_numbers_through_the_real_entry_point(tmp_path, case):
    argv, names = BAD_NUMBERS[case]
    out = tmp_path / "out"
    err = failed(mixdq(*_with_target(argv, out)), 2, f"mixdq {argv[0]}: error: argument", *names)
    assert len(err.strip().splitlines()) <= 2, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["generate", "--prompt", "a", "--prompts-file", "{tmp}/none.txt"], "none.txt"),
        (["generate", "--prompt", "a", "--weight-bits", "8", "--calib", "{tmp}/norun"], "norun"),
        (["generate", "--prompt", "a", "--lora", "{tmp}/lora.safetensors"], "lora.safetensors"),
        (["generate", "--prompt", "a", "--act-bits", "{tmp}/bits.yaml"], "bits.yaml"),
    ],
)
def test_missing_files_are_named_before_loading(tmp_path, argv, name):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    failed(mixdq(*argv, "--out", tmp_path / "out"), 2, name)
    assert not (tmp_path / "out").exists()


def test_missing_model_folder_is_named(tmp_path):
    proc = mixdq("generate", "--model", tmp_path / "nomodel", "--prompt", "a", "--out", tmp_path)
    failed(proc, 2, "mixdq generate: error:", str(tmp_path / "nomodel"))
    assert list(tmp_path.iterdir()) == []  # the lock file is gone; nothing else was written


def test_range_checks_never_fall_back_to_a_default():
    """``--height 0`` used to mean "the native size" (``args.height or native``)."""
    for parse, bad in [
        (argtypes.positive_int, "0"),
        (argtypes.nonneg_int, "-1"),
        (argtypes.seed, "-1"),
        (argtypes.nonneg_float, "-0.5"),
        (argtypes.positive_float, "0"),
        (argtypes.probability, "1.5"),
        (argtypes.finite_float, "-inf"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    assert argtypes.seed(str(argtypes.MAX_SEED)) == argtypes.MAX_SEED
    assert argtypes.bits_list((2, 4, 8))("8, 2") == (8, 2)
    with pytest.raises(argparse.ArgumentTypeError, match="repeated"):
        argtypes.bits_list((2, 4, 8))("4,4")
