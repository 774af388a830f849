"""An export's files are covered by checksums (its manifest), `verify_export` names any
damaged file, loading refuses an edited export, only the pipeline's components are taken
from the source, and ``unet/config.json`` carries a ``quantization_config``.

The references are independent of the code under test: ``hashlib`` over the files on disk,
the spec's own bits, the source folder's listing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.deploy import (
    ExportDamagedError,
    check_export,
    export_quantized_pipeline,
    load_quantized_pipeline,
    quantization_config,
    verify_export,
)
from mixdq_jax.deploy.checkpoint import EXPORT_UNET_FILES, verified_export
from mixdq_jax.deploy.export_folder import MANIFEST, begin_export, plan_export_folder
from mixdq_jax.quant import QuantSpec
from mixdq_jax.quant.registry import unet_layers

STRAY = ("sd_xl_base_1.0.safetensors", "README.md", "safety_checker/model.safetensors")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` (through links) but the manifest, by relative path."""
    out = {}
    for root, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(root) / name
            out[path.relative_to(folder).as_posix()] = path
    out.pop(MANIFEST, None)
    return out


@pytest.fixture(scope="module")
def source(pipe_dir, tmp_path_factory):
    """The tiny pipeline's folder with what a user's model folder may also hold: a
    single-file checkpoint, notes, and a component the pipeline does not load."""
    src = Path(shutil.copytree(pipe_dir, tmp_path_factory.mktemp("src") / "model"))
    for rel in STRAY:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"x" * 4096)
    (src / "LICENSE.md").write_text("the model's licence")  # travels with derived weights
    index = json.loads((src / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (src / "model_index.json").write_text(json.dumps(index))
    return src


@pytest.fixture(scope="module")
def spec(pipe):
    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    rng = np.random.default_rng(3)
    return QuantSpec(
        weight_bits={n: int(rng.choice([4, 8, 16])) for n in names},
        act_bits={n: int(rng.choice([8, 16])) for n in names},
    )


@pytest.fixture(scope="module")
def exported(pipe, ranges, spec, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "quantized"
    moved = dataclasses.replace(pipe, source=str(source))  # the same model, from the copy
    recipe = {"method": "mixdq", "target": "W4A8", "preset": "ours", "objective": None}
    meta = export_quantized_pipeline(
        moved, spec, out, calib=ranges, float_dtype=jnp.float32, recipe=recipe
    )
    return out, meta


@pytest.fixture
def copy(exported, tmp_path):
    """A private copy of the export to damage."""
    return Path(shutil.copytree(exported[0], tmp_path / "copy", symlinks=True))


def test_every_file_is_covered_by_its_size_and_sha256(exported):
    out, meta = exported
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is True and manifest["version"] == 2
    on_disk = _files(out)
    assert set(manifest["checksums"]) == set(on_disk)
    assert {"unet/mixdq_quant.json", "unet/config.json", "model_index.json"} <= set(on_disk)
    for rel, path in on_disk.items():
        assert manifest["checksums"][rel] == {"bytes": path.stat().st_size, "sha256": _sha(path)}
    assert meta["weights_sha256"] == _sha(out / "unet" / meta["weights_file"])
    assert verify_export(out) == [] and check_export(out) is True


def test_only_the_pipeline_components_are_taken(exported, source):
    out, _ = exported
    for rel in STRAY:
        assert not (out / rel).exists(), rel
    assert not (out / "safety_checker").exists()
    taken = {rel for rel in _files(out) if not rel.startswith("unet/")}
    used = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
    wanted = {rel for rel in _files(source) if rel.split("/")[0] in used}
    assert taken == wanted | {"model_index.json", "LICENSE.md"}
    assert (out / "LICENSE.md").read_text() == "the model's licence"
    for rel in wanted:
        assert _sha(out / rel) == _sha(source / rel), rel
    index = json.loads((out / "model_index.json").read_text())
    src_index = json.loads((source / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]  # not carried: says so, as diffusers does
    assert {k: v for k, v in index.items() if k != "safety_checker"} == {
        k: v for k, v in src_index.items() if k != "safety_checker"
    }


def test_quantization_config_states_the_bits(exported, spec):
    out, meta = exported
    config = json.loads((out / "unet" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "mixdq" and qc["version"] == 1
    assert (qc["method"], qc["target"], qc["preset"]) == ("mixdq", "W4A8", "ours")
    assert qc["objective"] is None and qc["noise_correction"] is None
    assert qc == quantization_config(json.loads((out / "unet" / "mixdq_quant.json").read_text()))
    # the spec's bits, for every layer not kept entirely float; a listed null is float
    quantized = {n for n in spec.weight_bits if min(spec.weight_bits[n], spec.act_bits[n]) < 16}
    assert set(qc["weight_bits"]) == set(qc["act_bits"]) == quantized
    for name in quantized:
        w, a = spec.weight_bits[name], spec.act_bits[name]
        assert qc["weight_bits"][name] == (None if w == 16 else w), name
        assert qc["act_bits"][name] == (None if a == 16 else a), name
    assert set(qc["weight_storage_bits"]) == {n for n in quantized if spec.weight_bits[n] < 16}
    assert set(qc["weight_storage_bits"].values()) <= {2, 4, 8}
    # the source's config otherwise unchanged
    src = json.loads((Path(meta["source"]) / "unet" / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == src


def _edit_meta(folder: Path) -> None:
    """A hand-edited activation bit-width: same length, so only the checksum can tell."""
    path = folder / "unet" / "mixdq_quant.json"
    text = path.read_text()
    assert '"a_bits": 8' in text
    path.write_text(text.replace('"a_bits": 8', '"a_bits": 4', 1))


def _edit_config(folder: Path) -> None:
    path = folder / "unet" / "config.json"
    text = path.read_text()
    assert '"sample_size": 16' in text
    path.write_text(text.replace('"sample_size": 16', '"sample_size": 32'))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


DAMAGE = {
    "deleted weights": (
        lambda f: (f / "unet" / "mixdq_unet.safetensors").unlink(),
        "unet/mixdq_unet.safetensors: missing",
    ),
    "deleted vae": (lambda f: shutil.rmtree(f / "vae"), "vae/: missing"),
    "edited metadata": (_edit_meta, "unet/mixdq_quant.json: content differs"),
    "edited config": (_edit_config, "unet/config.json: content differs"),
    "truncated text encoder": (
        lambda f: _truncate(f / "text_encoder" / "model.safetensors"),
        "text_encoder/model.safetensors: ",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_names_the_damaged_file(damage, copy):
    harm, named = DAMAGE[damage]
    harm(copy)
    problems = verify_export(copy)
    assert len(problems) == 1 and problems[0].startswith(named), problems
    meta, problems = verified_export(copy)  # what the quantize stage decides on
    assert problems and problems[0].startswith(named)
    with pytest.raises(ExportDamagedError, match=named.split(":")[0]):
        check_export(copy)


def test_truncation_is_found_from_sizes_alone(copy, monkeypatch):
    from mixdq_jax.deploy import export_folder

    _truncate(copy / "unet" / "mixdq_unet.safetensors")
    monkeypatch.setattr(export_folder, "file_digest", lambda path: pytest.fail("read"))
    (problem,) = verify_export(copy)
    assert problem.kind == "size" and "truncated" in problem


def test_loading_refuses_an_edited_export_and_says_what_to_do(copy):
    _edit_meta(copy)
    with pytest.raises(ExportDamagedError) as err:
        load_quantized_pipeline(copy)
    text = str(err.value)
    assert "unet/mixdq_quant.json" in text and "export it again" in text
    assert "verify=False" in text
    assert len(text.splitlines()) == 1  # the CLI shows the first lines of a message
    pipe = load_quantized_pipeline(copy, verify=False)  # the documented escape hatch
    edited = json.loads((copy / "unet" / "mixdq_quant.json").read_text())["plan"]
    name = next(n for n, lp in edited.items() if lp["a_bits"] == 4)
    assert pipe.quantized.mode.plan.layers[name].a_bits == 4


def test_loading_reads_each_file_once(exported, monkeypatch):
    """The folder's check covers the weights: the UNet loader does not hash them again."""
    from mixdq_jax.deploy import checkpoint, export_folder

    reads: list[str] = []
    original = export_folder.file_digest

    def counted(path):
        reads.append(Path(path).relative_to(exported[0]).as_posix())
        return original(path)

    monkeypatch.setattr(export_folder, "file_digest", counted)
    monkeypatch.setattr(checkpoint, "file_digest", counted)
    load_quantized_pipeline(exported[0])
    assert sorted(reads) == sorted(_files(exported[0]))


def test_an_export_older_than_the_checksums_loads_with_a_warning(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    v1 = {"format": manifest["format"], "source": "", "files": manifest["files"]}
    (copy / MANIFEST).write_text(json.dumps(v1))  # the manifest before checksums
    (problem,) = verify_export(copy)
    assert problem.kind == "unchecked" and "older mixdq-jax" in problem
    (copy / MANIFEST).unlink()  # before the manifest
    (problem,) = verify_export(copy)
    assert problem.kind == "unchecked" and problem.path == MANIFEST
    with pytest.warns(UserWarning, match="no checksums"):
        assert check_export(copy) is False
    meta, problems = verified_export(copy)
    assert meta is not None and [p.kind for p in problems] == ["unchecked"]  # re-exported
    assert json.loads(json.dumps(problems)) == [str(problem)]  # plain strings for --json


def test_an_interrupted_export_is_not_trusted(exported, source, tmp_path):
    out = Path(shutil.copytree(exported[0], tmp_path / "out"))
    plan = plan_export_folder(
        source, out, unet_files=EXPORT_UNET_FILES, meta_file="unet/mixdq_quant.json"
    )
    begin_export(plan)  # killed before the UNet was written
    (problem,) = verify_export(out)
    assert problem.kind == "incomplete" and "did not finish" in problem
    with pytest.raises(ExportDamagedError, match="did not finish"):
        load_quantized_pipeline(out)


def test_linked_components_are_covered_through_the_links(pipe, ranges, source, tmp_path):
    src = Path(shutil.copytree(source, tmp_path / "src"))
    moved = dataclasses.replace(pipe, source=str(src))
    out = tmp_path / "linked"
    export_quantized_pipeline(
        moved, QuantSpec(weight_bits=8), out, float_dtype=jnp.float32, link_components=True
    )
    assert (out / "vae").is_symlink() and not (out / "model_index.json").is_symlink()
    checks = json.loads((out / MANIFEST).read_text())["checksums"]
    assert checks["vae/config.json"]["sha256"] == _sha(src / "vae" / "config.json")
    assert verify_export(out) == []
    (src / "vae" / "config.json").write_text((src / "vae" / "config.json").read_text() + " ")
    (problem,) = verify_export(out)
    assert problem.path == "vae/config.json" and problem.kind == "size"
    shutil.rmtree(src / "vae")
    (problem,) = verify_export(out)
    assert problem.path == "vae/" and "broken link" in problem
