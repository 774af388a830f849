"""One write policy for every command that writes (`mixdq_jax.cli.outputs`): a target must be
new, empty or the command's own earlier output, else ``--overwrite``; refused before any work,
naming the files, the user's files byte for byte unchanged; never inside the model folder;
a file where a folder goes (or the reverse) is named, not ``[Errno 17] File exists``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from mixdq_jax import official_format
from mixdq_jax.cli.outputs import Target, claim, output_file, output_folder, run_directory
from mixdq_jax.io_utils import LOCK_FILE, LockError, file_lock
from mixdq_jax.quant.registry import registry_from_unet_config
from tests.cli.conftest import ROOT, failed, fingerprint, in_process, mixdq

UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 1, "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
    "cross_attention_dim": 24, "norm_num_groups": 8, "use_linear_projection": True,
}  # fmt: skip


def _user_folder(path, **files: str):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (path / name.replace("__", "/")).write_text(text)
    return path




@pytest.fixture
def calibrated(tmp_path):
    """A run directory with official-format sensitivities of a tiny UNet (allocate reads it)."""
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text(json.dumps(UNET))
    run = tmp_path / "run"
    (run / "calib").mkdir(parents=True)
    (run / "calib" / "meta.json").write_text(json.dumps({"source": str(model)}))
    layers = registry_from_unet_config(model / "unet" / "config.json")
    rng = np.random.default_rng(0)
    sqnr = {layer.name: sorted(rng.uniform(0, 60, 3)) for layer in layers}
    ssim = {n.name: sorted(rng.uniform(0.5, 1, 3)) for n in layers if n.group == "content"}
    official_format.write_sensitivity(run / "sensitivity" / "weight_sqnr.yaml", sqnr)
    official_format.write_sensitivity(run / "sensitivity" / "weight_ssim.yaml", ssim)
    return run


# ------------------------------------------------------------------ the real entry point
def test_user_files_are_refused_before_any_work(tmp_path):
    """allocate FILE, allocate --k-sweep DIR (the user's index.json) and evaluate (the user's
    metrics.json and grid.png): exit 2, the files named, nothing changed, nothing compiled."""
    sens = _user_folder(tmp_path / "sens", weight_sqnr_yaml="", weight_ssim_yaml="")
    sizes = _user_folder(tmp_path / "in", **{"sizes.yaml": "model.conv_in: 1"}) / "sizes.yaml"
    mine = _user_folder(tmp_path / "mine", **{"w4.yaml": "model.conv_in: 8\n", "index.json":
                                               '{"my": "index"}', "metrics.json": "{}",
                                               "grid.png": "my picture"})  # fmt: skip
    before = fingerprint(mine)
    common = ["allocate", "--sensitivity", sens, "--sizes", sizes, "--kind", "weight",
              "--target", "4"]  # fmt: skip
    failed(mixdq(*common, "--out", mine / "w4.yaml"), 2, f"--out {mine / 'w4.yaml'}",
           "already exists", "--overwrite")  # fmt: skip
    failed(mixdq(*common, "--k-sweep", "--out", mine), 2, f"--out {mine}", "index.json",
           "--overwrite")  # fmt: skip
    err = failed(mixdq("evaluate", "--num", "2", "--out", mine), 2, f"--out {mine}",
                 "metrics.json", "grid.png", "would be replaced", "--overwrite")  # fmt: skip
    assert "compiling" not in err
    assert fingerprint(mine) == before


def test_a_run_directory_in_the_model_or_on_a_file_is_refused(tmp_path, model_copy):
    before = fingerprint(model_copy)
    run = model_copy / "runs" / "a"
    err = failed(mixdq("calibrate", "--model", model_copy, "--run", run, "--num-prompts", "1"), 2,
                 f"--run {run}", f"model folder {model_copy.resolve()}", "--model")  # fmt: skip
    assert "compiling" not in err
    assert fingerprint(model_copy) == before and not (model_copy / "runs").exists()
    afile = tmp_path / "notes.txt"
    afile.write_text("the user's")
    err = failed(mixdq("calibrate", "--run", afile, "--num-prompts", "1"), 2,
                 f"--run {afile} is a file, not a folder")  # fmt: skip
    assert "Errno" not in err and afile.read_text() == "the user's"


def test_a_file_lock_refuses_a_second_writer(tmp_path):
    target = tmp_path / "w4.yaml"
    hold = (
        "import sys, time\nfrom mixdq_jax.io_utils import file_lock\n"
        "with file_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", hold, str(target)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=f"pid {proc.pid}"), file_lock(target):
            pass
    finally:
        proc.kill()
        proc.wait()
    with file_lock(target):  # the holder died: free again, and the lock file is gone after
        pass
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ every command, in process
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["generate", "--prompt", "a", "--out", "{mine}"], "--out"),
        (["calibrate", "--num-prompts", "1", "--run", "{mine}"], "--run"),
        (["quantize", "--target", "W8A8", "--run", "{mine}"], "--run"),
        (["demo", "--out", "{mine}"], "--out"),
        (["evaluate", "--prompts", "{tmp}/p.txt", "--out", "{mine}"], "--out"),
        (["bench", "memory", "--unet-config", "{tmp}/unet.json", "--out", "{mine}/notes.txt"],
         "--out"),
        (["export", "--weight-bits", "8", "--out", "{mine}"], "--out"),
    ],
)  # fmt: skip
def test_every_command_refuses_a_folder_of_the_users(tmp_path, capsys, argv, flag):
    mine = _user_folder(tmp_path / "mine", **{"notes.txt": "the user's", "sub__a.png": "x"})
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "unet.json").write_text(json.dumps(UNET))
    before = fingerprint(mine)
    argv = [a.replace("{mine}", str(mine)).replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = in_process(capsys, argv)
    assert code == 2, err
    assert f"{flag} {mine}" in err and "notes.txt" in err and "--overwrite" in err, err
    assert fingerprint(mine) == before and not any(mine.glob("**/*.lock"))


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "a", "--model", "{model}", "--out", "{model}/images"],
        ["quantize", "--target", "W8A8", "--model", "{model}", "--run", "{model}"],
        ["demo", "--model", "{model}", "--out", "{model}/unet/run"],
        ["evaluate", "--model", "{model}", "--num", "1", "--out", "{model}/eval"],
        ["export", "--weight-bits", "8", "--model", "{model}", "--out", "{model}/w8"],
        ["sensitivity", "--model", "{model}", "--run", "{model}/run"],
    ],
)
def test_no_command_writes_into_the_model(capsys, model_copy, argv):
    if argv[0] == "sensitivity":  # a calibrated run inside the model (made by hand): refused
        (model_copy / "run" / "calib").mkdir(parents=True)
        (model_copy / "run" / "calib" / "act_ranges.npz").write_bytes(b"")
    before = fingerprint(model_copy)
    code, err = in_process(capsys, [a.replace("{model}", str(model_copy)) for a in argv])
    assert code == 2 and f"model folder {model_copy.resolve()} (--model)" in err, err
    assert fingerprint(model_copy) == before


def test_a_file_where_a_folder_goes_and_the_reverse(tmp_path, capsys, calibrated):
    afile = tmp_path / "a.txt"
    afile.write_text("the user's")
    for argv, names in [
        (["generate", "--prompt", "a", "--out", afile / "sub"], [f"{afile} is a file"]),
        (["demo", "--out", afile], [f"--out {afile} is a file, not a folder"]),
        (["allocate", "--run", calibrated, "--kind", "weight", "--target", "4", "--k-sweep",
          "--out", afile], [f"--out {afile} is a file"]),
        (["allocate", "--run", calibrated, "--kind", "weight", "--target", "4", "--out",
          tmp_path], [f"--out {tmp_path} is a folder"]),
    ]:  # fmt: skip
        code, err = in_process(capsys, argv)
        assert code == 2 and all(n in err for n in names) and "Errno" not in err, err
    assert afile.read_text() == "the user's"


def test_own_output_is_rewritten_and_overwrite_replaces(tmp_path, capsys, calibrated):
    """allocate: a rerun into its own sweep folder is fine; an existing file needs
    --overwrite; the run's sizes land in the run directory (claimed and locked)."""
    common = ["allocate", "--run", calibrated, "--kind", "weight", "--target", "4"]
    sweep = tmp_path / "sweep"
    for _ in range(2):
        code, err = in_process(capsys, [*common, "--k-sweep", "--b-num", "1", "--out", sweep])
        assert code == 0, err
    assert (sweep / "index.json").is_file() and not any(sweep.glob(f"*{LOCK_FILE}"))
    out = tmp_path / "w4.yaml"
    assert in_process(capsys, [*common, "--out", out])[0] == 0
    written = out.read_bytes()
    code, err = in_process(capsys, [*common[:-1], "5", "--out", out])
    assert code == 2 and f"--out {out} already exists" in err and out.read_bytes() == written
    assert in_process(capsys, [*common[:-1], "5", "--out", out, "--overwrite"])[0] == 0
    assert out.read_bytes() != written
    assert (calibrated / "sensitivity" / "weight_sizes.yaml").is_file()
    assert not list(tmp_path.rglob(f"*{LOCK_FILE}"))


