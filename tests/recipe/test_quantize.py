"""`mixdq quantize` end to end on a tiny SDXL: a run killed in any stage resumes to what an
uninterrupted run writes, byte for byte (the calibration and sweep files for a kill in those
stages, whose later stages are then functions of the same files; the quantized folder and
the chosen bits for a kill in any later stage)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mixdq_jax import rundir
from mixdq_jax.api import load_pipeline
from mixdq_jax.cli import main
from mixdq_jax.deploy import checkpoint
from mixdq_jax.deploy.layers import Deployed
from mixdq_jax.methods import METHODS, Target
from mixdq_jax.recipe import RecipeConfig, quantize
from mixdq_jax.recipe import run as recipe_run
from tests.tiny_models import build_sdxl

PROMPTS = ["a red cube", "a blue ball on grass", "a cat", "two green cones"]
ARGS = ["--target", "W4A8", "--num-calib", "2", "--num-select", "2", "--batch-size", "1",
        "--chunk", "32"]  # fmt: skip
SMALL_UNET = dict(layers_per_block=1, transformer_layers_per_block=(1, 1))  # 85 layers


class Killed(BaseException):
    """Stands for SIGKILL: nothing below the raise runs, no handler catches it."""


def _tree(folder: Path) -> dict[str, str]:
    """Every file's sha256, but the command's settings record (`mixdq quantize` writes it,
    the library calls of the resumed runs do not)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "mixdq_settings.json"
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return build_sdxl(root / "pipe", unet_overrides=SMALL_UNET), root / "prompts.txt"


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The uninterrupted command: its output folder and run directory."""
    pipe_dir, prompts = model
    root = tmp_path_factory.mktemp("reference")
    code = main(["quantize", "--model", str(pipe_dir), "--prompts", str(prompts), *ARGS,
                 "--run", str(root / "run"), "--out", str(root / "out")])  # fmt: skip
    assert code == 0
    return root


@pytest.fixture(scope="module")
def pipe(model):
    return load_pipeline(model[0])


def _config() -> RecipeConfig:
    return RecipeConfig(calib_prompts=PROMPTS[:2], select_prompts=PROMPTS[2:], batch_size=1,
                        chunk=32)  # fmt: skip


def test_the_command_writes_a_loadable_folder_and_an_honest_report(reference, model):
    report = json.loads((reference / "run" / "quantize" / "W4A8_mixdq" / "report.json").read_text())
    assert report["target"] == "W4A8" and report["method"] == "mixdq"
    # what the row is: preset, the integer program's objective, the method's settings
    assert (report["preset"], report["objective"]) == ("ours", "noise")
    assert report["method_settings"]["name"] == "mixdq"
    markdown = (reference / "run" / "quantize" / "W4A8_mixdq" / "report.md").read_text()
    assert markdown.startswith("# mixdq quantize: W4A8 mixdq (ours preset, noise objective)")
    assert report["act_effective_bits"] <= 8.0 + 1e-9
    assert 3.5 <= report["weight_avg_bits"] <= 4.02
    assert report["unet_mb"] < report["float_unet_mb"]
    assert report["storage_opt"] == report["float_unet_mb"] / report["unet_mb"]
    # W4A8: below uniform W4A8 8x (float-protected layers count 16 x 16), well above 1x
    assert 2.0 < report["compute_opt"] < 8.0
    assert 0.0 <= report["mse_vs_fp"] < 0.1 and report["ssim_vs_fp"] > 0.5
    quantized = load_pipeline(reference / "out")
    assert isinstance(quantized.quantized.mode, Deployed)  # runs on the packed integer path
    image = quantized(PROMPTS[2])
    assert image.shape == (1, *quantized.image_size, 3)


# A kill inside the sweep is left to tests/sensitivity/test_sweep.py (the recipe's sensitivity
# stage is `sweep`, whose killed-and-resumed results are checked identical there).
STAGE_FAULTS = {
    # stage: (object, attribute, calls that succeed before the kill)
    "calibrate": (rundir.RunDir, "write_batch", 1),
    "weights": (rundir.RunDir, "write_candidate_scores", 1),
    "acts": (rundir.RunDir, "write_candidate_scores", 1),  # weights chosen, acts half scored
    "export": (checkpoint, "save_quantized_unet", 0),  # components copied, UNet not
    "after-export": (rundir.RunDir, "write_export_record", 0),  # export done, record not yet
}
RECIPE = Path("quantize", "W4A8_mixdq")
# What a killed stage starts from: the reference run's files of the stages before it (later
# stages are functions of those files, so a stage need not re-run what precedes it).
DONE_BEFORE = {
    "calibrate": (),
    "weights": ("calib", "sensitivity"),
    "acts": ("calib", "sensitivity", *(RECIPE / f for f in ("settings.json",
             "weight_candidates.json", "weight_bits.json", "weight.yaml"))),
    "export": ("calib", "sensitivity", RECIPE),
    "after-export": ("calib", "sensitivity", RECIPE),
}  # fmt: skip
STOP_AFTER = {"calibrate": "calibrate"}


def _copy_done(reference: Path, run: Path, stage: str) -> None:
    for rel in DONE_BEFORE[stage]:
        src, dst = reference / rel, run / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    for later in ("export.json", "report.json", "report.md"):  # the stages under test
        (run / RECIPE / later).unlink(missing_ok=True)


def _arrays(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every array of every ``.npz`` under ``folder``, as bytes."""
    out = {}
    for path in sorted(folder.rglob("*.npz")):
        with np.load(path) as data:
            out[str(path.relative_to(folder))] = {k: data[k].tobytes() for k in data.files}
    return out


