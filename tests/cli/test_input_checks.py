"""Bad input is exit 2 with a message that says what to fix, found before any work: counts and
sizes of every command checked at parse time naming the flag; a text, YAML or JSON file that
does not decode named with its line; a missing calibration named as the option to give; an
edited bit-width file named with the unknown layer; each metric's network read and checked
before the first image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixdq_jax.testbed import TESTBED_PATH
from tests.cli.conftest import failed, fingerprint, in_process, mixdq
from weights_convert.safetensors_io import save_safetensors

BAD_UTF8 = b"a red circle\n\xff\xfe a blue square\n"




# ------------------------------------------------------------------ counts and sizes
@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["demo", "--num-eval", "-1"], ["--num-eval", "-1"]),
        (["demo", "--num-calib", "0"], ["--num-calib", "must be >= 1"]),
        (["demo", "--seed", "-1"], ["--seed", "-1"]),
        (["layers", "--model", "testbed", "--latent-size", "0"], ["--latent-size", "0"]),
        (["layers", "--model", "testbed", "--latent-size", "-8"], ["--latent-size", "-8"]),
        (["bench", "memory", "--unet-config", "{cfg}", "--latent", "0"], ["--latent", "0"]),
        (["bench", "kernels", "--repeats", "0"], ["--repeats", "0"]),
        (["bench", "kernels", "--unet-repeats", "0"], ["--unet-repeats"]),
        (["allocate", "{alloc}", "--b-num", "0", "--k-sweep"], ["--b-num", "0"]),
        (["allocate", "{alloc}", "--b-delta", "-0.5", "--k-sweep"], ["--b-delta", "-0.5"]),
        (["allocate", "{alloc}", "--k", "0"], ["--k", "must be > 0"]),
        (["allocate", "{alloc}", "--band", "0"], ["--band", "must be > 0"]),
        (["allocate", "{alloc}", "--protect-top", "101"], ["--protect-top", "101"]),
        (["testbed", "train", "--unet-steps", "0"], ["--unet-steps", "0"]),
        (["testbed", "train", "--ema-decay", "2"], ["--ema-decay", "2"]),
        (["evaluate", "--fail-if", "fid>>1"], ["--fail-if", "'>1'"]),
        (["generate", "--prompt", "a", "--scheduler", "DDIM"], ["--scheduler", "LCMScheduler"]),
        (["evaluate", "--metrics", "fid,bleu"], ["--metrics", "bleu", "fid,clip"]),
        (["quantize", "--target", "W8A8", "--run", "{tmp}/r", "--eval-metrics", "x"],
         ["--eval-metrics", "x"]),
    ],
)  # fmt: skip
def test_counts_and_names_are_checked_at_parse_time(tmp_path, capsys, argv, names):
    (tmp_path / "u.json").write_text("{}")
    alloc = ["--sensitivity", str(tmp_path), "--sizes", str(tmp_path / "u.json"), "--kind",
             "weight", "--target", "4", "--out", str(tmp_path / "o")]  # fmt: skip
    full: list[str] = []
    for a in argv:
        full += alloc if a == "{alloc}" else [a.replace("{cfg}", str(tmp_path / "u.json"))
                                              .replace("{tmp}", str(tmp_path))]  # fmt: skip
    code, err = in_process(capsys, full)
    assert code == 2 and "error: argument" in err and all(n in err for n in names), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.json"]  # nothing written


def test_bad_input_through_the_real_entry_point_is_exit_2(tmp_path):
    """A negative count no longer starts minutes of work; a UNet config that is not a JSON
    object is bad input (exit 2 naming it), not a bug (exit 1)."""
    out = tmp_path / "demo"
    failed(mixdq("demo", "--num-calib", "-1", "--out", out), 2, "argument --num-calib", "-1")
    assert not out.exists()
    config = tmp_path / "config.json"
    config.write_text("[1, 2]")
    failed(mixdq("layers", "--unet-config", config), 2, f"--unet-config {config}", "got a list")


# ------------------------------------------------------------------ files that do not decode
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["generate", "--prompts-file", "{bad}.txt", "--out", "{tmp}/o"], "--prompts-file"),
        (["calibrate", "--prompts-file", "{bad}.txt", "--run", "{tmp}/o"], "--prompts-file"),
        (["quantize", "--target", "W8A8", "--prompts", "{bad}.txt", "--run", "{tmp}/o"],
         "--prompts"),
        (["evaluate", "--prompts", "{bad}.txt", "--out", "{tmp}/o"], None),
        (["evaluate", "--prompts", "{bad}.json", "--out", "{tmp}/o"], None),
        (["generate", "--prompt", "a", "--act-bits", "{bad}.yaml", "--out", "{tmp}/o"], None),
        (["allocate", "--sensitivity", "{tmp}", "--sizes", "{bad}.yaml", "--kind", "weight",
          "--target", "4", "--out", "{tmp}/o.yaml"], None),
        (["demo", "--config", "{bad}.yaml"], "--config"),
        (["layers", "--unet-config", "{bad}.json"], "--unet-config"),
    ],
)  # fmt: skip
def test_a_file_that_does_not_decode_is_named_with_its_line(tmp_path, capsys, argv, flag):
    bad = tmp_path / "bad"
    for suffix in (".txt", ".json", ".yaml"):
        bad.with_suffix(suffix).write_bytes(BAD_UTF8)
    for name in ("weight_sqnr.yaml", "weight_ssim.yaml"):
        (tmp_path / name).write_text("")
    argv = [a.replace("{bad}", str(bad)).replace("{tmp}", str(tmp_path)) for a in argv]
    path = next(a for a in argv if a.startswith(str(bad)))
    code, err = in_process(capsys, argv)
    assert code == 2, err
    assert f"{path}: not UTF-8 text (line 2: byte 0xff)" in err, err
    assert flag is None or f"{flag} {path}" in err, err
    assert "codec" not in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ what to fix, named
def test_a_missing_calibration_names_the_option(tmp_path, capsys):
    code, err = in_process(capsys, ["generate", "--prompt", "a", "--act-bits", "8", "--out",
                              tmp_path / "o"])  # fmt: skip
    assert code == 2 and "--act-bits 8" in err and "--calib RUN" in err, err
    assert "down_blocks" not in err and len(err) < 400, err
    assert not (tmp_path / "o").exists()


def test_an_edited_bits_file_names_the_file_and_the_layer(tmp_path, capsys):
    from mixdq_jax.quant.registry import registry_from_unet_config

    names = [layer.name for layer in registry_from_unet_config(TESTBED_PATH / "unet" /
                                                               "config.json")]  # fmt: skip
    edited = tmp_path / "edited.yaml"
    edited.write_text("".join(f"model.{n}: 8\n" for n in [*names, "down_blocks.9.typo"]))
    code, err = in_process(capsys, ["generate", "--prompt", "a", "--weight-bits", edited, "--out",
                              tmp_path / "o"])  # fmt: skip
    assert code == 2, err
    assert f"--weight-bits {edited}" in err and "'down_blocks.9.typo'" in err, err
    assert "mixdq layers --model testbed" in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ weights before work
def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def test_a_folder_that_is_not_a_clip_model_fails_before_any_image(tmp_path):
    clip = tmp_path / "not-clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (clip / "vocab.json").write_text("{}")
    (clip / "merges.txt").write_text("#version: 0.2\n")
    save_safetensors(clip / "model.safetensors", {"w": np.zeros(2, np.float32)})
    before = fingerprint(clip)
    out = tmp_path / "eval"
    err = failed(mixdq("evaluate", "--prompts", _prompts(tmp_path), "--metrics", "clip",
                       "--clip-model", clip, "--out", out), 2,
                 str(clip / "config.json"), "model_type")  # fmt: skip
    assert "compiling" not in err and not out.exists()
    assert fingerprint(clip) == before


@pytest.mark.parametrize("damage", ["truncated", "missing", "pth"])
def test_a_damaged_inception_file_fails_before_any_image(tmp_path, capsys, damage):
    real = tmp_path / "real"
    real.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(real / f"{i}.png")
    weights = tmp_path / ("w.pth" if damage == "pth" else "w.safetensors")
    if damage == "pth":
        pytest.importorskip("torch")
        weights.write_bytes(b"PK\x03\x04 cut short")
    else:
        save_safetensors(weights, {"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3),
                                                                         np.float32)})  # fmt: skip
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:200])
    out = tmp_path / "eval"
    code, err = in_process(capsys, ["evaluate", "--prompts", _prompts(tmp_path), "--metrics", "fid",
                              "--inception-weights", weights, "--reference-images", real,
                              "--out", out])  # fmt: skip
    assert code == 2 and str(weights) in err, err
    assert ("missing" in err) if damage == "missing" else ("again" in err), err
    assert not out.exists()


def test_fid_needs_two_images_and_says_so(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (real / "0.png").write_bytes(b"")
    code, err = in_process(capsys, ["evaluate", "--prompts", _prompts(tmp_path), "--metrics", "fid",
                              "--inception-weights", tmp_path / "p.txt", "--reference-images",
                              real, "--out", tmp_path / "o"])  # fmt: skip
    assert code == 2 and f"--reference-images {real}" in err and "at least 2" in err, err
    code, err = in_process(capsys, ["evaluate", "--prompts", _prompts(tmp_path), "--num", "1",
                              "--metrics", "fid", "--out", tmp_path / "o"])  # fmt: skip
    assert code == 2 and "--num" in err and "at least 2" in err, err
    assert not (tmp_path / "o").exists()


def test_an_edited_plan_in_a_run_names_the_file_and_the_layer(tmp_path):
    """``RUN/quantize/<key>/weight_bits.json`` (the choice a later stage exports) edited by
    hand: an unknown layer, a missing one or a bit-width that is no integer names the file."""
    from mixdq_jax.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.write_chosen_bits("W4A8_mixdq", "weight", {"conv_in": 8, "conv_out": 4})
    path = run.chosen_bits_path("W4A8_mixdq", "weight")
    assert run.chosen_bits("W4A8_mixdq", "weight", ["conv_in", "conv_out"]) == {
        "conv_in": 8, "conv_out": 4}  # fmt: skip
    for edited, names in [
        ({"conv_in": 8, "conv_out": 4, "conv_typo": 4}, ["'conv_typo'", "not in this model"]),
        ({"conv_in": 8}, ["'conv_out'", "missing"]),
        ({"conv_in": 8, "conv_out": "4"}, ["'conv_out'", "no integer"]),
    ]:
        path.write_text(json.dumps(edited))
        with pytest.raises(ValueError) as info:
            run.chosen_bits("W4A8_mixdq", "weight", ["conv_in", "conv_out"])
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "delete it" in message
        assert all(n in message for n in names), message
