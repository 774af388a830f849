"""ImageReward (Xu et al. 2023, the paper's "IR" column): a human-preference score per image and
prompt, from the released ``ImageReward.pt``, in JAX.

What the ``image-reward`` package's ``ImageReward.score`` does, batched: the prompt through
BERT's uncased WordPiece (``max_length=35``, padded, cut); the image through torchvision's
``Resize(224, bicubic)`` (PIL), ``CenterCrop(224)`` (offsets rounded half to even, as
torchvision does), ``ToTensor`` and CLIP's mean/std; then BLIP's ViT-L, BLIP's BERT
cross-attending to every image token, the MLP on the [CLS] state, and
``(reward - 0.16717362830052426) / 1.0333394966054072``.

``path`` is a folder holding (or the ``ImageReward.pt`` inside a folder holding):

- ``ImageReward.pt`` and ``med_config.json``, from the Hugging Face repo ``THUDM/ImageReward``
  (what ``ImageReward.load("ImageReward-v1.0")`` downloads to ``~/.cache/ImageReward``);
  an ``ImageReward.safetensors`` with the same tensor names is read without torch, the ``.pt``
  needs it (``pip install -e ".[eval]"``);
- ``vocab.txt`` of ``bert-base-uncased`` (Hugging Face repo ``google-bert/bert-base-uncased``),
  the vocabulary BLIP's tokenizer is built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mixdq_jax.evaluation.bert_tokenizer import BertTokenizer
from mixdq_jax.evaluation.errors import MissingWeightsError
from mixdq_jax.evaluation.image_reward_model import (
    VIT_HEAD_DIM,
    BLIPTextConfig,
    BLIPVisionConfig,
    ImageRewardNet,
)
from mixdq_jax.evaluation.weights_file import read_state_dict
from mixdq_jax.io_utils import read_json_object
from weights_convert.convert import torch_to_flax

METRIC = "ImageReward"
EXPECTED = (
    "a folder with ImageReward.pt (or ImageReward.safetensors), med_config.json and "
    "bert-base-uncased's vocab.txt"
)
SOURCE = (
    "the Hugging Face repo THUDM/ImageReward (ImageReward.pt, med_config.json; "
    "`hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir DIR`) and "
    "google-bert/bert-base-uncased (vocab.txt; `hf download google-bert/bert-base-uncased "
    "vocab.txt --local-dir DIR`)"
)
REWARD_MEAN = 0.16717362830052426  # the released model's normalisation
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35
_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image statistics, as ImageReward uses
_STD = (0.26862954, 0.26130258, 0.27577711)
_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``[size, size, 3]`` as ImageReward's torchvision transform."""
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = image[top : top + size, left : left + size].astype(np.float32) / np.float32(255)
    return (x - np.asarray(_MEAN, np.float32)) / np.asarray(_STD, np.float32)


class ImageRewardScorer:
    """A loaded ImageReward model: ``score(images, prompts)`` per image."""

    def __init__(self, net: ImageRewardNet, params: dict, tokenizer: BertTokenizer):
        self.net, self.params, self.tokenizer = net, params, tokenizer
        self._apply = jax.jit(lambda p, x, ids, mask: net.apply({"params": p}, x, ids, mask))

    def score(
        self, images: np.ndarray, prompts: Sequence[str], *, batch_size: int = 16
    ) -> np.ndarray:
        """ImageReward of each uint8 ``[N, H, W, 3]`` image with its prompt, ``float64 [N]``."""
        images, prompts = np.asarray(images), list(prompts)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        size = self.net.vision.image_size
        rows, out = min(batch_size, len(images)), []
        for lo in range(0, len(images), batch_size):
            pixels = np.stack([preprocess(im, size) for im in images[lo : lo + batch_size]])
            ids, mask = self.tokenizer(prompts[lo : lo + batch_size], MAX_TOKENS)
            n = len(pixels)
            if n < rows:  # pad the last batch: one shape, one compile
                pad = rows - n
                pixels = np.concatenate([pixels, np.zeros((pad,) + pixels.shape[1:], np.float32)])
                ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
                mask = np.concatenate([mask, np.repeat(mask[:1], pad, axis=0)])
            out.append(np.asarray(self._apply(self.params, pixels, ids, mask))[:n])
        raw = np.concatenate(out).astype(np.float64) if out else np.zeros(0)
        return (raw - REWARD_MEAN) / REWARD_STD