@pytest.mark.parametrize("stage", list(STAGE_FAULTS))
def test_a_run_killed_in_any_stage_resumes_to_the_same_result(
    stage, reference, pipe, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    _copy_done(reference / "run", run, stage)
    owner, name, survive = STAGE_FAULTS[stage]
    original = getattr(owner, name)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        if calls["n"] >= survive:
            raise Killed(stage)
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)
    kw = dict(target=Target.parse("W4A8"), method=METHODS["mixdq"], out=tmp_path / "out")
    kw["stop_after"] = STOP_AFTER.get(stage, "report")
    with pytest.raises(Killed):
        quantize(pipe, run, _config(), **kw)
    monkeypatch.setattr(owner, name, original)
    quantize(pipe, run, _config(), **kw)
    if stage == "calibrate":
        assert _arrays(run / "calib") == _arrays(reference / "run" / "calib")
        return
    assert _tree(tmp_path / "out") == _tree(reference / "out")
    for kind in ("weight", "act"):
        path = Path("quantize", "W4A8_mixdq", f"{kind}_bits.json")
        assert (run / path).read_text() == (reference / "run" / path).read_text()


def test_stop_after_runs_one_stage_and_the_rest_resumes(reference, pipe, tmp_path):
    shutil.copytree(reference / "run" / "calib", tmp_path / "run" / "calib")
    kw = dict(target=Target.parse("W4A8"), method=METHODS["naive"])
    assert quantize(pipe, tmp_path / "run", _config(), stop_after="weights", **kw) is None
    assert not (tmp_path / "run" / "quantize" / "W4A8_naive" / "act_bits.json").exists()
    report = quantize(pipe, tmp_path / "run", _config(), **kw)
    assert report["act_float_layers"] == [] and report["act_effective_bits"] == 8.0
    assert report["weight_avg_bits"] == 4.0
    assert not (tmp_path / "run" / "sensitivity").exists()  # uniform bits need no sweep


def test_a_resumed_recipe_with_other_settings_is_refused(reference, pipe, tmp_path):
    shutil.copytree(reference / "run", tmp_path / "run")
    other = RecipeConfig(calib_prompts=PROMPTS[:2], select_prompts=PROMPTS[1:3], batch_size=1,
                         chunk=32)  # fmt: skip
    with pytest.raises(ValueError, match="select_prompts"):
        quantize(pipe, tmp_path / "run", other, target=Target.parse("W4A8"),
                 method=METHODS["mixdq"])  # fmt: skip


def test_fp8_is_fake_quant_only_and_the_report_says_so(reference, pipe, tmp_path):
    shutil.copytree(reference / "run" / "calib", tmp_path / "run" / "calib")
    kw = dict(target=Target.parse("W8A8"), method=METHODS["fp8"])
    with pytest.raises(ValueError, match="no packed export"):
        quantize(pipe, tmp_path / "run", _config(), out=tmp_path / "out", **kw)
    report = quantize(pipe, tmp_path / "run", _config(), **kw)
    assert report["unet_mb"] is None and report["act_effective_bits"] == 8.0
    assert "no packed export" in recipe_run.report_markdown(report)


EVAL_PROMPTS = ["a red cube on grass", "two blue balls", "a green cone"]


