"""``mixdq quantize``: the whole MixDQ recipe on a model in one resumable command.

Calibrate, sweep the metric-decoupled sensitivities, allocate weight and activation bits
(Algorithm 1), pick the candidates by image error vs float on held-out prompts, export the
quantized folder and write a report. Every stage writes into ``--run`` as it goes; run the
same command again to resume after a kill. ``--stop-after STAGE`` ends after one stage, so
the sweep can run on one machine and the rest on another (copy the run directory).

Methods (the paper's rows): ``naive`` (uniform, no BOS handling), ``naive+bos``,
``sqnr-mp`` (SQNR-only mixed precision for weights and activations), ``fp8`` (W8A8 only, no
export), ``mixdq-no-bos``, ``mixdq`` (default); with learned rounding (a ``reconstruct`` stage
after ``acts``, block by block, resumable): ``qdiffusion`` (BRECQ + AdaRound + LSQ steps on
uniform bits), ``ptqd`` (that plus PTQD's noise correction, fitted as the authors' code
does: folded into ``conv_out`` at one step, in the sampling loop and the exported folder at
several; ``ptqd-pooled``: our earlier pooled fit), ``mixdq+adaround`` (MixDQ's bits with
learned rounding), ``edadm`` (EDA-DM: Q-Diffusion's reconstruction with calibration samples
spread over the sampling steps by TDAC, every sample at one step, and fine-grained block
reconstruction: the inner layers' output errors added to the block loss; the authors'
released MS-COCO settings: weight 0.8, TDAC lambda 5, 256 calibration prompts, their learning
rates; ``edadm-testbed``: the testbed's shortened settings). Beyond the paper (W4A4 and any
``W<b>A4``, a ``lowrank`` stage after calibration; docs/lowrank.md): ``svdquant`` (SVDQuant's
smoothing, 16-bit low-rank branch and groups of 64) and ``mixdq+lowrank`` (MixDQ's
metric-decoupled search in that format). A method of your own:
``--plugin FILE`` with a file that registers it (``examples/custom_method.py``; README,
"Your own method").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixdq_jax.cli import argtypes
from mixdq_jax.cli.config_file import (
    EXPORT_SETTINGS_FILE,
    SETTINGS_FILE,
    add_config_option,
    write_run_settings,
    write_settings,
)
from mixdq_jax.cli.format_args import add_lowrank_args, with_lowrank_args
from mixdq_jax.cli.metric_args import add_report_eval_args, report_eval
from mixdq_jax.cli.model_args import MODEL_HELP, add_model_args
from mixdq_jax.cli.preset_args import add_allocation_args, add_preset_arg, allocation_options
from mixdq_jax.cli.quant_args import add_dtype_arg, resolve_dtype
from mixdq_jax.cli.recon_args import add_recon_args, recon_config

STAGES = (
    "calibrate", "lowrank", "sensitivity", "weights", "acts", "reconstruct", "export", "report",
)  # fmt: skip
_count = argtypes.positive_int
DEFAULT_FORMATS = ("float", "fp8", "w8a8", "w4a8", "w4a16")  # layer_formats' default search


def target_arg(text: str):
    from mixdq_jax.methods import Target  # noqa: PLC0415

    try:
        return Target.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quantize",
        help="the whole MixDQ recipe: calibrate, sweep, allocate, select, export",
        description=__doc__ + _CONFIG_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --target TARGET --run RUN [--model MODEL] [--method METHOD] [--out OUT] "
        "[option ...]\n       %(prog)s --budget latency=F --costs COSTS.json --run RUN "
        "[--model MODEL] [--out OUT] [option ...]\n       %(prog)s --config FILE [option ...]",
    )
    # --help: the everyday options first, the rest under their own headings
    p = parser.add_argument_group("the everyday options")
    add_config_option(p)
    add_model_args(p, help_text=f"the float model: {MODEL_HELP}; default: testbed", variant=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--target", type=target_arg, default=None,
        help="W8A8, W5A8, W4A8, W3.66A16, ... (or --budget instead)",
    )  # fmt: skip
    which.add_argument(
        "--budget", action="append", default=None, metavar="RESOURCE=VALUE",
        help="instead of --target, a format per layer under a measured budget "
        "(docs/formats.md): latency=F (a fraction of the float UNet's latency), size=Nx or "
        "bops=Nx (N times fewer stored bytes / bit operations); repeat for several at once; "
        "needs --costs",
    )  # fmt: skip
    p.add_argument(
        "--method", default="mixdq", metavar="NAME",
        help="a registered method (default: mixdq): the paper's rows and baselines (README; "
        "an unknown name lists every registered one), or one a --plugin file registers",
    )  # fmt: skip
    p.add_argument(
        "--plugin", type=argtypes.existing_file, action="append", default=[], metavar="FILE",
        help="a Python file that registers methods (mixdq_jax.methods.register_method); "
        "repeat for several (examples/custom_method.py)",
    )  # fmt: skip
    p.add_argument(
        "--run", type=Path, required=True,
        help="run directory (resumable): new, empty or an earlier run's; not inside --model",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="quantized pipeline folder to write")
    add_preset_arg(p)
    p.add_argument(
        "--prompts", type=argtypes.existing_file, default=None,
        help="text file, one prompt per line, or a COCO captions .json (captions_val2014.json: "
        "the first caption of a seeded random sample of images, as the paper calibrates on "
        "COCO): the first --num-calib calibrate, the next --num-select pick among candidates "
        "(default: the shipped prompts; testbed captions for the testbed)",
    )  # fmt: skip
    p.add_argument("--num-calib", type=_count, default=32, help="calibration prompts (32)")
    p.add_argument("--num-select", type=_count, default=4, help="held-out selection prompts (4)")
    p.add_argument(
        "--steps", type=_count, default=1,
        help="sampling steps (1); more than one samples the testbed with LCMScheduler, other "
        "models with their folder's scheduler (unless --scheduler)",
    )  # fmt: skip
    p.add_argument("--stop-after", choices=STAGES, default="report")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out replace files in a non-empty folder that is not an earlier export, and "
        "--run write into a non-empty folder that is not a run directory (files they do not "
        "write are kept)",
    )
    g = parser.add_argument_group("sampling")
    g.add_argument("--guidance-scale", type=argtypes.nonneg_float, default=0.0)
    g.add_argument("--height", type=_count, default=None, help="default: the model's native size")
    g.add_argument("--width", type=_count, default=None)
    g.add_argument("--seed", type=argtypes.seed, default=0)
    g.add_argument("--batch-size", type=_count, default=8, help="images per batch (8)")
    g.add_argument(
        "--scheduler",
        type=argtypes.scheduler_name,
        default=None,
        help="override, e.g. LCMScheduler",
    )
    g = parser.add_argument_group("sensitivity sweep and bit allocation")
    add_allocation_args(g)
    g.add_argument("--chunk", type=_count, default=8, help="sweep configurations per call (8)")
    g.add_argument(
        "--selection-chunk", type=_count, default=None,
        help="candidates rendered per compiled call when picking (1: a pipeline call each; "
        "default 1 on a CPU, 8 on an accelerator)",
    )  # fmt: skip
    g.add_argument(
        "--selection-parallel", choices=("vmap", "map"), default=None,
        help="how a selection chunk runs (default: map on a CPU, vmap elsewhere)",
    )  # fmt: skip
    add_recon_args(parser.add_argument_group(
        "learned rounding (methods that reconstruct blocks: qdiffusion, ptqd, edadm, ...)"
    ))  # fmt: skip
    add_lowrank_args(parser.add_argument_group(
        "the low-rank group format (svdquant, mixdq+lowrank)"
    ))  # fmt: skip
    g = parser.add_argument_group("a format per layer under --budget (docs/formats.md)")
    g.add_argument(
        "--costs", type=argtypes.existing_file, default=None, metavar="COSTS.json",
        help="the per-layer cost table (mixdq bench layers --out COSTS.json)",
    )  # fmt: skip
    g.add_argument(
        "--formats", default=",".join(DEFAULT_FORMATS), metavar="LIST",
        help=f"candidate formats per layer (default {','.join(DEFAULT_FORMATS)})",
    )  # fmt: skip
    g = parser.add_argument_group("the source model")
    g.add_argument("--variant", default=None, help="weight variant of the source, e.g. fp16")
    g.add_argument(
        "--lora", type=argtypes.existing_file, default=None,
        help="LoRA safetensors fused before quantizing (e.g. LCM-LoRA on SD1.5; the export "
        "then holds the fused UNet)",
    )  # fmt: skip
    g.add_argument("--lora-scale", type=argtypes.finite_float, default=1.0)
    add_dtype_arg(g)
    add_report_eval_args(parser)
    parser.set_defaults(func=run)


_CONFIG_NOTE = f"""
The options can come from a file: `mixdq quantize --config recipe.yaml`, keys the long option
names (num-calib or num_calib), e.g.

    model: testbed
    target: W4A8
    method: mixdq
    run: runs/w4a8
    out: runs/w4a8-unet
    num-calib: 16
    preset: official
    recon-blocks: [mid_block]

