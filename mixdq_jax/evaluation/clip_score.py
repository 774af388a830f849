"""CLIP score (Hessel et al. 2021) of generated images against their prompts, in JAX.

The paper reports the mean cosine similarity of CLIP image and text embeddings (0.2722 for
SDXL-turbo FP16); torchmetrics' ``CLIPScore`` reports ``max(100 * mean cosine, 0)``. Both come
from ``CLIPScorer.score`` (per-image cosines) and ``torchmetrics_clip_score``.

Inputs are prepared exactly as torchmetrics' ``CLIPScore`` prepares them with the same folder:

- images: transformers' ``CLIPImageProcessor`` (its PIL backend, which is also what the original
  CLIP code does): PIL resize of the shortest side (bicubic for CLIP), center crop (top-left
  rounded down), ``uint8 * rescale_factor`` then ``(x - mean) / std`` in float32;
- text: ``bos + tokens + eos``, then cut to ``max_position_embeddings`` (77) tokens. Like
  torchmetrics, a longer caption loses its eos and is pooled at the first token; COCO captions
  are far shorter, and a warning names any prompt this happens to.

A transformers installation with torchvision uses its torchvision image backend instead of PIL,
whose antialiased bicubic resize gives slightly different pixels (not measured here: torchvision
cannot be installed beside this project's CPU torch), so compare numbers from one
preprocessing only.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mixdq_jax.evaluation.clip_model import CLIPConfig, CLIPModel
from mixdq_jax.evaluation.errors import MissingWeightsError
from mixdq_jax.tokenizer import CLIPTokenizer
from weights_convert.checkpoint import CheckpointError, load_component_weights, resolve_model_path
from weights_convert.convert import torch_to_flax

METRIC = "CLIP score"
EXPECTED = (
    "a transformers CLIP folder as CLIPModel/CLIPProcessor.save_pretrained write it: "
    "config.json, model.safetensors, preprocessor_config.json (or processor_config.json) and the "
    "tokenizer files (vocab.json + merges.txt, or tokenizer.json)"
)
SOURCE = (
    "the Hugging Face repo openai/clip-vit-large-patch14 (the CLIP model torchmetrics and the "
    "text-to-image papers use), e.g. `hf download openai/clip-vit-large-patch14 config.json "
    "model.safetensors preprocessor_config.json tokenizer_config.json vocab.json merges.txt "
    "special_tokens_map.json tokenizer.json --local-dir DIR`"
)
_UNUSED_KEYS = ("logit_scale",)  # the contrastive temperature: not part of a score
_PIL_FILTERS = (0, 1, 2, 3, 4, 5)  # nearest, lanczos, bilinear, bicubic, box, hamming


@dataclass(frozen=True, kw_only=True)
class CLIPImagePreprocess:
    """What ``CLIPImageProcessor`` does to an image, read from the folder's config."""

    shortest_edge: int | None = 224  # resize so the short side is this (aspect kept) ...
    resize_to: tuple[int, int] | None = None  # ... or to exactly (height, width)
    crop: tuple[int, int] | None = (224, 224)  # center crop (height, width); None: no crop
    resample: int = 3  # a PIL filter code; 3 = bicubic
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, float, float] | None = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] | None = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        if self.resample not in _PIL_FILTERS:
            raise ValueError(f"CLIPImagePreprocess.resample must be a PIL filter code "
                             f"{_PIL_FILTERS}, got {self.resample!r}")  # fmt: skip
        if (self.mean is None) != (self.std is None):
            raise ValueError("CLIPImagePreprocess: mean and std come together")

    @classmethod
    def from_dict(cls, cfg: dict, *, where: str) -> CLIPImagePreprocess:
        """From an image-processor config dict, with transformers' defaults and legacy forms
        (``"size": 224`` means the shortest edge, ``"crop_size": 224`` a square)."""
        defaults = cls()
        size = cfg.get("size", {"shortest_edge": 224}) if cfg.get("do_resize", True) else None
        shortest, resize_to = None, None
        if isinstance(size, int):
            shortest = size
        elif isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        elif isinstance(size, dict) and {"height", "width"} <= size.keys():
            resize_to = (int(size["height"]), int(size["width"]))
        elif size is not None:
            raise ValueError(f"{where}: image 'size' {size!r} is not supported (expected an int, "
                             "{'shortest_edge': n} or {'height': h, 'width': w})")  # fmt: skip
        crop = cfg.get("crop_size", {"height": 224, "width": 224})
        if not cfg.get("do_center_crop", True):
            crop = None
        elif isinstance(crop, int):
            crop = (crop, crop)
        elif isinstance(crop, dict) and {"height", "width"} <= crop.keys():
            crop = (int(crop["height"]), int(crop["width"]))
        else:
            raise ValueError(f"{where}: 'crop_size' {crop!r} is not supported")
        rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else None
        normalize = cfg.get("do_normalize", True)
        mean = tuple(cfg.get("image_mean", defaults.mean)) if normalize else None
        std = tuple(cfg.get("image_std", defaults.std)) if normalize else None
        return cls(
            shortest_edge=shortest, resize_to=resize_to, crop=crop,
            resample=int(cfg.get("resample", 3)), rescale_factor=rescale, mean=mean, std=std,
        )  # fmt: skip

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One uint8 ``[H, W, 3]`` image -> float32 ``[h, w, 3]`` model input."""
        h, w = image.shape[:2]
        if self.shortest_edge is not None:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)  # transformers' rounding: down
            size = (new_long, self.shortest_edge) if w <= h else (self.shortest_edge, new_long)
        else:
            size = self.resize_to
        if size is not None:
            pil = Image.fromarray(image).resize((size[1], size[0]), resample=self.resample)
            image = np.asarray(pil)
        if self.crop is not None:
            (h, w), (ch, cw) = image.shape[:2], self.crop
            if ch > h or cw > w:
                raise ValueError(f"image of {h}x{w} after resizing is smaller than the "
                                 f"{ch}x{cw} center crop")  # fmt: skip
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image[top : top + ch, left : left + cw]
        x = image.astype(np.float64)
        if self.rescale_factor is not None:
            x = x * self.rescale_factor
        x = x.astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x


def _check_batch(images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return images


def _batches(n: int, batch_size: int):
    """``(start, stop)`` pairs covering ``range(n)``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows``: every batch has one shape, one compile."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


