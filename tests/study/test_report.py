"""The study's report states Tables 1 and 3 from the rows' results, honestly labelled."""

from __future__ import annotations

from mixdq_jax.methods import METHODS, Target
from mixdq_jax.study import StudyConfig
from mixdq_jax.study.report import table


def _metrics(w: float, a: float, floats: int, mb: float | None) -> dict:
    w, a = float(w), float(a)
    return {
        "weight_avg_bits": w, "act_effective_bits": a, "act_float_layers": ["x"] * floats,
        "content_score": 0.9, "frechet_distance": 1.0, "ssim_vs_fp": 0.99, "psnr_vs_fp": 40.0,
        "unet_mb": mb, "compute_opt": 256.0 / (w * a) if a < 16 else 1.0,
    }  # fmt: skip


def test_tables_list_every_row_and_the_w8a8_ablation_in_order():
    config = StudyConfig(targets=(Target.parse("W8A8"), Target.parse("W3.66A16")))
    results = {
        "float": {"content_score": 0.95, "frechet_distance": 0.5, "unet_mb": 3.6},
        "W8A8_naive": _metrics(8, 8, 0, 1.9),
        "W8A8_naive+bos": _metrics(8, 8, 0, 1.9),
        "W8A8_sqnr-mp": _metrics(8, 7.98, 2, 1.9),
        "W8A8_fp8": _metrics(8, 8, 0, None),
        "W8A8_mixdq-no-bos": _metrics(8, 7.99, 3, 1.9),
        "W8A8_mixdq": _metrics(8, 7.99, 3, 1.9),
        "W3.66A16_naive": {"skipped": "needs a whole weight bit-width"},
        "W3.66A16_naive+bos": {"skipped": "needs a whole weight bit-width"},
        "W3.66A16_mixdq": _metrics(3.65, 16, 0, 0.95),
    }
    text = table(config, results, 60.0)
    table1, table3 = text.split("## Table 3")
    assert "| W8A8 | MixDQ | 8.00 | 7.99 | 3 |" in table1
    assert "| W8A8 | naive PTQ | 8.00 | 8.00 | 0 | 0.900 | 1.00 | 0.990 | 40.0 | 1.90 | 4.00 |" in (
        table1
    )
    assert "| W3.66A16 | MixDQ | 3.65 | 16.00 | 0 |" in table1 and "| 0.95 | 1.00 |" in table1
    assert "| W8A8 | FP8 e4m3 | 8.00 | 8.00 | 0 |" in table1 and "| - | 4.00 |\n" in table1
    assert "| W3.66A16 | naive PTQ | n/a |" in table1
    rows = [line.split("|")[2].strip() for line in table3.splitlines() if line.startswith("| W8A8")]
    assert rows == [METHODS[n].title for n in ("naive", "naive+bos", "sqnr-mp", "mixdq")]


def test_the_report_names_the_preset_and_objective():
    config = StudyConfig(targets=(Target.parse("W8A8"),))
    labels = {"preset": "ours", "method_settings": {}}
    results = {
        "float": {"content_score": 0.95, "frechet_distance": 0.5, "unet_mb": 3.6},
        "W8A8_naive": {**_metrics(8, 8, 0, 1.9), **labels, "objective": None},
        "W8A8_mixdq": {**_metrics(8, 7.99, 3, 1.9), **labels, "objective": "noise"},
    }
    text = table(config, results, 60.0)
    assert "Quantizer preset: ours; the integer programs' objective: noise" in text


def test_the_papers_metrics_replace_the_judge_on_another_model():
    """With `StudyConfig.evaluation` on a model other than the testbed, Table 1 holds the
    paper's metrics (only the columns some row computed) and no judge columns."""
    methods = (METHODS["naive"], METHODS["mixdq"])
    config = StudyConfig(model="/models/sdxl-turbo", targets=(Target.parse("W8A8"),),
                         methods=methods, evaluation=object())  # fmt: skip
    assert not config.judged and StudyConfig().judged
    paper = {"prompts": 1024, "clip_score": 0.2612, "ssim_vs_fp": 0.91, "psnr_vs_fp": 23.456}
    results = {
        "float": {"unet_mb": 5135.0, "compute_opt": 1.0, "paper": {"prompts": 1024,
                                                                   "clip_score": 0.2634}},
        "W8A8_naive": {**_metrics(8, 8, 0, 2570.0), "paper": paper},
        "W8A8_mixdq": {**_metrics(8, 7.99, 3, 2580.0), "paper": {**paper, "fid": 21.5}},
    }  # fmt: skip
    for row in ("W8A8_naive", "W8A8_mixdq"):
        for judge in ("content_score", "frechet_distance", "ssim_vs_fp", "psnr_vs_fp"):
            del results[row][judge]
    text = table(config, results, 60.0)
    assert "## Table 1: every target" not in text and "content score" not in text
    assert "grid.png" not in text and "1024 evaluation prompts" in text
    header = next(line for line in text.splitlines() if line.startswith("| setting"))
    assert header == ("| setting | method | W bits | A bits (eff.) | FID | CLIP score | "
                      "SSIM vs FP | PSNR vs FP | UNet MB | BOPs saving |")  # fmt: skip
    assert "| - | float | 16 | 16 | - | 0.2634 | - | - | 5135.00 | 1.00 |" in text
    naive = "| W8A8 | naive PTQ | 8.00 | 8.00 | - | 0.2612 | 0.9100 | 23.46 | 2570.00 | 4.00 |"
    assert naive in text
    assert "| W8A8 | MixDQ | 8.00 | 7.99 | 21.50 | 0.2612 |" in text


def test_reconstruction_rows_get_the_papers_table_2_at_w8a8():
    from mixdq_jax.methods import RECONSTRUCTION_METHODS  # noqa: PLC0415

    methods = (METHODS["naive"], RECONSTRUCTION_METHODS["qdiffusion"],
               RECONSTRUCTION_METHODS["ptqd"], METHODS["mixdq"])  # fmt: skip
    config = StudyConfig(targets=(Target.parse("W8A8"),), methods=methods)
    results = {"float": {"content_score": 0.95, "frechet_distance": 0.5, "unet_mb": 3.6}}
    for m in methods:
        results[f"W8A8_{m.name}"] = _metrics(8, 8, 0, 1.9)
    text = table(config, results, 60.0)
    table2 = text.split("## Table 2")[1].split("## Table 3")[0]
    rows = [line.split("|")[2].strip() for line in table2.splitlines() if line.startswith("| W8A8")]
    # the paper's order: PTQD, Q-Diffusion (EDA-DM absent here) between naive PTQ and MixDQ
    assert rows == ["naive PTQ", "PTQD", "Q-Diffusion", "MixDQ"]
    # no reconstruction row: no Table 2
    assert "## Table 2" not in table(StudyConfig(targets=(Target.parse("W8A8"),)), results, 1.0)