def test_the_report_carries_the_papers_metrics(reference, model, tmp_path):
    """`mixdq quantize --eval-prompts`: the report's SSIM/PSNR and CLIP score are those of the
    chosen model's images, made as `mixdq generate` makes them from the chosen bits files,
    against the float model's, scored by skimage and transformers' CLIPModel."""
    import transformers
    from skimage.metrics import peak_signal_noise_ratio

    from mixdq_jax.evaluation.images import read_png
    from tests.test_metrics import np_global_ssim
    from tests.tiny_models import build_clip, clip_cosines

    pipe_dir, prompts = model
    run = tmp_path / "run"
    shutil.copytree(reference / "run", run)
    (tmp_path / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    clip = build_clip(tmp_path / "openai-clip-tiny")
    args = ["quantize", "--model", str(pipe_dir), "--prompts", str(prompts), *ARGS, "--run",
            str(run), "--eval-prompts", str(tmp_path / "eval.txt"), "--eval-batch", "2",
            "--eval-cache", str(tmp_path / "cache"), "--clip-model", str(clip)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((run / RECIPE / "report.json").read_text())
    values = report["evaluation"]
    assert values["prompts"] == 3 and set(values) >= {"ssim_vs_fp", "psnr_vs_fp", "clip_score"}
    assert "lpips_vs_fp" not in values and "fid" not in values  # no weights given for them
    assert "3 evaluation prompts" in (run / RECIPE / "report.md").read_text()

    # the same images, the way a user makes them: `mixdq generate` with the chosen bits
    out = {}
    for name, quant in (("float", []), ("quant", [
        "--weight-bits", str(run / RECIPE / "weight.yaml"),
        "--act-bits", str(run / RECIPE / "act.yaml"), "--calib", str(run),
    ])):  # fmt: skip
        assert main(["generate", "--model", str(pipe_dir), "--prompts-file",
                     str(tmp_path / "eval.txt"), "--out", str(tmp_path / name), *quant]) == 0
        out[name] = np.stack([read_png(p) for p in sorted((tmp_path / name).glob("*.png"))])
    def pngs(folder):
        return np.stack([read_png(p) for p in sorted(Path(folder).glob("*.png"))])

    ours = pngs(Path(values["out"], "images"))
    settings = json.loads(Path(values["out"], "metrics.json").read_text())["settings"]
    float_images = pngs(settings["float_images"])
    assert ours.shape == out["quant"].shape == (3, *load_pipeline(pipe_dir).image_size, 3)
    for made, user in ((ours, out["quant"]), (float_images, out["float"])):
        assert np.abs(made.astype(int) - user.astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - float_images.astype(int)).max() > 1  # quantized differs

    ssim = np.mean([np_global_ssim(a, b, 255) for a, b in zip(ours, float_images, strict=True)])
    psnr = np.mean([peak_signal_noise_ratio(b, a, data_range=255)
                    for a, b in zip(ours, float_images, strict=True)])  # fmt: skip
    assert values["ssim_vs_fp"] == pytest.approx(ssim, rel=1e-5)
    assert values["psnr_vs_fp"] == pytest.approx(psnr, rel=1e-5)
    reference_clip = clip_cosines(transformers.CLIPModel.from_pretrained(clip).eval(),
                                  transformers.CLIPProcessor.from_pretrained(clip), ours,
                                  EVAL_PROMPTS)  # fmt: skip
    assert values["clip_score"] == pytest.approx(float(reference_clip.mean()), rel=1e-4)


def test_a_method_from_a_plugin_file_runs_the_whole_recipe(reference, model, tmp_path):
    """`mixdq quantize --plugin examples/custom_method.py --method example`: allocate, refine
    (the example's clip search), export and report, nothing of the method inside mixdq_jax/
    (calibration and sweep copied from the reference run: the same prompts and settings)."""
    pipe_dir, prompts = model
    example = Path(__file__).resolve().parents[2] / "examples" / "custom_method.py"
    run = tmp_path / "run"
    for rel in ("calib", "sensitivity"):
        shutil.copytree(reference / "run" / rel, run / rel)
    # W4A16: the reference's weight budget, no activation candidates to render (test time)
    args = [a if a != "W4A8" else "W4A16" for a in ARGS]
    code = main(["quantize", "--plugin", str(example), "--method", "example", "--model",
                 str(pipe_dir), "--prompts", str(prompts), *args, "--run", str(run),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    key = run / "quantize" / "W4A16_example"
    report = json.loads((key / "report.json").read_text())
    assert report["method"] == "example" and report["clip_search"]["clipped"] > 0
    assert json.loads((key / "settings.json").read_text())["method"]["clip_search"]["p"] == 2.4
    # the same weight allocation as MixDQ's at W4A8 (same sweeps, same budget, chosen with
    # float activations), then the clip search on every quantized weight
    mixdq = reference / "run" / RECIPE
    w_bits = json.loads((key / "weight_bits.json").read_text())
    assert w_bits == json.loads((mixdq / "weight_bits.json").read_text())
    ratios = json.loads((key / "clip_search" / "ratios.json").read_text())
    assert set(ratios) == {n for n, b in w_bits.items() if b < 16}
    quantized = load_pipeline(tmp_path / "out")  # the export loads and generates
    assert np.isfinite(np.asarray(quantized(PROMPTS[2]))).all()
    # without the plugin the name is unknown: exit 2 naming it
    assert main(["quantize", "--method", "example2", "--run", str(tmp_path / "r2"),
                 "--target", "W8A8"]) == 2  # fmt: skip
