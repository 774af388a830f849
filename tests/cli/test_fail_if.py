"""``mixdq evaluate --fail-if``: a quality gate. A condition that holds names the metric, its
value and the bound and exits 3 after metrics.json is written; one that does not passes (exit
0); an unknown metric, or one this evaluation does not compute, is exit 2 before any work."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from mixdq_jax import cli
from mixdq_jax.cli import gate
from tests.cli.conftest import failed, mixdq


def test_the_gate_fails_with_exit_3_after_writing_metrics_and_passes_on_a_rerun(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "eval"
    common = ["evaluate", "--prompts", prompts, "--metrics", "ssim", "--batch", "2",
              "--cache", tmp_path / "cache", "--out", out]  # fmt: skip
    proc = mixdq(*common, "--fail-if", "compute_opt<2, storage_opt>100", "--fail-if",
                 "compute_opt>=1")  # fmt: skip
    err = failed(proc, 3, "quality gate failed: compute_opt = 1 < 2 (--fail-if compute_opt<2)",
                 "compute_opt = 1 >= 1", str(out / "metrics.json"))  # fmt: skip
    assert "storage_opt" not in err.split("quality gate failed")[-1]  # it held: not listed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compute"]["compute_opt"] == 1.0
    # the same folder again (its own earlier output: no --overwrite), a passing gate
    again = mixdq(*common, "--fail-if", "compute_opt<0.5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "quality gate passed (compute_opt<0.5)" in again.stderr


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--fail-if", "lpips>0.1"], ["argument --fail-if", "unknown metric 'lpips'",
                                      "lpips_vs_fp", "content_score"]),
        (["--fail-if", "psnr_vs_fp<30", "--prompts", "{p}", "--metrics", "ssim"],
         ["--fail-if psnr_vs_fp<30", "add psnr to --metrics"]),
        (["--fail-if", "fid>20"], ["--fail-if fid>20", "testbed evaluation", "content_score"]),
    ],
)  # fmt: skip
def test_a_metric_the_evaluation_does_not_compute_is_exit_2_before_work(
    tmp_path, capsys, argv, names
):
    (tmp_path / "p.txt").write_text("a red circle\n")
    argv = [a.replace("{p}", str(tmp_path / "p.txt")) for a in argv]
    try:
        code = cli.main(["evaluate", *argv, "--out", str(tmp_path / "o")])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and all(n in err for n in names) and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_conditions_and_their_verdicts(capsys):
    conds = gate.conditions(" lpips_vs_fp > 0.1,psnr_vs_fp<=30 ,ssim_vs_fp==1")
    assert [str(c) for c in conds] == ["lpips_vs_fp>0.1", "psnr_vs_fp<=30", "ssim_vs_fp==1"]
    for bad in ("lpips_vs_fp", "lpips_vs_fp=>1", "lpips_vs_fp>nan", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            gate.conditions(bad)
    values = {"lpips_vs_fp": 0.05, "psnr_vs_fp": None, "psnr_identical_images": 4,
              "ssim_vs_fp": 1.0}  # fmt: skip
    assert gate.apply(conds[:2], values, "mixdq evaluate", "m.json") == 0  # PSNR inf: passes
    assert gate.apply(conds, values, "mixdq evaluate", "m.json") == gate.GATE_FAILED
    assert "ssim_vs_fp = 1 == 1" in capsys.readouterr().err
    missing = {"lpips_vs_fp": None}
    assert gate.apply(conds[:1], missing, "mixdq evaluate", "m.json") == gate.GATE_FAILED
    assert "no value" in capsys.readouterr().err
    assert gate.conditions("fid<inf")[0].bound == math.inf
