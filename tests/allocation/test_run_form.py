"""``mixdq allocate --run RUN``: sensitivities from a run directory, sizes from its model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixdq_jax import official_format
from mixdq_jax.cli import main
from mixdq_jax.quant.registry import registry_from_unet_config

UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 1, "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
    "cross_attention_dim": 24, "norm_num_groups": 8, "use_linear_projection": True,
}  # fmt: skip


@pytest.fixture()
def run(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text(json.dumps(UNET))
    run = tmp_path / "run"
    (run / "calib").mkdir(parents=True)
    (run / "calib" / "meta.json").write_text(json.dumps({"source": str(model)}))
    layers = registry_from_unet_config(model / "unet" / "config.json")
    rng = np.random.default_rng(0)
    for kind in ("weight", "act"):
        sqnr = {l.name: sorted(rng.uniform(0, 60, 3)) for l in layers}  # noqa: E741
        ssim = {l.name: sorted(rng.uniform(0.5, 1, 3)) for l in layers if l.group == "content"}  # noqa: E741
        official_format.write_sensitivity(run / "sensitivity" / f"{kind}_sqnr.yaml", sqnr)
        official_format.write_sensitivity(run / "sensitivity" / f"{kind}_ssim.yaml", ssim)
    return run, layers


def test_run_form_uses_registry_sizes(run, tmp_path):
    run, layers = run
    out = tmp_path / "w4.yaml"
    args = ["allocate", "--run", str(run), "--kind", "weight", "--target", "4", "--out", str(out)]
    assert main(args) == 0
    bits = official_format.read_bits(out)
    assert set(bits) == {layer.name for layer in layers}
    sizes = official_format.read_sizes(run / "sensitivity" / "weight_sizes.yaml")
    assert sizes == {layer.name: float(layer.weight_params) for layer in layers}
    avg = sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values())
    assert abs(avg - 4) <= 0.02 + 1e-9
    assert main(["allocate", "--run", str(run), "--kind", "act", "--target", "6", "--out",
                 str(tmp_path / "a6.yaml")]) == 0  # fmt: skip
    act_sizes = official_format.read_sizes(run / "sensitivity" / "act_sizes.yaml")
    assert act_sizes == {layer.name: float(layer.input_size) for layer in layers}


def test_run_form_errors(tmp_path, capsys):
    out = str(tmp_path / "x.yaml")
    assert main(["allocate", "--run", str(tmp_path), "--kind", "weight", "--target", "4",
                 "--out", out]) == 2  # fmt: skip
    assert "not a calibrated run directory" in capsys.readouterr().err
    assert main(["allocate", "--sensitivity", str(tmp_path), "--kind", "weight", "--target",
                 "4", "--out", out]) == 2  # fmt: skip
    assert "--sizes FILE is required" in capsys.readouterr().err