Options on the command line override the file's; relative paths are relative to the current
directory. The merged settings (every option's value and where it came from) are written to
RUN/{SETTINGS_FILE} and, once exported, OUT/{EXPORT_SETTINGS_FILE};
`--config RUN/{SETTINGS_FILE}` repeats that run.
"""


def prompts_for(model: str, path: Path | None, num_calib: int, num_select: int):
    """``(calibration, selection)`` prompts: held-out selection prompts follow the
    calibration ones in the same list."""
    need = num_calib + num_select
    if path is not None and path.suffix.lower() == ".json":  # COCO captions, as the paper
        import numpy as np  # noqa: PLC0415

        from mixdq_jax.evaluation.coco import read_coco_captions  # noqa: PLC0415

        # one caption per image, in the file's order, of a seeded random sample of images
        # (the paper "randomly sampled ... prompts from COCO")
        captions = list(read_coco_captions(path).values())
        order = np.random.default_rng(0).permutation(len(captions))[:need]
        prompts, where = [captions[i][0] for i in sorted(order)], str(path)
    elif path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path}: no such file")
        from mixdq_jax.io_utils import read_text  # noqa: PLC0415

        prompts = [line.strip() for line in read_text(path, "--prompts").splitlines()
                   if line.strip()]  # fmt: skip
        where = str(path)
    elif model == "testbed":
        from mixdq_jax.testbed import calibration_captions  # noqa: PLC0415

        prompts, where = calibration_captions(need), "the testbed's training captions"
    else:
        from mixdq_jax.calibrate import default_prompts  # noqa: PLC0415

        prompts = default_prompts(min(need, 48))
        where = "the shipped prompts (48)"
    if len(prompts) < need:
        raise ValueError(
            f"{where}: {len(prompts)} prompts, need --num-calib {num_calib} + --num-select "
            f"{num_select} = {need}; lower them or pass --prompts FILE"
        )
    return tuple(prompts[:num_calib]), tuple(prompts[num_calib:need])


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.cli.outputs import claim, output_folder, run_directory  # noqa: PLC0415
    from mixdq_jax.deploy.checkpoint import check_export_folder  # noqa: PLC0415
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415
    from mixdq_jax.methods import get_method, load_plugin  # noqa: PLC0415
    from mixdq_jax.recipe import PRESETS, RecipeConfig  # noqa: PLC0415
    from mixdq_jax.recipe.run import check_request  # noqa: PLC0415

    for plugin in args.plugin:
        load_plugin(plugin)
    search = _format_search(args)
    method = with_lowrank_args(get_method(args.method), args)
    if search is None:
        check_request(args.target, method, args.out)  # before the model loads
    if args.out is not None and args.out.resolve() == args.run.resolve():
        raise ValueError("--out and --run must be different folders")
    calib, select = prompts_for(args.model, args.prompts, args.num_calib, args.num_select)
    evaluation = report_eval(args)  # the metrics' weights checked before any work
    if evaluation is not None and args.lora is not None:  # the LoRA keys the cached images
        from dataclasses import replace  # noqa: PLC0415

        lora = {"lora": str(args.lora), "lora_scale": args.lora_scale}
        evaluation = replace(evaluation, identity=lora)
    config = RecipeConfig(
        calib_prompts=calib, select_prompts=select, preset=PRESETS[args.preset],
        knobs=allocation_options(args),
        steps=args.steps, guidance_scale=args.guidance_scale, height=args.height,
        width=args.width, seed=args.seed, batch_size=args.batch_size, chunk=args.chunk,
        reconstruction=recon_config(args), selection_chunk=args.selection_chunk,
        selection_parallel=args.selection_parallel,
    )  # fmt: skip
    targets = [run_directory("--run", args.run)]
    if args.out is not None:  # its contents: check_export_folder's rules
        targets.append(output_folder("--out", args.out, own=None))
    with claim(args, *targets):
        if args.out is not None:  # before any work: a refused folder costs nothing
            check_export_folder(resolve_model(args.model), args.out, overwrite=args.overwrite)
        if search is not None:
            return _search(args, config, search)
        return _quantize(args, config, method, evaluation)


def _format_search(args: argparse.Namespace):
    """The `FormatSearch` of ``--budget``/``--costs``/``--formats``, or ``None`` for a
    ``--target`` run (exactly one of the two)."""
    if not args.budget:  # argparse: exactly one of --target / --budget
        if args.costs is not None:
            raise ValueError("--costs is for --budget runs")
        return None
    if args.costs is None:
        raise ValueError("--budget needs --costs COSTS.json (mixdq bench layers --out ...)")
    if args.stop_after not in ("calibrate", "sensitivity", "report", "export"):
        raise ValueError(f"--stop-after {args.stop_after}: a budget run has the stages "
                         "calibrate, sensitivity, export, report")  # fmt: skip
    from mixdq_jax.recipe.format_search import FormatSearch  # noqa: PLC0415

    return FormatSearch(budgets=tuple(args.budget), costs=args.costs,
                        formats=tuple(args.formats.split(",")))  # fmt: skip


def _search(args: argparse.Namespace, config, search) -> int:
    from mixdq_jax.api import load_pipeline  # noqa: PLC0415
    from mixdq_jax.deploy.layer_costs import load_costs  # noqa: PLC0415
    from mixdq_jax.recipe.format_search import report_formats, search_formats  # noqa: PLC0415
    from mixdq_jax.recipe.run import Recipe  # noqa: PLC0415
    from mixdq_jax.schedulers import default_scheduler  # noqa: PLC0415

    scheduler = args.scheduler
    if args.model == "testbed":
        scheduler = default_scheduler(args.steps, args.scheduler)
    pipe = load_pipeline(
        args.model, dtype=resolve_dtype(args.dtype), variant=args.variant, scheduler=scheduler,
        lora=args.lora, lora_scale=args.lora_scale,
    )  # fmt: skip
    write_run_settings(args.run, args)
    recipe = Recipe(pipe, args.run, config)
    if args.stop_after == "calibrate":
        recipe.calibrate()
        print("stopped after stage calibrate; run the same command to go on")
        return 0
    chosen = search_formats(recipe, search)  # a budget the table cannot meet: refused first
    if args.stop_after == "sensitivity":
        print("stopped after the format sweep and search; run the same command to go on")
        return 0
    if args.out is not None:
        from mixdq_jax.deploy.checkpoint import export_quantized_pipeline  # noqa: PLC0415

        export_quantized_pipeline(
            pipe, chosen.spec, args.out, calib=recipe.run.act_ranges(), overwrite=args.overwrite,
            recipe={"method": "formats", "target": chosen.key},
        )  # fmt: skip
        write_settings(args.out / EXPORT_SETTINGS_FILE, args)
    report = report_formats(recipe, chosen, table=load_costs(search.costs))
    from mixdq_jax.recipe.format_search import format_report_markdown  # noqa: PLC0415

    print(format_report_markdown(report))
    return 0


def _quantize(args: argparse.Namespace, config, method, evaluation) -> int:
    from mixdq_jax.api import load_pipeline  # noqa: PLC0415
    from mixdq_jax.recipe import quantize  # noqa: PLC0415
    from mixdq_jax.recipe.run import report_markdown  # noqa: PLC0415
    from mixdq_jax.schedulers import default_scheduler  # noqa: PLC0415

    scheduler = args.scheduler  # other models: their folder's scheduler at any step count
    if args.model == "testbed":  # the testbed's few-step sampler, as `mixdq evaluate`
        scheduler = default_scheduler(args.steps, args.scheduler)
    pipe = load_pipeline(
        args.model, dtype=resolve_dtype(args.dtype), variant=args.variant, scheduler=scheduler,
        lora=args.lora, lora_scale=args.lora_scale,
    )  # fmt: skip
    write_run_settings(args.run, args)  # the model loaded: the run starts with these settings
    report = quantize(
        pipe, args.run, config, target=args.target, method=method, out=args.out,
        stop_after=args.stop_after, overwrite=args.overwrite, evaluation=evaluation,
    )  # fmt: skip
    if args.out is not None and STAGES.index(args.stop_after) >= STAGES.index("export"):
        write_settings(args.out / EXPORT_SETTINGS_FILE, args)  # the export is complete
    if report is None:
        print(f"stopped after stage {args.stop_after}; run the same command to go on")
        return 0
    print(report_markdown(report))
    return 0