class CLIPScorer:
    """A loaded CLIP model: ``score(images, prompts)`` gives the per-image cosine similarity."""

    def __init__(
        self,
        model: CLIPModel,
        params: dict,
        tokenizer: CLIPTokenizer,
        preprocess: CLIPImagePreprocess,
    ):
        self.model, self.params = model, params
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.max_tokens = model.config.text.max_position_embeddings
        self._image = jax.jit(
            lambda p, x: model.apply({"params": p}, x, method=CLIPModel.image_features)
        )
        self._text = jax.jit(
            lambda p, ids, mask: model.apply(
                {"params": p}, ids, mask, method=CLIPModel.text_features
            )
        )

    def _token_ids(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``int32 [N, max_tokens]`` ids (bos, tokens, eos, cut, padded) and the keep mask."""
        tok = self.tokenizer
        ids = np.full((len(prompts), self.max_tokens), tok.pad_token_id, np.int32)
        mask = np.zeros(ids.shape, np.int32)
        for row, prompt in enumerate(prompts):
            seq = [tok.bos_token_id, *tok.encode(prompt), tok.eos_token_id]
            if len(seq) > self.max_tokens:
                warnings.warn(
                    f"prompt {row} has {len(seq)} tokens; cut to {self.max_tokens} as "
                    "torchmetrics' CLIPScore does (it loses its end token, so CLIP pools the "
                    f"first token instead): {prompt[:60]!r}...",
                    stacklevel=3,
                )
                seq = seq[: self.max_tokens]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask

    def image_embeddings(self, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Unit-norm image embeddings ``float64 [N, projection_dim]`` of uint8 images."""
        images = _check_batch(images)
        out = []
        rows = min(batch_size, len(images))
        for lo, hi in _batches(len(images), batch_size):
            pixels = np.stack([self.preprocess(im) for im in images[lo:hi]])
            out.append(np.asarray(self._image(self.params, _padded(pixels, rows)))[: hi - lo])
        return _unit(out, self.model.config.projection_dim)

    def text_embeddings(self, prompts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Unit-norm text embeddings ``float64 [N, projection_dim]``."""
        prompts = list(prompts)
        out = []
        rows = min(batch_size, len(prompts))
        for lo, hi in _batches(len(prompts), batch_size):
            ids, mask = self._token_ids(prompts[lo:hi])
            feats = self._text(self.params, _padded(ids, rows), _padded(mask, rows))
            out.append(np.asarray(feats)[: hi - lo])
        return _unit(out, self.model.config.projection_dim)

    def score(
        self, images: np.ndarray, prompts: Sequence[str], *, batch_size: int = 32
    ) -> np.ndarray:
        """Cosine similarity of each image with its prompt, ``float64 [N]`` (the paper's scale;
        ``torchmetrics_clip_score`` turns these into torchmetrics' number)."""
        images = _check_batch(images, prompts)
        img = self.image_embeddings(images, batch_size=batch_size)
        txt = self.text_embeddings(prompts, batch_size=batch_size)
        return np.sum(img * txt, axis=-1)


def _unit(chunks: list[np.ndarray], dim: int) -> np.ndarray:
    feats = np.concatenate(chunks).astype(np.float64) if chunks else np.zeros((0, dim))
    return feats / np.linalg.norm(feats, axis=-1, keepdims=True)


def torchmetrics_clip_score(cosines: np.ndarray) -> float:
    """torchmetrics' ``CLIPScore().compute()`` from per-image cosines: ``max(100 * mean, 0)``
    (the clamp is on the mean, not per image as in Hessel et al.'s CLIP-S)."""
    cosines = np.asarray(cosines, np.float64)
    if cosines.size == 0:
        raise ValueError("torchmetrics_clip_score: no scores")
    return max(100.0 * float(np.mean(cosines)), 0.0)


def _image_processor_config(folder: Path) -> dict:
    """The image processor's settings: ``preprocessor_config.json`` (the released CLIP repos)
    or the ``image_processor`` section of ``processor_config.json`` (transformers 5)."""
    legacy, combined = folder / "preprocessor_config.json", folder / "processor_config.json"
    for path, section in ((legacy, None), (combined, "image_processor")):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        data = data.get(section) if section else data
        if isinstance(data, dict):
            return data
    raise MissingWeightsError(METRIC, folder, expected=EXPECTED, source=SOURCE)


def load_clip_scorer(path: str | Path | None) -> CLIPScorer:
    """A CLIP scorer from a transformers CLIP folder (or a repo id already in the HF cache)."""
    model, params, folder, preprocess = _load(path, jnp.asarray)
    return CLIPScorer(model, params, CLIPTokenizer.from_pretrained(folder), preprocess)


def check_clip_scorer(path: str | Path | None) -> None:
    """Read and check the folder (config, image processor, tokenizer, every tensor's name,
    shape and values) without keeping the weights: `mixdq evaluate` calls it before
    generating any image."""
    _, _, folder, _ = _load(path, _discard)
    try:
        CLIPTokenizer.from_pretrained(folder)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{folder}: its tokenizer files do not load ({err})") from err


def _discard(_value: np.ndarray) -> None:
    return None


def _load(path: str | Path | None, to_leaf):
    """The model, its params (each tensor through ``to_leaf``), the folder and the image
    preprocessing, everything checked."""
    if path is None:
        raise MissingWeightsError(METRIC, None, expected=EXPECTED, source=SOURCE)
    try:
        folder = resolve_model_path(path)
    except CheckpointError as err:
        raise MissingWeightsError(METRIC, path, expected=EXPECTED, source=SOURCE) from err
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    has_weights = any(folder.glob("model*.safetensors")) or any(
        folder.glob("model*.safetensors.index*.json")
    )
    if not ((folder / "config.json").is_file() and has_tokenizer and has_weights):
        raise MissingWeightsError(METRIC, folder, expected=EXPECTED, source=SOURCE)
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / 'config.json'}: not valid JSON ({err})") from err
    try:
        config = CLIPConfig.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{folder / 'config.json'}: {err}") from err
    preprocess = CLIPImagePreprocess.from_dict(
        _image_processor_config(folder), where=str(folder / "preprocessor_config.json")
    )
    crop = preprocess.crop or preprocess.resize_to
    size = config.vision.image_size
    if crop != (size, size):
        raise ValueError(f"{folder}: the image processor makes {crop} images but the vision "
                         f"model takes {size}x{size}")  # fmt: skip

    weights = load_component_weights(folder)
    # position_ids buffers (older files) are skipped by the converter itself
    state = {k: v for k, v in weights.state.items() if k not in _UNUSED_KEYS}
    model = CLIPModel(config)
    target = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((1, size, size, config.vision.num_channels)),
            jnp.zeros((1, config.text.max_position_embeddings), jnp.int32),
        )
    )["params"]  # fmt: skip
    params = torch_to_flax(
        state, target, sources=weights.sources, what=f"CLIP model {folder}", dtype=np.float32,
        to_leaf=to_leaf,
    )  # fmt: skip
    return model, params, folder, preprocess
