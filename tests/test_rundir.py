"""The run directory: atomic round trips, settings checks, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from mixdq_jax.rundir import KEY_NOISE, RunDir


def test_calibration_files_round_trip(tmp_path):
    run = RunDir(tmp_path / "run")
    meta = {"config": {"seed": 0}, "source": "x"}
    run.start_calibration(meta)
    run.start_calibration(meta)  # resuming with the same settings is fine
    with pytest.raises(ValueError, match="other settings"):
        run.start_calibration({"config": {"seed": 1}, "source": "x"})
    a = {"latents": np.ones((2, 4)), "unet_inputs": np.zeros((1, 2, 3)), KEY_NOISE: np.arange(2)}
    run.write_batch(0, a, {"conv_in": np.array([[-1.0, 2.0]])})
    run.write_batch(1, a, {"conv_in": np.array([[-3.0, 1.0]])})
    assert run.batch_indices() == [0, 1] and run.has_batch(1) and not run.has_batch(2)
    np.testing.assert_array_equal(run.batch_ranges(1)["conv_in"], [[-3.0, 1.0]])
    refs = run.references()
    assert set(refs) == {"latents", "unet_inputs"}  # the key and ranges are not references
    assert refs["latents"].shape == (4, 4) and refs["unet_inputs"].shape == (1, 4, 3)
    np.testing.assert_array_equal(run.batch_arrays(0, KEY_NOISE)[KEY_NOISE], [0, 1])
    with pytest.raises(FileNotFoundError, match="mixdq calibrate"):
        run.act_ranges()
    run.write_act_ranges({"conv_in": np.array([[-3.0, 2.0]])})
    np.testing.assert_array_equal(run.act_ranges()["conv_in"], [[-3.0, 2.0]])
    assert not list(run.calib_dir.glob("*.tmp*"))  # atomic writes leave no temp files


def test_batch_without_a_stored_key_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path)
    run.start_calibration({"config": {}})
    run.write_batch(0, {"latents": np.ones(2)}, {})
    with pytest.raises(ValueError, match="key_noise.*calibrate again"):
        run.batch_arrays(0, "timesteps", KEY_NOISE)


def test_sweep_chunks_resume_and_settings_check(tmp_path):
    run = RunDir(tmp_path)
    run.start_sweep("weight", {"bos_aware": True})
    with pytest.raises(ValueError, match="other quantizer settings"):
        run.start_sweep("weight", {"bos_aware": False})
    assert run.next_chunk_number("weight", "sqnr") == 0
    run.write_chunk("weight", "sqnr", 0, [("a", 2), ("a", 4)], np.array([1.5, 2.5]))
    run.write_chunk("weight", "sqnr", 1, [("b", 2)], np.array([3.0]))
    assert run.next_chunk_number("weight", "sqnr") == 2
    assert run.read_chunks("weight", "sqnr") == {("a", 2): 1.5, ("a", 4): 2.5, ("b", 2): 3.0}
    assert run.read_chunks("weight", "ssim") == {}


def test_cached_configs_and_evaluations_run_once(tmp_path):
    run = RunDir(tmp_path)
    calls = []

    def make():
        calls.append(1)
        return {"conv_in": 4, "conv_out": 8}

    assert run.cached_bits("W4", make) == run.cached_bits("W4", make) == make()
    assert len(calls) == 2  # the cached call did not run make()

    class Out:
        metrics = {"content_score": 0.9}
        images = np.zeros((1, 2, 2, 3), np.float32)

    first = run.cached_eval("row", lambda: Out())
    again = run.cached_eval("row", lambda: pytest.fail("evaluated twice"))
    assert again["metrics"] == first["metrics"]
    np.testing.assert_array_equal(again["images"], Out.images)
