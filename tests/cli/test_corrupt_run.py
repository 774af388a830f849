"""Damaged files in a run directory: a corrupt calibration batch or sweep chunk found on
resume is named, set aside as ``<name>.corrupt`` (never deleted) and recomputed; a corrupt
file a stage only reads is a message naming it, not a traceback."""

from __future__ import annotations

import numpy as np
import pytest

from mixdq_jax.rundir import CorruptFileError, RunDir
from tests.cli.conftest import failed, mixdq


def test_calibrate_recomputes_a_truncated_batch(tmp_path):
    run = tmp_path / "run"
    argv = ("calibrate", "--num-prompts", "2", "--batch-size", "1", "--run", run)
    first = mixdq(*argv)
    assert first.returncode == 0, first.stderr[-3000:]
    batch = run / "calib" / "batch_00001.npz"
    good = np.load(batch)["range/conv_in"]
    damaged = batch.read_bytes()[: batch.stat().st_size // 2]
    batch.write_bytes(damaged)
    again = mixdq(*argv)
    err = failed(again, 0, "warning", str(batch), "batch_00001.npz.corrupt")
    assert "batch_00000" not in err  # the intact batch is kept
    assert (run / "calib" / "batch_00001.npz.corrupt").read_bytes() == damaged  # kept aside
    np.testing.assert_array_equal(np.load(batch)["range/conv_in"], good)  # recomputed
    # a damaged file that sensitivity only reads: named, exit 2
    ranges = run / "calib" / "act_ranges.npz"
    ranges.write_bytes(ranges.read_bytes()[:100])
    failed(mixdq("sensitivity", "--run", run, "--kind", "weight"), 2, str(ranges), "corrupt")


def test_a_corrupt_sweep_chunk_is_set_aside_and_rerun(tmp_path):
    run = RunDir(tmp_path)
    run.write_chunk("weight", "sqnr", 0, [("a", 2), ("a", 4)], np.array([1.5, 2.5]))
    run.write_chunk("weight", "sqnr", 1, [("b", 2)], np.array([3.0]))
    chunk = run.sweep_dir("weight") / "sqnr_00001.npz"
    chunk.write_bytes(chunk.read_bytes()[:-40])
    with pytest.warns(UserWarning, match="sqnr_00001.npz"):
        done = run.read_chunks("weight", "sqnr")
    assert done == {("a", 2): 1.5, ("a", 4): 2.5}  # b runs again
    assert (chunk.parent / "sqnr_00001.npz.corrupt").is_file() and not chunk.exists()
    assert run.next_chunk_number("weight", "sqnr") == 1


def test_corrupt_calibration_files_are_named(tmp_path):
    run = RunDir(tmp_path)
    run.start_calibration({"config": {}})
    run.write_batch(0, {"latents": np.ones(2)}, {"conv_in": np.zeros((1, 2))})
    path = run.batch_path(0)
    path.write_bytes(b"not a zip file")
    with pytest.raises(CorruptFileError, match="batch_00000.npz"):
        run.references()
    with pytest.warns(UserWarning, match="batch_00000.npz"):
        assert not run.has_batch(0)  # set aside, so calibration computes it again
    assert not path.exists() and path.with_name("batch_00000.npz.corrupt").is_file()
    run.calib_meta_path.write_text('{"config": ')
    with pytest.raises(CorruptFileError, match="meta.json"):
        run.calib_meta()
