"""The JAX CLIP score against transformers' CLIPModel and torchmetrics' CLIPScore on one tiny
random CLIP folder (written by ``save_pretrained``, with a real CLIP-format BPE tokenizer)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from mixdq_jax.evaluation import MissingWeightsError
from mixdq_jax.evaluation.clip_score import (
    CLIPImagePreprocess,
    load_clip_scorer,
    torchmetrics_clip_score,
)
from tests.evaluation.torchmetrics_import import import_torchmetrics
from tests.tiny_models import build_clip, clip_cosines

RTOL = 1e-4
LONG = "a small green square to the right of a yellow triangle " * 8  # > 77 tokens
PROMPTS = ["a photo of a red circle on a blue background", LONG, "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return build_clip(tmp_path_factory.mktemp("clip") / "openai-clip-tiny")


@pytest.fixture(scope="module")
def torch_clip(clip_folder):
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    return model, transformers.CLIPProcessor.from_pretrained(clip_folder)


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return load_clip_scorer(clip_folder)


def _images(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _chw(images: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images]


class _Transformers5Features(torch.nn.Module):
    """torchmetrics 1.9.0 expects ``get_*_features`` to return a tensor; transformers 5 returns
    an output whose ``pooler_output`` is that tensor (torchmetrics issue #3407, fixed after
    1.9.0). This unwraps it and changes nothing else."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def _reference_cosines(torch_clip, images, prompts):
    return clip_cosines(*torch_clip, images, prompts)


@pytest.mark.filterwarnings("ignore:Encountered caption longer")  # torchmetrics' own warning
@pytest.mark.parametrize("shape", [(3, 40, 52, 3), (3, 57, 31, 3)], ids=["wide", "tall"])
def test_score_matches_transformers_and_torchmetrics(scorer, torch_clip, shape):
    images = _images(sum(shape), shape)
    with pytest.warns(UserWarning, match="prompt 1 has .* tokens"):
        ours = scorer.score(images, PROMPTS, batch_size=2)  # batches of 2 and 1 (padded)

    np.testing.assert_allclose(ours, _reference_cosines(torch_clip, images, PROMPTS), rtol=RTOL)

    import_torchmetrics()
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = torch_clip
    metric = CLIPScore(model_name_or_path=lambda: (_Transformers5Features(model), processor))
    with torch.no_grad():
        reference = float(metric(_chw(images), PROMPTS))
    assert torchmetrics_clip_score(ours) == pytest.approx(reference, rel=RTOL)
    # one compile of each tower serves every batch (the last one is padded)
    assert scorer._image._cache_size() == 1 and scorer._text._cache_size() == 1


def test_preprocess_matches_clip_image_processor_legacy_config(tmp_path):
    """The released openai repos store ``"size": 224, "crop_size": 224`` (ints)."""
    legacy = {"crop_size": 24, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 3,
              "size": 24, "feature_extractor_type": "CLIPFeatureExtractor"}  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    reference = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
    ours = CLIPImagePreprocess.from_dict(legacy, where="test")
    for shape in [(33, 47, 3), (50, 25, 3), (24, 24, 3)]:
        image = _images(shape[0], shape)
        want = reference(images=_chw(image[None]), return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(ours(image), want.transpose(1, 2, 0))


def test_torchmetrics_clip_score_clamps_the_mean():
    assert torchmetrics_clip_score(np.array([0.3, -0.1])) == pytest.approx(10.0)
    assert torchmetrics_clip_score(np.array([0.1, -0.3])) == 0.0


def test_missing_weights_name_the_files(tmp_path, clip_folder):
    with pytest.raises(MissingWeightsError, match="no path given.*openai/clip-vit-large-patch14"):
        load_clip_scorer(None)
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        load_clip_scorer(tmp_path / "nowhere")
    partial = tmp_path / "no-weights"
    shutil.copytree(clip_folder, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=f"{partial} does not hold them"):
        load_clip_scorer(partial)


def test_bad_inputs_are_refused(scorer):
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(np.zeros((1, 30, 30, 3), np.float32), ["a"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(np.zeros((2, 30, 30, 3), np.uint8), ["a"])