def test_claim_rules(tmp_path):
    """The policy itself: inputs of the command do not count as the user's files, a
    recognised folder or file is the command's own, --overwrite lets anything through."""
    args = argparse.Namespace(command="calibrate", overwrite=False, config=None)
    run = _user_folder(tmp_path / "run", **{"recipe.yaml": "a: 1"})
    args.config = run / "recipe.yaml"
    with claim(args, run_directory("--run", run)):
        assert (run / LOCK_FILE).is_file()
    assert not (run / LOCK_FILE).exists()
    (run / "calib").mkdir()
    (run / "calib" / "notes.txt").write_text("x")
    args.config = None
    with pytest.raises(ValueError, match="not a mixdq run directory.*calib/notes.txt"):
        with claim(args, run_directory("--run", run)):
            pass
    (run / "calib" / "meta.json").write_text("{}")
    with claim(args, run_directory("--run", run)):  # a calibrated run: its own
        pass
    ours = output_file("--out", tmp_path / "r.json", own=lambda p: "ours" in p.read_text())
    (tmp_path / "r.json").write_text("ours")
    with claim(args, ours):
        pass
    (tmp_path / "r.json").write_text("theirs")
    with pytest.raises(ValueError, match="already exists"), claim(args, ours):
        pass
    args.overwrite = True
    with claim(args, ours, output_folder("--out", run, own=lambda p: False)):
        pass
    plain = Target(flag="--out", path=tmp_path / "new", what="output folder", own=None)
    with claim(argparse.Namespace(command="export"), plain):  # the command checks contents
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()  # created for the command, left empty: removed
