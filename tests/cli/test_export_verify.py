"""A finished export is trusted only once verified: `mixdq quantize` given the same ``--run``
and ``--out`` again exports a damaged folder again, saying what was damaged; `mixdq generate`
refuses an edited export, naming the file and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mixdq_jax.cli import main
from mixdq_jax.deploy import verify_export
from tests.cli.conftest import failed, fingerprint, mixdq
from tests.tiny_models import build_sdxl

PROMPTS = ["a red cube", "a blue ball on grass", "a cat", "two green cones"]
SMALL_UNET = dict(layers_per_block=1, transformer_layers_per_block=(1, 1))
SETTINGS = "mixdq_settings.json"  # the command's settings record beside the export (its paths)


def _quantize(model: Path, prompts: Path, run: Path, out: Path) -> int:
    args = ["--target", "W8A8", "--method", "naive", "--num-calib", "2", "--num-select", "2",
            "--batch-size", "1", "--chunk", "32"]  # fmt: skip
    paths = ["--model", model, "--prompts", prompts, "--run", run, "--out", out]
    return main(["quantize", *args, *map(str, paths)])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """One `mixdq quantize` run and its export (copied by each test before damaging it)."""
    root = tmp_path_factory.mktemp("verify")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    model = build_sdxl(root / "pipe", unet_overrides=SMALL_UNET)
    assert _quantize(model, root / "prompts.txt", root / "run", root / "out") == 0
    assert verify_export(root / "out") == []
    return root, model


def _copies(quantized, tmp_path) -> tuple[Path, Path, Path, Path]:
    root, model = quantized
    run = Path(shutil.copytree(root / "run", tmp_path / "run"))
    out = Path(shutil.copytree(root / "out", tmp_path / "out"))
    return model, root / "prompts.txt", run, out


def _edit_act_bits(out: Path) -> None:
    path = out / "unet" / "mixdq_quant.json"
    text = path.read_text()
    path.write_text(text.replace('"a_bits": 8', '"a_bits": 4', 1))


def _export_files(folder: Path) -> dict[str, str]:
    return {k: v for k, v in fingerprint(folder).items() if k != SETTINGS}


def test_quantize_again_repairs_a_damaged_export(quantized, tmp_path, capsys):
    """The issue's case: the weights file and vae/ gone, the same command run again.
    (Each kind of damage is named by `verify_export`: tests/deploy/test_export_integrity.)"""
    model, prompts, run, out = _copies(quantized, tmp_path)
    intact = _export_files(out)
    (out / "unet" / "mixdq_unet.safetensors").unlink()
    shutil.rmtree(out / "vae")
    capsys.readouterr()
    assert _quantize(model, prompts, run, out) == 0
    err = capsys.readouterr().err
    assert "not intact" in err and "exporting it again" in err, err
    for name in ("unet/mixdq_unet.safetensors: missing", "vae/: missing"):
        assert name in err, (name, err)
    assert _export_files(out) == intact  # the same export, byte for byte
    assert verify_export(out) == []


def test_quantize_again_trusts_an_intact_export(quantized, tmp_path, capsys):
    model, prompts, run, out = _copies(quantized, tmp_path)
    weights = out / "unet" / "mixdq_unet.safetensors"
    before = weights.stat().st_mtime_ns
    assert _quantize(model, prompts, run, out) == 0
    assert "not intact" not in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == before  # not written again


def test_generate_refuses_an_edited_export(quantized, tmp_path):
    out = Path(shutil.copytree(quantized[0] / "out", tmp_path / "edited"))
    _edit_act_bits(out)
    images = tmp_path / "images"
    proc = mixdq("generate", "--model", out, "--prompt", "a cat", "--height", "32", "--width",
                 "32", "--out", images)  # fmt: skip
    failed(proc, 2, "unet/mixdq_quant.json", "damaged export", "export it again")
    assert not list(images.glob("*.png"))
    qc = json.loads((out / "unet" / "config.json").read_text())["quantization_config"]
    assert (qc["method"], qc["target"]) == ("naive", "W8A8")  # the recipe that chose the bits
