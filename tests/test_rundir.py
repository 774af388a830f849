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


def test_bfloat16_calibration_reads_back_as_float32(tmp_path):
    """numpy stores bfloat16 as opaque 2-byte records (dtype V2) that nothing can compute
    with: a bfloat16 run (`--dtype bfloat16`) writes float32, and the V2 files an older
    version wrote read back as float32 with the same values."""
    import ml_dtypes

    run = RunDir(tmp_path / "run")
    values = np.array([[1.5, -2.25], [3.0e-3, 65504.0]], np.float32)
    bf16 = values.astype(ml_dtypes.bfloat16)
    run.write_batch(0, {"unet_outputs": bf16}, {"conv_in": np.array([[-1.0, 2.0]])})
    got = run.references()["unet_outputs"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, bf16.astype(np.float32))
    legacy = tmp_path / "legacy.npz"
    np.savez(legacy, unet_outputs=bf16)  # what numpy writes for bfloat16 itself
    with np.load(legacy) as data:
        assert data["unet_outputs"].dtype == np.dtype("V2")
    run.batch_path(1).write_bytes(legacy.read_bytes())
    np.testing.assert_array_equal(run.batch_arrays(1, "unet_outputs")["unet_outputs"],
                                  bf16.astype(np.float32))  # fmt: skip


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


def test_recipe_choices_and_candidate_scores_round_trip(tmp_path):
    run = RunDir(tmp_path)
    assert run.chosen_bits("W4A8_mixdq", "act") is None
    run.write_chosen_bits("W4A8_mixdq", "act", {"conv_in": 16, "a": 4, "b": 8})
    assert run.chosen_bits("W4A8_mixdq", "act") == {"conv_in": 16, "a": 4, "b": 8}
    # the official-format file leaves the float layer out, as the official code reads it
    yaml_text = (run.recipe_dir("W4A8_mixdq") / "act.yaml").read_text()
    assert "model.a: 4" in yaml_text and "conv_in" not in yaml_text
    run.write_candidate_scores("W4A8_mixdq", "weight", {"scores": {"f1": 0.5}})
    assert run.candidate_scores("W4A8_mixdq", "weight")["scores"] == {"f1": 0.5}
    run.start_recipe("k", {"seed": 0, "target": "W4A8"})
    run.start_recipe("k", {"seed": 0, "target": "W4A8"})  # the same settings resume
    with pytest.raises(ValueError, match="seed"):
        run.start_recipe("k", {"seed": 1, "target": "W4A8"})
    other = run.with_sensitivity("sensitivity-nobos")
    assert other.sensitivity_dir == tmp_path / "sensitivity-nobos"
    assert other.calib_dir == run.calib_dir


def test_cached_evaluations_run_once(tmp_path):
    run = RunDir(tmp_path)

    class Out:
        metrics = {"content_score": 0.9}
        images = np.zeros((1, 2, 2, 3), np.float32)

    first = run.cached_eval("row", lambda: Out())
    again = run.cached_eval("row", lambda: pytest.fail("evaluated twice"))
    assert again["metrics"] == first["metrics"]
    np.testing.assert_array_equal(again["images"], Out.images)
