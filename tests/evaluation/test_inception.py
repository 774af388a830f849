"""The JAX FID Inception against torch-fidelity's module (the network torchmetrics' FID runs),
both with the same random weights; BN statistics come from a batch so activations keep a
realistic scale through all 94 convolutions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixdq_jax.evaluation import MissingWeightsError
from mixdq_jax.evaluation.inception import extract, load_inception, resize_tf1, state_dict_shapes


@pytest.fixture(scope="module")
def weights(tmp_path_factory, torch_fidelity_inception):
    """A random-weight torch-fidelity Inception, and its state dict saved as a .pth."""
    folder = tmp_path_factory.mktemp("inception")
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in state_dict_shapes().items():
        if name.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith("bn.weight"):
            state[name] = 1.0 + 0.2 * torch.rand(shape, generator=g)
        elif name.endswith("bn.bias"):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("running_mean"):
            state[name] = torch.zeros(shape)
        else:
            state[name] = torch.ones(shape)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    path = folder / "random.pth"
    torch.save(state, path)
    net = torch_fidelity_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    for m in net.modules():  # running stats := one batch's statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (4, 3, 96, 80), generator=g, dtype=torch.uint8))
    net.eval()
    torch.save(net.state_dict(), path)
    return net, path


def test_features_match_torch_fidelity(weights):
    net, path = weights
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 45, 67, 3), dtype=np.uint8)  # non-square: H and W differ
    with torch.no_grad():
        (ref,) = net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    ours = extract(load_inception(path), images)
    ref = ref.numpy()
    assert ours.shape == (2, 2048)
    assert ref.std() > 0.05  # the features are not degenerate
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_resize_is_tensorflow1_bilinear(torch_fidelity_inception):
    """The 299x299 resize alone, against torch-fidelity's TF1-compatible interpolation."""
    x = np.random.default_rng(2).uniform(0, 255, (1, 31, 50, 3)).astype(np.float32)
    ref = (
        torch_fidelity_inception.interpolate_bilinear_2d_like_tensorflow1x(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    np.testing.assert_allclose(np.asarray(resize_tf1(x)), ref, rtol=0, atol=2e-4)


def test_missing_or_wrong_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05"):
        load_inception(None)
    with pytest.raises(MissingWeightsError, match="no_such.pth does not hold them"):
        load_inception(tmp_path / "no_such.pth")
    from safetensors.numpy import save_file

    save_file({"Conv2d_1a_3x3.conv.weight": np.zeros((1, 1), np.float32)},
              str(tmp_path / "w.safetensors"))  # fmt: skip
    with pytest.raises(MissingWeightsError, match="wrong shape|missing"):
        load_inception(tmp_path / "w.safetensors")
