"""The JAX LPIPS against torchmetrics' LPIPS module (``_LPIPS``, the code behind
``LearnedPerceptualImagePatchSimilarity``) on the same weights.

The linear layers are the real LPIPS v0.1 AlexNet weights (the ``alex.pth`` torchmetrics ships).
The backbone is torchvision's AlexNet ``features`` architecture, written here as a plain torch
``Sequential`` with random weights and handed to torchmetrics in place of torchvision's
constructor (torchvision cannot be installed beside the CPU torch wheel); everything else --
scaling layer, channel normalisation, squared difference, 1x1 weights, spatial mean, sum over
layers -- is torchmetrics' own code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mixdq_jax.evaluation import MissingWeightsError
from mixdq_jax.evaluation.lpips import load_lpips
from tests.evaluation.torchmetrics_import import import_torchmetrics
from weights_convert.safetensors_io import save_safetensors

RTOL = 1e-4
BACKBONE = "alexnet-owt-7be5be79.pth"


def _alexnet_features(seed: int) -> torch.nn.Sequential:
    """torchvision's ``alexnet().features`` layer for layer, He-initialised at random."""
    relu = lambda: torch.nn.ReLU(inplace=True)  # noqa: E731
    pool = lambda: torch.nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
    features = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), relu(), pool(),
        torch.nn.Conv2d(64, 192, kernel_size=5, padding=2), relu(), pool(),
        torch.nn.Conv2d(192, 384, kernel_size=3, padding=1), relu(),
        torch.nn.Conv2d(384, 256, kernel_size=3, padding=1), relu(),
        torch.nn.Conv2d(256, 256, kernel_size=3, padding=1), relu(), pool(),
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in features:
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return features.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(weights folder, torchmetrics' LPIPS module on the same weights)."""
    import_torchmetrics()
    from torchmetrics.functional.image import lpips as tm_lpips

    features = _alexnet_features(0)
    folder = tmp_path_factory.mktemp("lpips")
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(8, 4)  # the file's classifier: not read
    torch.save(state, folder / BACKBONE)
    linear = Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth"
    shutil.copy(linear, folder / "alex.pth")

    original = tm_lpips._get_tv_model_features
    tm_lpips._get_tv_model_features = lambda net, pretrained=False: features
    try:  # pretrained=True: the linear layers from torchmetrics' alex.pth
        net = tm_lpips._LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()
    finally:
        tm_lpips._get_tv_model_features = original
    return folder, net


def _torch_lpips(net, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def tensor(x):  # uint8 -> [0, 1] as torchvision's ToTensor; normalize=True maps to [-1, 1]
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255

    with torch.no_grad():
        return net(tensor(a), tensor(b), normalize=True).reshape(-1).double().numpy()


def _pairs(seed: int, n: int, h: int, w: int):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    far = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    near = np.clip(a + rng.integers(-6, 7, a.shape), 0, 255).astype(np.uint8)
    return a, np.concatenate([far[: n // 2], near[n // 2 :]])


def test_distance_matches_torchmetrics(reference):
    folder, net = reference
    lpips = load_lpips(folder)
    a, b = _pairs(0, 5, 67, 83)  # odd sizes: the pools' floor rounding matters
    ours = lpips.distance(a, b, batch_size=2)  # batches 2, 2, 1 (padded): one compile
    want = _torch_lpips(net, a, b)
    np.testing.assert_allclose(ours, want, rtol=RTOL)
    assert want[:2].min() > 5 * want[3:].max()  # both far and near pairs are covered
    assert lpips._apply._cache_size() == 1
    np.testing.assert_allclose(lpips.distance(a, a), np.zeros(5), atol=1e-12)  # float32 noise


def test_safetensors_copies_of_the_weights_agree(reference, tmp_path):
    folder, net = reference
    for name in (BACKBONE, "alex.pth"):
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        stem = Path(name).stem
        save_safetensors(tmp_path / f"{stem}.safetensors", {k: v.numpy() for k, v in state.items()})
    a, b = _pairs(1, 2, 64, 64)
    np.testing.assert_allclose(load_lpips(tmp_path).distance(a, b), _torch_lpips(net, a, b),
                               rtol=RTOL)  # fmt: skip


def test_missing_weights_name_both_files(reference, tmp_path):
    folder, _ = reference
    with pytest.raises(MissingWeightsError, match="no path given.*alexnet-owt-7be5be79"):
        load_lpips(None)
    shutil.copy(folder / "alex.pth", tmp_path / "alex.pth")  # the backbone is missing
    with pytest.raises(MissingWeightsError, match="does not hold them.*PerceptualSimilarity"):
        load_lpips(tmp_path)


def test_bad_inputs_are_refused(reference):
    lpips = load_lpips(reference[0])
    with pytest.raises(ValueError, match="equal-shape"):
        lpips.distance(np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 64, 65, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        lpips.distance(np.zeros((1, 64, 64, 3)), np.zeros((1, 64, 64, 3)))
