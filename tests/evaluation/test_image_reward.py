"""The JAX ImageReward against transformers' BLIP modules on the same tiny random weights.

transformers' ``BlipVisionModel`` and ``BlipTextModel`` implement BLIP's ViT and its BERT with
cross-attention (the two halves of ImageReward) independently of our code; their weights are
renamed to the released ``ImageReward.pt`` layout (``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``) and saved with ``torch.save``, as that file is.
The ``image-reward`` package itself cannot run here (it needs timm and torchvision, and its BLIP
code predates transformers 5). The tokenizer is checked against transformers' ``BertTokenizer``;
the image transform against torchvision's definition, written out with PIL below.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from mixdq_jax.evaluation import MissingWeightsError
from mixdq_jax.evaluation.bert_tokenizer import BertTokenizer
from mixdq_jax.evaluation.image_reward import (
    MAX_TOKENS,
    REWARD_MEAN,
    REWARD_STD,
    load_image_reward,
    preprocess,
)

RTOL = 1e-4
WIDTH, PATCH, IMAGE = 128, 8, 32  # 2 heads of 64, 16 patches
CORPUS = (
    "a photo of an astronaut riding a horse on the moon, highly detailed. two cats "
    "sleeping on a red sofa; the sofa's cushions are blue! a bowl of fruit (apples, pears) "
    "next to a window at sunset"
)
PROMPTS = [
    "A photo of an Astronaut riding a horse!",
    "two cats sleeping on a red sofa next to a window at sunset, " * 3,  # cut at 35 tokens
    "Café au lait, naïve 東京 unknownword",
]


def _vocab() -> list[str]:
    words = sorted(set(re.findall(r"\w+|[^\w\s]", CORPUS.lower())))
    pieces = sorted({f"##{w[i:]}" for w in words for i in range(2, len(w))})
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz") | {"東", "京"})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *words, *pieces,
            *[f"##{c}" for c in chars], "cafe", "au", "lait", "naive"]  # fmt: skip


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(folder in the released layout, torch reference modules)."""
    folder = tmp_path_factory.mktemp("image_reward")
    vocab = list(dict.fromkeys(_vocab()))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    med = dict(architectures=["BertModel"], hidden_act="gelu", hidden_size=64,
               intermediate_size=96, layer_norm_eps=1e-12, max_position_embeddings=40,
               model_type="bert", num_attention_heads=2, num_hidden_layers=2, pad_token_id=0,
               type_vocab_size=2, vocab_size=len(vocab) + 2, encoder_width=WIDTH,
               add_cross_attention=True)  # fmt: skip
    (folder / "med_config.json").write_text(json.dumps(med))

    torch.manual_seed(0)
    vision = transformers.BlipVisionModel(transformers.BlipVisionConfig(
        hidden_size=WIDTH, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE, patch_size=PATCH, layer_norm_eps=1e-6, hidden_act="gelu",
    )).eval()  # fmt: skip
    text = transformers.BlipTextModel(transformers.BlipTextConfig(
        vocab_size=len(vocab) + 2, hidden_size=64, encoder_hidden_size=WIDTH,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=40, is_decoder=True,  # is_decoder: build cross-attention
    ), add_pooling_layer=False).eval()  # fmt: skip
    head = torch.nn.Sequential(
        torch.nn.Linear(64, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()  # ImageReward's MLP: Linear layers with dropouts between, no activations
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (vision, text, head):  # LayerNorms and biases away from 1 and 0
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    state = {}
    for key, value in vision.state_dict().items():
        state["blip.visual_encoder." + _vit_key(key)] = value
    for key, value in text.state_dict().items():
        state["blip.text_encoder." + key] = value
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # a buffer
    state["blip.vision_proj.weight"] = torch.zeros(4, WIDTH)  # BLIP parts ImageReward skips
    for key, value in head.state_dict().items():
        state["mlp.layers." + key] = value
    torch.save(state, folder / "ImageReward.pt")
    return folder, (vision, text, head)


def _vit_key(key: str) -> str:
    """transformers' BLIP ViT names -> BLIP's own (timm-style) names, as ImageReward.pt has."""
    fixed = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    if key in fixed:
        return fixed[key]
    key = key.replace("encoder.layers.", "blocks.").replace("self_attn.projection", "attn.proj")
    key = key.replace("self_attn.qkv", "attn.qkv").replace("layer_norm1", "norm1")
    return key.replace("layer_norm2", "norm2")


def _torchvision_transform(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize on a PIL
    image, from torchvision's definitions: the short side to ``size`` (long side truncated),
    crop offsets ``int(round((h - size) / 2))``."""
    pil = Image.fromarray(image)
    w, h = pil.size
    if w <= h:
        pil = pil.resize((size, int(size * h / w)), Image.Resampling.BICUBIC)
    else:
        pil = pil.resize((int(size * w / h), size), Image.Resampling.BICUBIC)
    w, h = pil.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    pil = pil.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    return x.sub(mean).div(std).permute(1, 2, 0).numpy()


def _reference(modules, folder, images, prompts):
    vision, text, head = modules
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"))
    t = tok(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
            return_tensors="pt")  # fmt: skip
    pixels = torch.from_numpy(np.stack([_torchvision_transform(im, IMAGE) for im in images]))
    with torch.no_grad():
        image = vision(pixel_values=pixels.permute(0, 3, 1, 2)).last_hidden_state
        states = text(
            input_ids=t["input_ids"], attention_mask=t["attention_mask"],
            encoder_hidden_states=image, encoder_attention_mask=torch.ones(image.shape[:2]),
            is_decoder=False,  # ImageReward runs BLIP's text encoder (bidirectional)
        ).last_hidden_state  # fmt: skip
        raw = head(states[:, 0])[:, 0].double().numpy()
    return (raw - REWARD_MEAN) / REWARD_STD


def test_score_matches_transformers_blip(released):
    folder, modules = released
    scorer = load_image_reward(folder / "ImageReward.pt")
    images = np.random.default_rng(0).integers(0, 256, (3, 45, 38, 3), dtype=np.uint8)
    ours = scorer.score(images, PROMPTS, batch_size=2)  # batches of 2 and 1 (padded)
    want = _reference(modules, folder, images, PROMPTS)
    np.testing.assert_allclose(ours, want, rtol=RTOL)
    assert np.ptp(want) > 0.01  # the prompts and images do change the score
    assert scorer._apply._cache_size() == 1


def test_tokenizer_matches_transformers(released):
    folder, _ = released
    reference = transformers.BertTokenizer(str(folder / "vocab.txt"))
    ours = BertTokenizer.from_vocab_file(folder / "vocab.txt")
    texts = [*PROMPTS, "  tabs\tand\nnewlines  ", "ÀSTRONAUT's horse...?", "a\u200bb \x00c", ""]
    ids, mask = ours(texts, MAX_TOKENS)
    want = reference(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS)
    np.testing.assert_array_equal(ids, np.array(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(want["attention_mask"]))


@pytest.mark.parametrize("shape", [(40, 40), (41, 33), (30, 59), (37, 32)])
def test_preprocess_is_torchvisions_transform(shape):
    """Odd excesses (e.g. 3 px: torchvision's offset is round(1.5) = 2, not 1) included."""
    image = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(image, 32), _torchvision_transform(image, 32))


def test_missing_files_are_named(released, tmp_path):
    folder, _ = released
    with pytest.raises(MissingWeightsError, match="no path given.*THUDM/ImageReward"):
        load_image_reward(None)
    (tmp_path / "ImageReward.pt").write_bytes((folder / "ImageReward.pt").read_bytes())
    (tmp_path / "med_config.json").write_text((folder / "med_config.json").read_text())
    with pytest.raises(MissingWeightsError, match="vocab.txt.*bert-base-uncased"):
        load_image_reward(tmp_path)  # no vocab.txt