def _configs(state: dict, med: dict, where: str):
    """Vision config from the tensor shapes, text config from med_config.json, head layers."""
    vis = "blip.visual_encoder."
    try:
        width, _, patch, _ = state[vis + "patch_embed.proj.weight"].shape
        tokens = state[vis + "pos_embed"].shape[1]
        mlp_dim = state[vis + "blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"{where}: no {err.args[0]!r}; not an ImageReward checkpoint") from err
    side = round((tokens - 1) ** 0.5)
    if side * side != tokens - 1:
        raise ValueError(f"{where}: pos_embed has {tokens} tokens, not 1 + a square grid")
    depth = len({k.split(".")[3] for k in state if k.startswith(vis + "blocks.")})
    vision = BLIPVisionConfig(
        width=width, depth=depth, heads=max(width // VIT_HEAD_DIM, 1), patch_size=patch,
        image_size=side * patch, mlp_dim=mlp_dim,
    )  # fmt: skip
    if med.get("hidden_act", "gelu") != "gelu" or not med.get("add_cross_attention", True):
        raise ValueError(f"{where}: med_config.json is not BLIP's BERT (gelu, cross-attention)")
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps")  # fmt: skip
    words = state.get("blip.text_encoder.embeddings.word_embeddings.weight")
    if words is None:
        raise ValueError(f"{where}: no text encoder weights; not an ImageReward checkpoint")
    text = BLIPTextConfig(
        vocab_size=words.shape[0], encoder_width=width, **{k: med[k] for k in keys if k in med}
    )
    head = sorted(
        (int(k.split(".")[2]), state[k].shape[0])
        for k in state if k.startswith("mlp.layers.") and k.endswith(".weight")
    )  # fmt: skip
    if not head or head[-1][1] != 1:
        raise ValueError(f"{where}: the mlp.layers head must end in one output")
    return vision, text, tuple(head)


def load_image_reward(path: str | Path | None) -> ImageRewardScorer:
    """ImageReward from the released files (see the module doc for ``path``)."""
    net, params, vocab_file = _load(path, jnp.asarray)
    return ImageRewardScorer(net, params, BertTokenizer.from_vocab_file(vocab_file))


def check_image_reward(path: str | Path | None) -> None:
    """Read and check the released files (config, vocabulary, every tensor's name, shape and
    values) without keeping the weights: `mixdq evaluate` calls it before generating any
    image."""
    _, _, vocab_file = _load(path, _discard)
    BertTokenizer.from_vocab_file(vocab_file)


def _discard(_value: np.ndarray) -> None:
    return None


def _load(path: str | Path | None, to_leaf) -> tuple[ImageRewardNet, dict, Path]:
    """The network, its params (each tensor through ``to_leaf``) and the vocabulary file."""
    if path is None:
        raise MissingWeightsError(METRIC, None, expected=EXPECTED, source=SOURCE)
    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    weights = path if path.is_file() else None
    if weights is None and folder.is_dir():
        weights = next((folder / n for n in ("ImageReward.safetensors", "ImageReward.pt")
                        if (folder / n).is_file()), None)  # fmt: skip
    med_file, vocab_file = folder / "med_config.json", folder / "vocab.txt"
    if weights is None or not med_file.is_file() or not vocab_file.is_file():
        raise MissingWeightsError(METRIC, path, expected=EXPECTED, source=SOURCE)
    med = read_json_object(med_file, what="BLIP's BERT config (med_config.json)")
    state = {k: v for k, v in read_state_dict(weights).items()
             if k.startswith(_PREFIXES) and not k.endswith("position_ids")}  # fmt: skip
    vision, text, head = _configs(state, med, str(weights))
    if text.max_position_embeddings < MAX_TOKENS:
        raise ValueError(f"{med_file}: max_position_embeddings < {MAX_TOKENS}")
    net = ImageRewardNet(vision=vision, text=text, head=head)
    size = vision.image_size
    target = jax.eval_shape(
        lambda: net.init(
            jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, MAX_TOKENS), jnp.int32),
            jnp.ones((1, MAX_TOKENS), jnp.int32),
        )
    )["params"]  # fmt: skip
    params = torch_to_flax(
        state, target, sources=dict.fromkeys(state, str(weights)), what="ImageReward",
        dtype=np.float32, to_leaf=to_leaf,
    )  # fmt: skip
    return net, params, vocab_file
