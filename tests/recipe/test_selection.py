"""The candidate pick's score per preset: image MSE on every selection prompt, or the
released pick (its ``MSE_pixel`` on the 8-bit PNGs of the first prompt's image)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from PIL import Image

from mixdq_jax.recipe import PRESETS
from mixdq_jax.recipe.run import Recipe, released_pixel_error


def _released_mse_pixel(a: np.ndarray, b: np.ndarray, tmp_path) -> float:
    """The released script's steps: save each image as PNG (diffusers' ``numpy_to_pil``:
    ``round(255 x)`` as uint8), read both back as uint8 arrays, ``np.mean((a - b) ** 2)``."""
    paths = []
    for i, img in enumerate((a, b)):
        path = tmp_path / f"{i}.png"
        Image.fromarray((img * 255).round().astype("uint8")).save(path)
        paths.append(path)
    img1, img2 = (np.asarray(Image.open(p)) for p in paths)
    return float(np.mean((img1 - img2) ** 2))


def test_released_pixel_error_is_the_released_uint8_mse(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.random((16, 16, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    got = released_pixel_error(a[None], b[None])
    assert got == _released_mse_pixel(a, b, tmp_path)
    # it wraps: one level darker is 255 ** 2 mod 256 = 1 and one level brighter 1 as well,
    # where the float MSE of both is the same 1/255^2; two levels apart: 4 and 4
    dark = np.full((1, 2, 2, 3), 10 / 255, np.float32)
    assert released_pixel_error(dark, dark + 1 / 255) == 1.0
    assert released_pixel_error(dark + 2 / 255, dark) == 4.0
    # 16 levels apart: 256 wraps to 0, the released score calls it identical
    assert released_pixel_error(dark + 16 / 255, dark) == 0.0


def test_selection_error_follows_the_preset():
    images = {None: np.zeros((3, 2, 2, 3), np.float32), "q": np.full((3, 2, 2, 3), 0.4)}
    images["q"][1:] = 0.0  # only the first prompt differs

    def render(qconfig=None, *, quantized=None, count=None):
        return images[qconfig][:count]

    # the first prompt's pixels: 0.4 -> 102 levels, 102 ** 2 = 10404 = 164 mod 256
    for name, want in (("ours", 0.16 / 3), ("paper", 0.16 / 3), ("official", 164.0)):
        recipe = Recipe.__new__(Recipe)
        recipe.config = SimpleNamespace(preset=PRESETS[name])
        recipe.render, recipe._first_reference = render, None
        recipe.reference = lambda: images[None]
        assert np.isclose(recipe.selection_error("q"), want), name


def test_quantize_calibrates_on_coco_captions(tmp_path):
    """``--prompts captions_val2014.json``: one caption per image of a seeded random sample,
    the calibration prompts first, then the held-out selection ones, none repeated."""
    import json

    from mixdq_jax.cli.quantize import prompts_for

    annotations = [{"image_id": i, "caption": f"photo {i} caption {j}"}
                   for i in range(40) for j in range(2)]  # fmt: skip
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"annotations": annotations}))
    calib, select = prompts_for("sdxl", path, 6, 2)
    assert len(calib) == 6 and len(select) == 2 and len(set(calib + select)) == 8
    assert all(p.endswith("caption 0") for p in calib + select)
    assert prompts_for("sdxl", path, 6, 2) == (calib, select)  # seeded
    assert [p for p in calib if p != "photo 0 caption 0"] != [f"photo {i} caption 0"
                                                             for i in range(1, 6)]
