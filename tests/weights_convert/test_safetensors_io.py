"""Our numpy safetensors reader/writer against the reference safetensors library."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from weights_convert.safetensors_io import (
    SafetensorsError,
    load_safetensors,
    release_pages,
    save_safetensors,
)


def test_reads_files_written_by_safetensors(tmp_path):
    path = tmp_path / "ref.safetensors"
    tensors = {
        "a.weight": torch.randn(5, 3),
        "b": torch.randn(4, dtype=torch.float16),
        "c": torch.randn(2, 2).to(torch.bfloat16),
        "d": torch.arange(7, dtype=torch.int64),
        "e": torch.zeros(0, 3),
    }
    safetensors.torch.save_file(tensors, path)
    got = load_safetensors(path)
    assert set(got) == set(tensors)
    for key, ref in tensors.items():
        if ref.dtype == torch.bfloat16:
            assert got[key].dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got[key].astype(np.float32), ref.float().numpy())
        else:
            np.testing.assert_array_equal(got[key], ref.numpy())


def test_written_files_load_in_safetensors(tmp_path):
    path = tmp_path / "ours.safetensors"
    tensors = {
        "x": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
        "y": np.arange(6, dtype=np.int8).reshape(2, 3),
        "z": np.ones(3, dtype=ml_dtypes.bfloat16),
    }
    save_safetensors(path, tensors, metadata={"format": "pt"})
    ref = safetensors.torch.load_file(path)
    np.testing.assert_array_equal(ref["x"].numpy(), tensors["x"])
    np.testing.assert_array_equal(ref["y"].numpy(), tensors["y"])
    assert ref["z"].dtype == torch.bfloat16
    assert safetensors.numpy.load_file(path.with_name("ours.safetensors"))["y"].dtype == np.int8


def test_truncated_file_is_an_error_naming_file_and_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"big": np.ones((64, 64), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(SafetensorsError, match=r"w\.safetensors.*truncated.*'big'"):
        load_safetensors(path)


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"\x01", "too short"),
        (struct.pack("<Q", 10**6) + b"{}", "corrupt or truncated"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
    ],
)
def test_corrupt_headers(tmp_path, blob, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(SafetensorsError, match=match):
        load_safetensors(path)


def test_unknown_dtype_and_wrong_span(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = json.dumps({"t": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(SafetensorsError, match="'t' has unsupported dtype 'C64'"):
        load_safetensors(path)
    header = json.dumps({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(SafetensorsError, match="'t' spans 8 bytes"):
        load_safetensors(path)


def test_released_pages_read_back_unchanged(tmp_path):
    """Loading drops each converted tensor's mapped pages; a later read gets the same data."""
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((300, 700)).astype(np.float32), "b": np.arange(5.0)}
    path = save_safetensors(tmp_path / "w.safetensors", tensors)
    loaded = load_safetensors(path)
    for key in ("a", "b"):
        release_pages(loaded[key])
        np.testing.assert_array_equal(loaded[key], tensors[key])
    release_pages(np.ones(3))  # not memory-mapped: nothing to do
