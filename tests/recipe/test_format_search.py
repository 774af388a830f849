"""`mixdq quantize --budget ... --costs ...` on a tiny SDXL: the format per layer meets the
budget, protected layers keep float activations, the run resumes, and refused budgets cost
nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixdq_jax.cli import main
from mixdq_jax.deploy import layer_costs
from mixdq_jax.deploy.layer_costs import SCHEMA
from mixdq_jax.quant.layer_formats import LAYER_FORMATS
from mixdq_jax.quant.registry import unet_layers
from mixdq_jax.recipe.format_search import format_spec
from mixdq_jax.sensitivity import evaluator as evaluator_module
from tests.tiny_models import SMALL_UNET, build_sdxl

PROMPTS = ["a red cube", "a blue ball on grass", "a cat"]
FORMATS = ("float", "fp8", "w8a8", "w4a8", "w4a16")
# made-up per-layer latency fractions of float, one per format (the costs are the program's
# input data; measuring them is tests/deploy/test_layer_costs.py's job)
MS = {"float": 1.0, "fp8": 0.9, "w8a8": 0.6, "w4a8": 0.45, "w4a16": 0.8}


def _table(pipe_dir, path):
    """A schema-valid cost table for the tiny UNet: ms from MS x the layer's weight count,
    bytes from the bits, BOPs from bits x weights."""
    config = json.loads((pipe_dir / "unet" / "config.json").read_text())
    from mixdq_jax.models.unet import UNetConfig  # noqa: PLC0415

    layers = {}
    for info in unet_layers(UNetConfig.from_dict(config)):
        size = info.weight_params
        fmts = {}
        for f in FORMATS:
            lf = LAYER_FORMATS[f]
            fmts[f] = {"ms": MS[f] * size / 1e4, "bytes": size * min(lf.w_bits, 32) // 8,
                       "bops": size * min(lf.w_bits, 16) * min(lf.a_bits, 16)}  # fmt: skip
        layers[info.name] = {"kind": info.kind,
                             "input_shape": [1, 8], "weight_shape": list(info.weight_shape),
                             "macs": size, "formats": fmts}  # fmt: skip
    table = {
        "schema": SCHEMA,
        "settings": {"model_hash": "tiny", "batch": 1, "latent": [8, 8], "seq_len": 77,
                     "formats": list(FORMATS), "float_dtype": "float32",
                     "kernel_backend": "auto", "platform": "cpu", "device_kind": "cpu",
                     "rank_fraction": None, "symmetric_weights": True},
        "device": "cpu", "backend": "cpu", "layers": layers, "totals": {},
    }  # fmt: skip
    path.write_text(json.dumps(table))
    return table


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    pipe_dir = build_sdxl(root / "pipe", unet_overrides=SMALL_UNET)
    return pipe_dir, root / "prompts.txt", _table(pipe_dir, root / "costs.json")


def _args(model, run, *budgets):
    pipe_dir, prompts, _ = model
    return ["quantize", "--model", str(pipe_dir), "--prompts", str(prompts), "--num-calib", "2",
            "--num-select", "1", "--batch-size", "1", "--chunk", "16", "--run", str(run),
            "--costs", str(pipe_dir.parent / "costs.json"),
            *[a for b in budgets for a in ("--budget", b)]]  # fmt: skip


def test_budget_run_meets_the_budget_and_resumes(model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(_args(model, run, "latency=0.7")) == 0
    record = json.loads((run / "quantize" / "formats_latency0.7" / "formats.json").read_text())
    table = model[2]
    chosen = record["formats"]
    assert set(chosen) == set(table["layers"])
    summed = sum(table["layers"][n]["formats"][f]["ms"] for n, f in chosen.items())
    float_ms = sum(e["formats"]["float"]["ms"] for e in table["layers"].values())
    assert summed == pytest.approx(record["costs"]["latency"])
    assert summed <= 0.7 * float_ms * (1 + 1e-9)
    assert summed >= 0.6 * float_ms  # the least loss spends the budget, not far below it
    assert record["protected"], "MixDQ's top-1% protection keeps some activations float"
    for name in record["protected"]:
        assert LAYER_FORMATS[chosen[name]].a_bits == 16
    assert len(set(chosen.values())) >= 2
    report = json.loads((run / "quantize" / "formats_latency0.7" / "report.json").read_text())
    assert report["measured_ms"] > 0 and report["measured_float_ms"] > 0
    assert 0 < report["ssim_vs_fp"] <= 1
    md = (run / "quantize" / "formats_latency0.7" / "report.md").read_text()
    assert all(f"| {n} | {f} |" in md for n, f in chosen.items())
    spec = format_spec(chosen, symmetric_weights=True)
    assert spec.fp8_layers == {n for n, f in chosen.items() if f == "fp8"}

    # a rerun resumes: the format sweep reads its chunks and evaluates nothing
    def boom(*a, **k):
        raise AssertionError("the resumed run swept again")

    monkeypatch.setattr(evaluator_module.Evaluator, "evaluate", boom)
    # (the whole-UNet timing of the report is measured above; here it would only recompile)
    monkeypatch.setattr(layer_costs, "unet_latency_for", lambda *a, **k: 1.0)
    assert main(_args(model, run, "latency=0.7")) == 0
    again = json.loads((run / "quantize" / "formats_latency0.7" / "formats.json").read_text())
    assert again["formats"] == chosen
    # a second budget on the same run reuses the sweep too, and holds both budgets
    assert main(_args(model, run, "latency=0.9", "size=2x")) == 0
    both = json.loads((run / "quantize" / "formats_latency0.9_size2x" / "formats.json")
                      .read_text())  # fmt: skip
    assert both["costs"]["bytes"] <= both["float_costs"]["bytes"] / 2 * (1 + 1e-9)
    assert both["costs"]["latency"] <= 0.9 * float_ms * (1 + 1e-9)


def test_refused_budgets_and_arguments_cost_nothing(model, tmp_path, capsys):
    run = tmp_path / "refused"
    # the cheapest format (w4a8, 0.45 of float) cannot reach 0.3
    assert main(_args(model, run, "latency=0.3")) != 0
    err = capsys.readouterr().err
    assert "cannot be met" in err and "0.450 of float" in err
    assert not (run / "calib").exists()
    assert main(_args(model, run, "speed=2x")) != 0
    assert "--budget" in capsys.readouterr().err
    args = _args(model, run, "latency=0.5")
    with pytest.raises(SystemExit) as info:  # refused at parse time
        main([*args, "--target", "W8A8"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err
    no_costs = [a for a in args if a != "--costs" and not a.endswith("costs.json")]
    assert main(no_costs) != 0
    assert "--costs" in capsys.readouterr().err


def test_latency_budget_with_a_fit_counts_the_part_no_layer_holds():
    """With the table's fit (whole UNet ~= a x sum + b), latency=F is a fraction of the
    corrected prediction: b does not shrink, so the least achievable F is (a x cheapest + b)
    / (a x float + b), and a lower F is refused naming it."""
    from mixdq_jax.allocation.milp import InfeasibleBudget  # noqa: PLC0415
    from mixdq_jax.recipe import format_search  # noqa: PLC0415

    costs = {r: {"l1": {"float": 10.0, "w8a8": 4.0}, "l2": {"float": 10.0, "w8a8": 6.0}}
             for r in ("latency", "bytes", "bops")}  # fmt: skip
    fit = {"a": 1.0, "b_ms": 20.0}
    # float: 20 + 20 = 40 ms; cheapest: 10 + 20 = 30 ms -> 0.75 of float at best
    format_search._precheck(costs, ["latency=0.75"], fit)
    with pytest.raises(InfeasibleBudget, match=r"0\.750 of float's 40 ms.*latency=0\.750"):
        format_search._precheck(costs, ["latency=0.7"], fit)
    format_search._precheck(costs, ["latency=0.5"], None)  # without a fit: of the sum (0.5)
    program = format_search.FormatProgram(
        {"l1": {"float": 0, "w8a8": 1}, "l2": {"float": 0, "w8a8": 1}}, costs
    )
    # 0.875 of the corrected 40 ms = 35 ms -> the layers' sum may be 15: one layer at w8a8
    assert format_search._limit(program, "latency", 0.875, "fraction", fit) == pytest.approx(15)
    assert program.solve({"latency": 15}).formats == {"l1": "w8a8", "l2": "float"}


def test_a_choice_with_fp8_layers_exports_loads_and_matches_fake_quant(model, tmp_path):
    """Per-layer FP8 (and int, weight-only, float) layers packed into a folder: loaded, the
    deployed UNet's images equal the fake-quantized ones to the 8-bit rounding floor."""
    from mixdq_jax.api import load_pipeline  # noqa: PLC0415
    from mixdq_jax.calibrate import CalibConfig, calibrate  # noqa: PLC0415
    from mixdq_jax.deploy.checkpoint import export_quantized_pipeline  # noqa: PLC0415
    from mixdq_jax.quant.registry import layer_splits  # noqa: PLC0415
    from mixdq_jax.rundir import RunDir  # noqa: PLC0415

    pipe = load_pipeline(model[0])
    calibrate(pipe, CalibConfig(prompts=PROMPTS[:1], height=32, width=32, batch_size=1),
              tmp_path / "run")  # fmt: skip
    names = [info.name for info in unet_layers(pipe.unet.config)]
    chosen = {n: ("fp8", "w8a8", "w4a16", "float")[i % 4] for i, n in enumerate(names)}
    spec = format_spec(chosen, symmetric_weights=True)
    ranges = RunDir(tmp_path / "run").act_ranges()
    export_quantized_pipeline(pipe, spec, tmp_path / "out", calib=ranges, float_dtype="float32")
    kw = dict(num_inference_steps=1, height=32, width=32, seed=0)
    deployed = np.asarray(load_pipeline(tmp_path / "out")(PROMPTS[:1], **kw))
    qconfig = spec.to_qconfig(layer_splits(unet_layers(pipe.unet.config)), ranges)
    fake = np.asarray(pipe(PROMPTS[:1], qconfig=qconfig, **kw))
    float_images = np.asarray(pipe(PROMPTS[:1], **kw))
    # layer by layer the two paths agree to float rounding (tests/deploy/test_layer_costs.py);
    # end to end, 8-bit codes on a rounding boundary flip and the flips grow through the
    # network (DESIGN: 7-9% of W8A8 codes differ by the up blocks): measured here 0.15 of the
    # quantization error itself, so bound it well below the error, not at zero
    assert np.abs(deployed - fake).max() < 0.05
    assert np.abs(deployed - fake).mean() < 0.3 * np.abs(fake - float_images).mean()
