"""Tiny random diffusers/transformers pipelines saved in diffusers layout, for parity tests.

Everything is built in the test process (no download): a small byte-level BPE vocabulary in
CLIP's file format, CLIP text encoders, a UNet, a VAE and a scheduler, saved with
``save_pretrained`` exactly as a real checkpoint folder is laid out.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

CORPUS = (
    "a photo of a red circle on a blue background. a small green square to the right of a "
    "yellow triangle! an astronaut riding a horse, highly detailed, 4k. the cat's hat isn't "
    "blue; it is orange and purple. large small top bottom left right center"
)


def write_clip_tokenizer(folder: Path, *, pad_token: str = "<|endoftext|>") -> int:
    """A real (small) CLIP BPE tokenizer whose merges cover CORPUS's words; returns its size."""
    import regex

    from mixdq_jax.testbed.vocab import write_tokenizer

    words = sorted(set(regex.findall(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", CORPUS.lower())))
    return write_tokenizer(folder, pad_token=pad_token, words=words)["vocab_size"]


# one block of each kind (plain and cross-attention down/up blocks, split up-block shortcuts):
# the tests whose time is compilation use it where a property holds layer by layer
SMALL_UNET = dict(layers_per_block=1, transformer_layers_per_block=(1, 1))


def sdxl_unet_config(**overrides) -> dict:
    """A tiny SDXL-shaped UNet config (diffusers keyword arguments); ``overrides`` replace keys."""
    pooled = overrides.pop("pooled_dim", 32)
    config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + pooled,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Make every parameter non-trivial (diffusers zero-inits some layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _text_encoders(vocab_size: int, *, two: bool, eos_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        vocab_size=vocab_size,
        layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2,
        eos_token_id=eos_token_id,
        pad_token_id=1,
    )
    torch.manual_seed(1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **common)).eval()
    if not two:
        return te1, None
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_act="gelu", projection_dim=32, **common)
    ).eval()
    return te1, te2


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    _perturb(vae, 3)
    return vae


def build_sdxl(
    folder: Path,
    *,
    force_zeros: bool = True,
    legacy_tokenizer_files: bool = False,
    unet_overrides: dict | None = None,
) -> Path:
    """A tiny StableDiffusionXLPipeline with SDXL's structure, saved to ``folder``
    (``unet_overrides``: UNet config keys to replace, e.g. fewer layers)."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    tmp = folder.parent / (folder.name + "_tok")
    n = write_clip_tokenizer(tmp / "tokenizer")
    write_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")
    te1, te2 = _text_encoders(n, two=True, eos_token_id=2)
    torch.manual_seed(4)
    unet = UNet2DConditionModel(**sdxl_unet_config(**(unet_overrides or {}))).eval()
    _perturb(unet, 5)
    sched = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer", model_max_length=77),
        tokenizer_2=CLIPTokenizer.from_pretrained(tmp / "tokenizer_2", model_max_length=77),
        unet=unet,
        scheduler=sched,
        force_zeros_for_empty_prompt=force_zeros,
    )
    pipe.save_pretrained(folder)
    if legacy_tokenizer_files:  # transformers 5 writes tokenizer.json only; older folders don't
        for name in ("tokenizer", "tokenizer_2"):
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(tmp / name / f, folder / name / f)
    return folder


def build_sd15(folder: Path) -> Path:
    """A tiny StableDiffusionPipeline with SD1.5's structure (conv projections, one encoder)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tmp = folder.parent / (folder.name + "_tok")
    n = write_clip_tokenizer(tmp / "tokenizer")
    te1, _ = _text_encoders(n, two=False, eos_token_id=n - 1)
    torch.manual_seed(6)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()
    _perturb(unet, 7)
    sched = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        skip_prk_steps=True,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=te1,
        tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer", model_max_length=77),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    for f in ("vocab.json", "merges.txt"):  # the file layout of real SD1.5 / sdxl-turbo folders
        shutil.copy(tmp / "tokenizer" / f, folder / "tokenizer" / f)
    return folder


def build_clip(folder: Path) -> Path:
    """A tiny random transformers CLIP folder (model, processor, real-format tokenizer), as
    ``--clip-model`` takes it. torchmetrics accepts a local folder only when its path
    contains "openai": name the folder accordingly."""
    import transformers

    vocab = write_clip_tokenizer(folder)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=2,  # as in the released openai configs
        ),
        vision_config=dict(
            hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
            image_size=30, patch_size=6, hidden_act="gelu",
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
        ),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder),
    )
    processor.save_pretrained(folder)
    return folder


def clip_cosines(model, processor, images, prompts):
    """transformers' CLIPModel directly: image and text features (77 tokens at most),
    unit-normalised, dot product; ``images`` uint8 ``[N, H, W, 3]``."""
    pixels = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images]
    with torch.no_grad():
        pixels = processor(images=pixels, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pixels).pooler_output
        text = processor(text=prompts, return_tensors="pt", padding=True)
        ids, mask = text["input_ids"][:, :77], text["attention_mask"][:, :77]
        txt = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).double().numpy()
