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


# ------------------------------------------------------------------------------ mixdq inspect
def _inspect(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["inspect", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_an_export(quantized, capsys):
    root, model = quantized
    code, text, _ = _inspect(capsys, root / "out", "--json", "--layers")
    assert code == 0
    summary = json.loads(text)
    assert (summary["kind"], summary["method"], summary["target"]) == ("export", "naive", "W8A8")
    assert summary["checksums"] == {"ok": True, "problems": []}
    plan = json.loads((root / "out" / "unet" / "mixdq_quant.json").read_text())["plan"]
    label = lambda b: "float" if b is None or b >= 16 else str(b)  # noqa: E731
    pairs: dict[tuple[str, str], int] = {}
    for layer in plan.values():
        key = (label(layer["w_bits"]), label(layer["a_bits"]))
        pairs[key] = pairs.get(key, 0) + 1
    assert {(r["weights"], r["acts"]): r["layers"] for r in summary["formats"]} == pairs
    assert set(summary["per_layer"]) == set(plan)
    # FP16 size: every tensor of the float UNet at two bytes (read with safetensors itself)
    from safetensors.numpy import load_file

    float_unet = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    sizes = summary["sizes"]
    assert sizes["fp16_bytes"] == 2 * sum(a.size for a in float_unet.values())
    assert sizes["unet_bytes"] == (root / "out" / "unet" / "mixdq_unet.safetensors").stat().st_size
    code, text, _ = _inspect(capsys, root / "out")
    assert code == 0 and "every file verified" in text and "naive" in text


def test_inspect_names_the_damage_and_exits_2(quantized, tmp_path, capsys):
    out = Path(shutil.copytree(quantized[0] / "out", tmp_path / "edited"))
    _edit_act_bits(out)
    code, text, _ = _inspect(capsys, out)
    assert code == 2 and "FAILED" in text and "unet/mixdq_quant.json" in text


def test_inspect_a_run_directory(quantized, capsys):
    root, _ = quantized
    code, text, _ = _inspect(capsys, root / "run", "--json")
    assert code == 0
    summary = json.loads(text)
    calib = summary["calibrate"]
    assert (calib["state"], calib["batches"], calib["batches_expected"]) == ("done", 2, 2)
    row = summary["quantize"]["W8A8_naive"]
    assert row["method"] == "naive" and Path(row["out"]) == root / "out"
    assert all(row["stages"][s] for s in ("weights", "acts", "export", "report"))
    code, text, _ = _inspect(capsys, root / "run")
    assert code == 0 and "calibrate    done" in text


def test_inspect_refuses_what_it_cannot_read(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    for path, words in ((tmp_path / "missing", "no such"), (tmp_path / "notes.txt", "not a folder"),
                        (tmp_path, "neither an exported")):  # fmt: skip
        code, _, err = _inspect(capsys, path)
        assert code == 2 and words in err and "Traceback" not in err, err
