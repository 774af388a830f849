"""The evaluation run: images written as they go and resumed after a kill, the float images
cached across evaluations, SSIM/PSNR vs float against skimage, metrics.json, weights checked
before any image is generated. A small deterministic stand-in pipeline keeps this fast; the
metric networks are tested against their references in their own files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mixdq_jax.cli import main
from mixdq_jax.evaluation import MissingWeightsError, fid
from mixdq_jax.evaluation.coco import Prompt, PromptSet
from mixdq_jax.evaluation.images import GenerationSettings, describe_set, generate_set, read_png
from mixdq_jax.evaluation.run import (
    EvalRequest,
    MetricWeights,
    Subject,
    evaluate_model,
    parse_metrics,
)
from mixdq_jax.pipeline import seed_keys

SIZE = 15  # odd: skimage's SSIM with the whole image as its window
PROMPTS = ["a red circle", "a blue square", "a green triangle", "two dogs", "a bus"]


class Killed(Exception):
    pass


class FakePipe:
    """Images from the latents (and the prompt's length): deterministic, per image, so a
    resumed set can be compared with one made in a single pass. A qconfig coarsens them."""

    vae_scale_factor = 1
    image_size = (SIZE, SIZE)

    def __init__(self, kill_after: int | None = None):
        self.unet = SimpleNamespace(config=SimpleNamespace(in_channels=3))
        self.calls: list[list[str]] = []
        self.kill_after = kill_after

    def __call__(self, prompts, *, num_inference_steps, guidance_scale, height, width, latents,
                 seed, qconfig):  # fmt: skip
        if self.kill_after is not None and len(self.calls) >= self.kill_after:
            raise Killed
        self.calls.append(list(prompts))
        lat = np.asarray(latents).transpose(0, 2, 3, 1)
        shift = np.array([len(p) % 5 for p in prompts])[:, None, None, None] * 0.05
        img = 1.0 / (1.0 + np.exp(-lat)) * 0.8 + shift
        return np.round(img * 6) / 6 if qconfig is not None else img


def expected_image(prompt: str, seed: int) -> np.ndarray:
    """What image ``seed`` should be: the fake pipe on the latents pipe(seed=seed) draws."""
    lat = np.asarray(jax.random.normal(seed_keys(seed)[0], (1, 3, SIZE, SIZE)))
    img = FakePipe()([prompt], num_inference_steps=1, guidance_scale=0.0, height=SIZE,
                     width=SIZE, latents=lat, seed=seed, qconfig=None)[0]  # fmt: skip
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def settings(**kw) -> GenerationSettings:
    return GenerationSettings(**{"height": SIZE, "width": SIZE, "batch": 2, "seed": 10, **kw})


def _make(folder, pipe, s=None):
    s = s or settings()
    desc = describe_set({"path": "fake"}, "float", PROMPTS, s)
    return generate_set(pipe, PROMPTS, folder, settings=s, description=desc, progress=False)


def test_images_index_and_resume_after_kill(tmp_path):
    folder = tmp_path / "images"
    with pytest.raises(Killed):
        _make(folder, FakePipe(kill_after=1))
    index = json.loads((folder / "index.json").read_text())
    assert [e["file"] for e in index] == ["00000.png", "00001.png"]
    resumed = FakePipe()
    images = _make(folder, resumed)
    assert resumed.calls == [PROMPTS[2:4], [PROMPTS[4], PROMPTS[4]]]  # only what was missing
    index = json.loads((folder / "index.json").read_text())
    assert index == [{"file": f"{i:05d}.png", "prompt": p, "seed": 10 + i}
                     for i, p in enumerate(PROMPTS)]  # fmt: skip
    for i, p in enumerate(PROMPTS):
        np.testing.assert_array_equal(read_png(folder / f"{i:05d}.png"), expected_image(p, 10 + i))
    np.testing.assert_array_equal(images.load(0, 5), np.stack(
        [expected_image(p, 10 + i) for i, p in enumerate(PROMPTS)]))  # fmt: skip


def test_resume_with_other_settings_is_refused(tmp_path):
    _make(tmp_path / "images", FakePipe())
    with pytest.raises(ValueError, match=r"settings\.steps differs: was 1, now 4"):
        _make(tmp_path / "images", FakePipe(), settings(steps=4))


def _prompts() -> PromptSet:
    return PromptSet(prompts=tuple(Prompt(text=p) for p in PROMPTS), source="test", kind="text",
                     select="first", seed=0, available=len(PROMPTS))  # fmt: skip


def _evaluate(out, pipe, metrics, *, cache, loads, weights=None, quantization="q", qconfig="q"):
    weights = weights or MetricWeights()

    def load_float():
        loads.append(1)
        return FakePipe()

    request = EvalRequest(metrics=metrics, weights=weights, generation=settings(), metric_batch=2)
    subject = Subject(pipe=pipe, identity={"path": "fake"}, quantization=quantization,
                      qconfig=qconfig, float_identity={"path": "fake-float"},
                      load_float=load_float)  # fmt: skip
    return evaluate_model(subject, _prompts(), out, request=request, cache=cache,
                          efficiency={"compute": {"compute_opt": 4.0}}, progress=False)  # fmt: skip


def test_vs_float_metrics_equal_skimage_and_float_images_are_cached(tmp_path):
    loads: list[int] = []
    cache = tmp_path / "cache"
    result = _evaluate(tmp_path / "w8a8", FakePipe(), ("ssim", "psnr"), cache=cache, loads=loads)
    gen = np.stack([read_png(tmp_path / "w8a8" / "images" / f"{i:05d}.png") for i in range(5)])
    ref = np.stack([expected_image(p, 10 + i) for i, p in enumerate(PROMPTS)])
    ssim = np.mean([structural_similarity(a, b, win_size=SIZE, channel_axis=-1, data_range=255)
                    for a, b in zip(gen, ref, strict=True)])  # fmt: skip
    psnr = np.mean([peak_signal_noise_ratio(b, a, data_range=255)
                    for a, b in zip(gen, ref, strict=True)])  # fmt: skip
    assert result["ssim_vs_fp"] == pytest.approx(ssim, rel=1e-5)
    assert result["psnr_vs_fp"] == pytest.approx(psnr, rel=1e-5)
    assert 0.3 < ssim < 0.99
    on_disk = json.loads((tmp_path / "w8a8" / "metrics.json").read_text())
    assert on_disk["ssim_vs_fp"] == result["ssim_vs_fp"] and on_disk["compute"]["compute_opt"] == 4
    assert on_disk["fid"] is None and on_disk["clip_score"] is None
    assert on_disk["settings"]["generation"]["seed"] == 10
    assert on_disk["settings"]["prompts"]["num"] == 5
    assert loads == [1] and result["psnr_identical_images"] == 0
    # another quantized model on the same prompts: the float images come from the cache
    _evaluate(tmp_path / "w4a8", FakePipe(), ("ssim",), cache=cache, loads=loads,
              quantization="other")  # fmt: skip
    assert loads == [1]


def test_a_rerun_with_other_metrics_keeps_the_earlier_ones(tmp_path):
    """SSIM today, PSNR tomorrow on the same images: metrics.json holds both."""
    loads: list[int] = []
    first = _evaluate(tmp_path / "o", FakePipe(), ("ssim",), cache=tmp_path / "c", loads=loads)
    pipe = FakePipe()
    second = _evaluate(tmp_path / "o", pipe, ("psnr",), cache=tmp_path / "c", loads=loads)
    assert pipe.calls == [] and loads == [1]  # neither set generated again
    on_disk = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert on_disk["ssim_vs_fp"] == first["ssim_vs_fp"] and on_disk["psnr_vs_fp"] is not None
    assert on_disk["settings"]["metrics"] == ["ssim", "psnr"] == second["settings"]["metrics"]


def test_identical_images_have_no_psnr(tmp_path):
    """A model whose images equal the float ones (say W8A16 on an easy prompt): SSIM 1, and
    PSNR, infinite per image, is left out of the mean and counted."""
    result = _evaluate(tmp_path / "o", FakePipe(), ("ssim", "psnr"), cache=tmp_path / "c",
                       loads=[], qconfig=None)  # fmt: skip
    assert result["ssim_vs_fp"] == pytest.approx(1.0)
    assert result["psnr_vs_fp"] is None and result["psnr_identical_images"] == 5


def test_weights_are_checked_before_generating(tmp_path):
    pipe = FakePipe()
    for metrics, error, match in [
        (("clip",), MissingWeightsError, "CLIP"),
        (("fid",), MissingWeightsError, "weights-inception-2015-12-05"),
        (("lpips",), MissingWeightsError, "LPIPS"),
    ]:
        with pytest.raises(error, match=match):
            _evaluate(tmp_path / "out", pipe, metrics, cache=tmp_path, loads=[])
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="--reference-images DIR"):
        _evaluate(tmp_path / "out", pipe, ("fid",), cache=tmp_path, loads=[],
                  weights=MetricWeights(inception=weights))  # fmt: skip
    assert pipe.calls == []
    assert not (tmp_path / "out" / "images").exists()


def test_fid_of_the_generated_set(tmp_path, monkeypatch):
    """The FID path end to end with a small stand-in feature network (the Inception port and
    the Frechet distance are checked against torch-fidelity and torchmetrics elsewhere)."""
    from PIL import Image

    from mixdq_jax.evaluation import inception

    def tiny(images):
        x = images.astype(np.float64) / 255.0
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)),
                               x[:, ::4, ::4, 0].reshape(len(x), -1)], axis=1)  # fmt: skip

    seen = []
    monkeypatch.setattr(inception, "feature_extractor", lambda path: seen.append(path) or tiny)
    monkeypatch.setattr(inception, "check_inception", lambda path: None)  # a stand-in file
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(real / f"{i}.jpg")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in")
    result = _evaluate(tmp_path / "out", FakePipe(), ("fid",), cache=tmp_path / "cache", loads=[],
                       weights=MetricWeights(inception=weights, reference_images=real))  # fmt: skip
    gen = np.stack([read_png(tmp_path / "out" / "images" / f"{i:05d}.png") for i in range(5)])
    ref = np.stack([fid.load_reference_image(p, (SIZE, SIZE)) for p in sorted(real.iterdir())])
    a, b = tiny(gen), tiny(ref)
    mu_a, mu_b = a.mean(0), b.mean(0)
    from scipy import linalg

    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb)
                - 2 * np.trace(linalg.sqrtm(sa @ sb).real))  # fmt: skip
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert seen == [weights] and result["settings"]["fid_reference"]["images"] == 12


def test_parse_metrics_and_cli_errors(tmp_path, capsys):
    assert parse_metrics("psnr, FID,clip") == ("fid", "clip", "psnr")
    with pytest.raises(ValueError, match="unknown: \\['bleu'\\]"):
        parse_metrics("fid,bleu")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["evaluate", "--metrics", "fid"]) == 2
    assert "needs --prompts FILE" in capsys.readouterr().err
    args = ["evaluate", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    assert main([*args, "--metrics", "clip"]) == 2  # before any model is loaded
    assert "CLIP score: needs" in capsys.readouterr().err


def test_the_command_on_the_testbed_matches_generate(tmp_path):
    """`mixdq evaluate --prompts` end to end on the shipped testbed: its images are the ones
    `mixdq generate` makes with the same options (image i: seed + i), the float images come
    from the cache, and SSIM/PSNR are the paper's formula and skimage's on those files."""
    from tests.test_metrics import np_global_ssim

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square on the left\na green triangle\n")
    common = ["--model", "testbed", "--seed", "5"]
    args = ["evaluate", *common, "--prompts", str(prompts), "--metrics", "psnr,ssim",
            "--weight-bits", "4", "--batch", "2", "--out", str(tmp_path / "eval"),
            "--cache", str(tmp_path / "cache")]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    index = json.loads((tmp_path / "eval" / "images" / "index.json").read_text())
    assert [e["seed"] for e in index] == [5, 6, 7]

    def pngs(folder):
        return np.stack([read_png(p) for p in sorted(Path(folder).glob("*.png"))])

    ours, cached = pngs(tmp_path / "eval" / "images"), pngs(metrics["settings"]["float_images"])
    for name, quant, made in (("w4", ["--weight-bits", "4"], ours), ("fp", [], cached)):
        assert main(["generate", *common, "--prompts-file", str(prompts), *quant,
                     "--out", str(tmp_path / name)]) == 0  # fmt: skip
        assert np.abs(pngs(tmp_path / name).astype(int) - made.astype(int)).max() <= 1
    ssim = np.mean([np_global_ssim(a, b, 255) for a, b in zip(ours, cached, strict=True)])
    psnr = np.mean([peak_signal_noise_ratio(b, a, data_range=255)
                    for a, b in zip(ours, cached, strict=True)])  # fmt: skip
    assert metrics["ssim_vs_fp"] == pytest.approx(ssim, rel=1e-5)
    assert metrics["psnr_vs_fp"] == pytest.approx(psnr, rel=1e-5)
    assert metrics["storage"]["storage_opt"] > 3.0 and metrics["compute"]["compute_opt"] == 1.0
    assert metrics["fid"] is None and metrics["settings"]["metrics"] == ["ssim", "psnr"]
