"""Round trips and strict errors of the official MixDQ YAML formats."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from mixdq_jax import official_format as fmt
from tests.reference_data import official


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_bits_round_trip_sorted_prefixed(tmp_path):
    bits = {"up_blocks.0.resnets.0.conv1": 4, "conv_in": 8, "down_blocks.1.attn2.to_k": 2}
    out = tmp_path / "sub" / "bits.yaml"
    fmt.write_bits(out, bits)
    assert fmt.read_bits(out) == bits
    raw = yaml.safe_load(out.read_text())  # independent reader: the file is plain YAML
    assert raw == {f"model.{k}": v for k, v in bits.items()}
    keys = [line.split(":")[0] for line in out.read_text().splitlines()]
    assert keys == sorted(keys) and all(k.startswith("model.") for k in keys)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_sensitivity_round_trip_exact(tmp_path):
    sens = {"conv_in": (1.5, 30.123456789012345, 0.1 + 0.2), "ff.net.2": (-3.0, 0.0, 1e-300)}
    out = tmp_path / "s.yaml"
    fmt.write_sensitivity(out, sens)
    assert fmt.read_sensitivity(out) == sens
    assert yaml.safe_load(out.read_text())["model.conv_in"] == list(sens["conv_in"])


def test_official_files_read():
    sqnr = fmt.read_sensitivity(official("sensitivity", "weight_sqnr.yaml"))
    ssim = fmt.read_sensitivity(official("sensitivity", "weight_ssim.yaml"))
    sizes = fmt.read_sizes(official("tensor_ratio", "weight_ratio.yaml"))
    bits = fmt.read_bits(official("final_config", "weight", "weight_4.00.yaml"))
    act = fmt.read_bits(official("final_config", "act", "act_7.77.yaml"))
    assert len(sqnr) == len(sizes) == len(bits) == 794
    assert len(ssim) == 420 and len(act) == 785
    assert "conv_in" in sizes and sizes["conv_in"] == 1.0
    raw = yaml.safe_load(official("sensitivity", "weight_sqnr.yaml").read_text())
    assert sqnr["conv_in"] == tuple(raw["model.conv_in"])


def test_official_bits_rewrite_identical(tmp_path):
    src = official("final_config", "weight", "weight_3.66.yaml")
    out = tmp_path / "w.yaml"
    fmt.write_bits(out, fmt.read_bits(src))
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(src.read_text())


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("- a\n- b\n", "mapping"),
        ("", "mapping"),
        ("model.conv_in: 8\nmodel.conv_in: 4\n", "duplicate layer 'model.conv_in'"),
        ("model.conv_in: 3\n", "unsupported bit-width 3"),
        ("model.conv_in: eight\n", "'eight'"),
        ("model.conv_in: 4.5\n", "4.5"),
        ("model.conv_in: true\n", "True"),
        ("conv_in: 8\n", "'conv_in' does not start with 'model.'"),
        ("model.conv_in: [8\n", "not valid YAML"),
    ],
)
def test_bad_bits_files(tmp_path, text, needle):
    path = _write(tmp_path / "bad_bits.yaml", text)
    with pytest.raises(ValueError, match="bad_bits.yaml") as err:
        fmt.read_bits(path)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("[1.0, .nan, 3.0]", "non-finite"),
        ("[1.0, 2.0]", "list of 3 numbers"),
        ("[1.0, 2.0, x]", "list of 3 numbers"),
        ("5.0", "list of 3 numbers"),
        ("[1.0, 2.0, .inf]", "non-finite"),
    ],
)
def test_bad_sensitivity_files(tmp_path, value, needle):
    path = _write(tmp_path / "bad_sens.yaml", f"model.a: [1, 2, 3]\nmodel.b.ff: {value}\n")
    with pytest.raises(ValueError, match="bad_sens.yaml") as err:
        fmt.read_sensitivity(path)
    assert needle in str(err.value) and "'b.ff'" in str(err.value)


@pytest.mark.parametrize("value", ["0", "-1.5", ".nan", "big"])
def test_bad_sizes(tmp_path, value):
    path = _write(tmp_path / "sizes.yaml", f"model.conv_in: {value}\n")
    with pytest.raises(ValueError, match=r"sizes.yaml.*'conv_in'.*not a positive number"):
        fmt.read_sizes(path)


def test_write_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unsupported bit-width 16"):
        fmt.write_bits(tmp_path / "b.yaml", {"conv_in": 16})
    with pytest.raises(ValueError, match="no 'model.' prefix"):
        fmt.write_bits(tmp_path / "b.yaml", {"model.conv_in": 8})
    with pytest.raises(ValueError, match="non-finite"):
        fmt.write_sensitivity(tmp_path / "s.yaml", {"conv_in": (1.0, math.nan, 2.0)})
    assert not list(tmp_path.iterdir())
    fmt.write_bits(tmp_path / "b16.yaml", {"conv_in": 16}, allowed=(8, 16))
    assert fmt.read_bits(tmp_path / "b16.yaml", allowed=(8, 16)) == {"conv_in": 16}


def test_layer_list(tmp_path):
    path = _write(tmp_path / "p.yaml", "- model.conv_in\n- conv_out\n")
    assert fmt.read_layer_list(path) == ["conv_in", "conv_out"]
    with pytest.raises(ValueError, match="duplicate layer 'conv_in'"):
        fmt.read_layer_list(_write(tmp_path / "d.yaml", "- model.conv_in\n- conv_in\n"))
    with pytest.raises(ValueError, match="YAML list"):
        fmt.read_layer_list(_write(tmp_path / "m.yaml", "model.conv_in: 8\n"))
