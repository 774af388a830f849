"""``mixdq export --out``: checked before the packing work; a user's folder is refused
unless --overwrite, and no file the export did not write is ever deleted or moved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixdq_jax.deploy.checkpoint import EXPORT_UNET_FILES, META_FILE, check_export_folder
from mixdq_jax.deploy.export_folder import MANIFEST, begin_export, finish_export
from tests.cli.conftest import failed, fingerprint, mixdq


def _source(folder: Path, names=("vae/config.json", "vae/w.safetensors")) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_text("float unet")
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    return folder


def _export(src: Path, out: Path, **kw) -> None:
    """An export without the model: components placed, the UNet files stood in for."""
    plan = check_export_folder(src, out, **kw)
    begin_export(plan)
    for rel in EXPORT_UNET_FILES:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(rel)
    finish_export(plan)


def test_reexport_replaces_only_its_own_files(tmp_path):
    src = _source(tmp_path / "src", ("vae/config.json", "vae/old.safetensors"))
    out = tmp_path / "out"
    _export(src, out)
    assert (out / "vae" / "old.safetensors").is_file() and (out / MANIFEST).is_file()
    (src / "vae" / "old.safetensors").unlink()
    (src / "vae" / "new.safetensors").write_text("new")
    (out / "README.md").write_text("the user's notes")  # outside unet/: kept, not in the way
    _export(src, out)  # an earlier export: no --overwrite needed
    assert not (out / "vae" / "old.safetensors").exists()  # the tool wrote it: removed
    assert (out / "vae" / "new.safetensors").read_text() == "new"
    assert (out / "README.md").read_text() == "the user's notes"
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert "vae/new.safetensors" in files and "README.md" not in files
    (out / "unet" / ".mixdq_unet.safetensors.k9x_2abc.tmp").write_text("killed mid-write")
    _export(src, out, link_components=True)  # copies -> links, over its own files
    assert not (out / "unet" / ".mixdq_unet.safetensors.k9x_2abc.tmp").exists()
    assert (out / "vae").is_symlink() and (out / "README.md").is_file()
    _export(src, out)  # and back
    assert not (out / "vae").is_symlink() and (out / "vae" / "config.json").is_file()


def test_a_user_folder_is_refused_unless_overwrite(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "mine"
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "config.json").write_text("the user's config")
    (out / "photo.png").write_text("the user's photo")
    before = fingerprint(out)
    with pytest.raises(ValueError, match="not a folder written by mixdq export.*--overwrite"):
        check_export_folder(src, out)
    assert fingerprint(out) == before
    _export(src, out, overwrite=True)
    assert (out / "vae" / "config.json").read_text() == "vae/config.json"  # replaced: asked for
    assert (out / "photo.png").read_text() == "the user's photo"  # never touched


def test_float_unet_weights_beside_the_quantized_ones_are_refused(tmp_path):
    """``cp -r model out; mixdq export --out out``: the float UNet would sit unused."""
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    _export(src, out)
    stray = out / "unet" / "diffusion_pytorch_model.safetensors"
    stray.write_text("float weights the user copied")
    with pytest.raises(ValueError, match="unet/diffusion_pytorch_model.safetensors"):
        check_export_folder(src, out)
    with pytest.warns(UserWarning, match="kept unet/diffusion_pytorch_model.safetensors"):
        _export(src, out, overwrite=True)
    assert stray.read_text() == "float weights the user copied"


def test_a_user_file_in_the_way_is_refused_even_with_overwrite(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "vae").write_text("a file where the export needs a folder")
    with pytest.raises(ValueError, match="vae"):
        check_export_folder(src, out, overwrite=True)
    (out / "vae").unlink()
    (out / "vae").mkdir()
    (out / "vae" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="vae/mine.txt"):
        check_export_folder(src, out, link_components=True, overwrite=True)
    with pytest.raises(ValueError, match="inside the source"):
        check_export_folder(src, src / "quantized")


def test_export_cli_refuses_a_non_empty_user_folder(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"\x89PNG the user's")
    before = fingerprint(out)
    proc = mixdq("export", "--weight-bits", "8", "--out", out)
    failed(proc, 2, "mixdq export: error:", str(out), "holiday.png", "--overwrite")
    assert fingerprint(out) == before


def test_export_cli_into_a_copied_model_folder(tmp_path, model_copy):
    """Refused naming the float UNet file; with --overwrite written, the user's files kept."""
    (model_copy / "notes.txt").write_text("the user's")
    user_files = fingerprint(model_copy)
    proc = mixdq("export", "--weight-bits", "8", "--out", model_copy)
    failed(proc, 2, "unet/diffusion_pytorch_model.safetensors", "--overwrite")
    assert fingerprint(model_copy) == user_files
    proc = mixdq("export", "--weight-bits", "8", "--out", model_copy, "--overwrite")
    err = failed(proc, 0, "warning", "unet/diffusion_pytorch_model.safetensors")
    after = fingerprint(model_copy)
    assert (model_copy / "unet" / META_FILE).is_file(), err
    untouched = ("notes.txt", "unet/diffusion_pytorch_model.safetensors")
    assert all(after[k] == user_files[k] for k in untouched)
