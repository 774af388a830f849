"""``mixdq evaluate``: a model's metrics, as the paper reports them or with the testbed's judge.

With ``--prompts`` or ``--metrics`` it runs the paper's evaluation (`mixdq_jax.evaluation.run`):
COCO captions or a prompt file, images written to ``--out`` as they are made, FID / CLIP score /
ImageReward / LPIPS, SSIM, PSNR vs float, BOPs and storage in ``metrics.json``. Without them it
is the testbed evaluation it always was (held-out testbed captions, the testbed's judge).

``--out`` follows the write policy of every command (`mixdq_jax.cli.outputs`): new, empty or
an earlier evaluation's folder, else ``--overwrite``; locked while the command runs.
``--fail-if`` is a quality gate (`mixdq_jax.cli.gate`): exit 3 after ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mixdq_jax.cli import gate
from mixdq_jax.cli.argtypes import (
    MAX_SEED,
    existing_file,
    finite_float,
    nonneg_float,
    positive_int,
    seed,
)
from mixdq_jax.cli.metric_args import (
    add_weight_args,
    check_fid_count,
    metric_names,
    metric_weights,
)
from mixdq_jax.cli.model_args import add_model_args
from mixdq_jax.cli.outputs import claim, output_folder, read_json_quietly
from mixdq_jax.cli.quant_args import (
    add_dtype_arg,
    add_quant_args,
    check_bits_files,
    describe,
    resolve_dtype,
    spec_from_args,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="FID, CLIP score, ImageReward, LPIPS/SSIM/PSNR vs float, BOPs and storage on COCO "
        "captions (--prompts/--metrics), or the testbed's judge on testbed captions",
        description="Generates images (image i uses seed seed+i) and scores them. With --prompts "
        "or --metrics: the paper's metrics on a prompt file or COCO captions, images and "
        "metrics.json written to --out (resumable); docs/evaluation.md (the paper's protocol "
        "was never released: the CLIP model and FID's reference are our reading). "
        "Otherwise: held-out testbed captions scored by the testbed's judge and compared with "
        "the float model's images on the same captions and seeds.",
    )
    add_model_args(
        p,
        help_text="testbed (default), a testbed-like folder, or a quantized folder of `mixdq "
        "export` / `mixdq quantize` (then compared with the float model it was exported from), "
        "or a Hugging Face repo id OWNER/NAME[@REVISION] of either (downloaded on first use)",
    )
    p.add_argument(
        "--float-model",
        default=None,
        help="the float model the 'vs float' metrics compare with (default: --model itself, or "
        "for a quantized folder the source recorded at export)",
    )
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--steps", type=positive_int, default=1, help="1: Euler-A trailing; more: LCM")
    p.add_argument(
        "--num", type=positive_int, default=None,
        help="number of prompts (default: 256 testbed captions; all prompts of --prompts)",
    )  # fmt: skip
    p.add_argument("--seed", type=seed, default=0, help="image i starts from seed+i's noise")
    add_dtype_arg(p)
    p.add_argument(
        "--out", type=Path, default=None,
        help="write metrics.json (and grid.png, or images/ with --prompts) here: a new or empty "
        "folder or an earlier evaluation's; a rerun with the same settings resumes",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="write into a non-empty --out that is not an earlier evaluation (replacing "
        "metrics.json, grid.png, prompts.json and images/ there; other files are kept)",
    )  # fmt: skip
    gate.add_fail_if(p)
    add_quant_args(p)
    g = p.add_argument_group("the paper's evaluation (any of these selects it)")
    g.add_argument(
        "--prompts", type=existing_file, default=None,
        help="a text file (one prompt a line) or a COCO captions file (captions_val2014.json: "
        "one caption per image)",
    )  # fmt: skip
    g.add_argument(
        "--metrics", type=metric_names, default=None,
        help="comma-separated, from fid,clip,imagereward,lpips,ssim,psnr (default with "
        "--prompts: ssim,psnr; those need no weights)",
    )  # fmt: skip
    g.add_argument(
        "--select", choices=["first", "random"], default="first",
        help="first: the file's first --num images/lines (the paper's 'first 1024'); random: "
        "--num drawn with --prompt-seed (and a random caption per COCO image)",
    )  # fmt: skip
    g.add_argument("--prompt-seed", type=seed, default=0, help="seed of --select random")
    add_weight_args(g)
    g.add_argument(
        "--height",
        type=positive_int,
        default=None,
        help="image height (default: the model's native size; 512 for SDXL-turbo)",
    )
    g.add_argument("--width", type=positive_int, default=None, help="image width (as --height)")
    g.add_argument("--guidance-scale", type=nonneg_float, default=0.0)
    g.add_argument(
        "--lora", type=existing_file, default=None,
        help="LoRA safetensors fused into the float UNet (LCM-LoRA: with --steps 4)",
    )  # fmt: skip
    g.add_argument("--lora-scale", type=finite_float, default=1.0)
    g.add_argument("--batch", type=positive_int, default=8, help="images per generation batch")
    g.add_argument(
        "--cache", type=Path, default=None,
        help="float images and FID reference statistics, reused across evaluations (default: "
        "$MIXDQ_CACHE or ~/.cache/mixdq)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Two commands under one name: the paper's evaluation when ``--prompts`` or ``--metrics``
    is given, the testbed's otherwise."""
    if args.prompts is not None or args.metrics is not None:
        return run_paper(args)
    return run_testbed(args)


_WRITES = ("metrics.json", "grid.png", "prompts.json", "images")


def is_evaluation(folder: Path) -> bool:
    """An earlier ``mixdq evaluate --out``: its metrics.json (either evaluation's), or the
    image set of a paper evaluation killed before its metrics."""
    if (folder / "images" / "set.json").is_file():
        return True
    metrics = read_json_quietly(folder / "metrics.json")
    if not isinstance(metrics, dict):
        return False
    settings = metrics.get("settings")
    paper = isinstance(settings, dict) and "metrics" in settings
    return paper or {"model", "quantization", "weight_bits", "act_bits"} <= metrics.keys()


def _out(args: argparse.Namespace):
    return output_folder("--out", args.out, own=is_evaluation, writes=_WRITES)


def run_testbed(args: argparse.Namespace) -> int:
    """The testbed evaluation: held-out testbed captions scored by the testbed's judge, and
    compared with the float model's images on the same captions and seeds."""
    num = 256 if args.num is None else args.num
    if args.seed + num - 1 > MAX_SEED:
        raise ValueError(
            f"--seed {args.seed}: image i uses seed+i, and --num {num} goes past {MAX_SEED}"
        )
    spec = spec_from_args(args)
    conds = gate.flatten(args.fail_if)
    gate.check_testbed(conds)
    if args.out is None:
        return _testbed(args, spec, conds)
    with claim(args, _out(args)):
        return _testbed(args, spec, conds)


def _testbed(args: argparse.Namespace, spec, conds: tuple[gate.Condition, ...]) -> int:
    """Generate, score and write (``--out`` claimed by the caller)."""
    from mixdq_jax.api import load_pipeline, quantized_config  # noqa: PLC0415
    from mixdq_jax.io_utils import atomic_write_json  # noqa: PLC0415
    from mixdq_jax.pipeline import QuantizedPipeline  # noqa: PLC0415
    from mixdq_jax.schedulers import default_scheduler  # noqa: PLC0415
    from mixdq_jax.testbed import evaluate  # noqa: PLC0415

    num = 256 if args.num is None else args.num
    scheduler = default_scheduler(args.steps)
    dtype = resolve_dtype(args.dtype)
    pipe = load_pipeline(args.model, scheduler=scheduler, dtype=dtype)
    check_bits_files(args, spec, pipe)  # before the float images: fails in seconds
    qconfig = quantized_config(pipe, spec, args.calib)
    kw = dict(split=args.split, steps=args.steps, num=num, seed=args.seed)
    float_model = args.float_model
    if float_model is None and isinstance(pipe, QuantizedPipeline):
        float_model = _export_source(args.model)
    if float_model is not None:  # the model under test is not the float reference
        float_pipe = load_pipeline(float_model, scheduler=scheduler, dtype=dtype)
        reference = evaluate.evaluate(float_pipe, **kw)
        del float_pipe
    else:
        reference = evaluate.evaluate(pipe, **kw)
    if spec is None and float_model is None:
        result = reference
        metrics = dict(result.metrics, ssim_vs_fp=1.0, psnr_vs_fp=math.inf)
    elif spec is None:
        result = evaluate.evaluate(pipe, reference_images=reference.images, **kw)
        metrics = dict(result.metrics)
    else:
        result = evaluate.evaluate(pipe, reference_images=reference.images, qconfig=qconfig, **kw)
        metrics = dict(result.metrics)
    metrics["model"] = str(args.model)
    metrics["float_model"] = None if float_model is None else str(float_model)
    metrics["quantization"] = describe(spec)
    metrics["weight_bits"] = args.weight_bits
    metrics["act_bits"] = args.act_bits
    shown = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in metrics.items()}
    print(json.dumps(shown, indent=2))
    if args.out is not None:
        atomic_write_json(args.out / "metrics.json", shown)
        evaluate.save_grid(args.out / "grid.png", result.images[:64], result.scenes.captions[:64])
        print(f"wrote {args.out / 'metrics.json'} and {args.out / 'grid.png'}")
    where = "the printed metrics" if args.out is None else str(args.out / "metrics.json")
    return gate.apply(conds, metrics, "mixdq evaluate", where)


def _export_source(model: str) -> str:
    """The float folder a quantized folder was exported from (recorded in its metadata)."""
    from mixdq_jax.deploy.checkpoint import read_quant_meta  # noqa: PLC0415
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415

    unet = Path(resolve_model(model)) / "unet"
    source = read_quant_meta(unet).get("source")
    if not source or not (Path(source) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{model}: a quantized folder whose float source ({source or 'not recorded'}) is "
            "gone; pass --float-model PATH for the 'vs float' metrics"
        )
    return source


def _file_digest(value: str | None) -> str | None:
    """A bits argument as it keys the image set: the number, or the file's content digest."""
    if value is None or value.isdigit():
        return value
    import hashlib  # noqa: PLC0415

    return f"{value}:{hashlib.sha256(Path(value).read_bytes()).hexdigest()[:16]}"


def run_paper(args: argparse.Namespace) -> int:
    """The paper's evaluation (see `mixdq_jax.evaluation.run`)."""
    from mixdq_jax.evaluation.coco import load_prompts  # noqa: PLC0415
    from mixdq_jax.evaluation.run import (  # noqa: PLC0415
        check_weights,
        parse_metrics,
    )

    if args.prompts is None:
        raise ValueError("--metrics: the paper's evaluation needs --prompts FILE (a text file "
                         "or COCO's captions_val2014.json)")  # fmt: skip
    if args.out is None:
        raise ValueError("--prompts: give --out DIR for the images and metrics.json")
    metrics = parse_metrics(args.metrics or "ssim,psnr")
    conds = gate.flatten(args.fail_if)
    gate.check_paper(conds, metrics)
    prompts = load_prompts(args.prompts, num=args.num, select=args.select, seed=args.prompt_seed)
    if args.seed + len(prompts.prompts) - 1 > MAX_SEED:
        raise ValueError(f"--seed {args.seed}: image i uses seed+i, and {len(prompts.prompts)} "
                         f"prompts go past {MAX_SEED}")  # fmt: skip
    check_fid_count(metrics, len(prompts.prompts), "--num")
    spec_from_args(args)  # bit files and --calib checked before any work
    weights = metric_weights(args)
    with claim(args, _out(args)):  # a refused --out costs nothing
        check_weights(metrics, weights)  # each network read and checked before the model loads
        return _paper(args, prompts, metrics, weights, conds)


def _paper(args: argparse.Namespace, prompts, metrics, weights, conds) -> int:
    """Load the model, generate and score (``--out`` claimed by the caller)."""
    from mixdq_jax.evaluation.images import GenerationSettings  # noqa: PLC0415
    from mixdq_jax.evaluation.run import EvalRequest, evaluate_model  # noqa: PLC0415

    subject, float_model = _subject(args)
    native_h, native_w = subject.pipe.image_size
    generation = GenerationSettings(
        steps=args.steps, seed=args.seed, height=args.height or native_h,
        width=args.width or native_w, guidance_scale=args.guidance_scale, batch=args.batch,
    )  # fmt: skip
    factor = subject.pipe.vae_scale_factor
    cost = _efficiency(args, subject, (generation.height // factor, generation.width // factor))
    result = evaluate_model(
        subject, prompts, args.out,
        request=EvalRequest(metrics=metrics, weights=weights, generation=generation),
        efficiency=cost, cache=args.cache,
        settings={"float_model": None if float_model is None else str(float_model),
                  "dtype": subject.identity["dtype"],
                  "scheduler": subject.identity["scheduler"] or "folder's"},
    )  # fmt: skip
    shown = {k: result[k] for k in ("fid", "clip_score", "clip_score_torchmetrics", "imagereward",
                                    "lpips_vs_fp", "ssim_vs_fp", "psnr_vs_fp")}  # fmt: skip
    shown["storage_opt"] = result["storage"]["storage_opt"]
    shown["compute_opt"] = result["compute"]["compute_opt"]
    print(json.dumps(shown, indent=2))
    print(f"wrote {args.out / 'metrics.json'} ({len(prompts.prompts)} images in "
          f"{args.out / 'images'})")  # fmt: skip
    values = {**result, **shown}
    return gate.apply(conds, values, "mixdq evaluate", str(args.out / "metrics.json"))


def _subject(args: argparse.Namespace):
    """The model under test (loaded) and how to load its float reference: the export source
    of a quantized folder, the same folder for fake quantization, or ``--float-model``."""
    from mixdq_jax.api import load_pipeline, quantized_config  # noqa: PLC0415
    from mixdq_jax.deploy.checkpoint import is_quantized_folder  # noqa: PLC0415
    from mixdq_jax.evaluation.images import model_fingerprint  # noqa: PLC0415
    from mixdq_jax.evaluation.run import Subject  # noqa: PLC0415
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415
    from mixdq_jax.schedulers import default_scheduler  # noqa: PLC0415

    scheduler = default_scheduler(args.steps)
    dtype = resolve_dtype(args.dtype)
    folder = resolve_model(args.model)
    exported = is_quantized_folder(folder)
    lora = {"lora": args.lora, "lora_scale": args.lora_scale} if args.lora else {}
    # an exported folder has its LoRA fused already; --lora then applies to its float source
    pipe = load_pipeline(args.model, scheduler=scheduler, dtype=dtype, **({} if exported else lora))
    spec = spec_from_args(args)
    check_bits_files(args, spec, pipe)
    qconfig = quantized_config(pipe, spec, args.calib)
    lora_id = {"lora": str(args.lora), "lora_scale": args.lora_scale} if args.lora else {}
    run_id = {"dtype": dtype, "scheduler": scheduler, **lora_id}
    if exported:
        from mixdq_jax.deploy.checkpoint import read_quant_meta  # noqa: PLC0415

        quantization = {"exported": read_quant_meta(folder / "unet").get("spec", {})}
    else:
        quantization = {"spec": describe(spec), "weight_bits": _file_digest(args.weight_bits),
                        "act_bits": _file_digest(args.act_bits), "format": args.quant_format,
                        "symmetric_weights": args.symmetric_weights, "bos_aware": args.bos_aware,
                        "shortcut_split": args.shortcut_split,
                        "calib": None if args.calib is None else str(args.calib)}  # fmt: skip
    float_model = args.float_model
    if float_model is None and exported:
        float_model = _export_source(args.model)
    if float_model is None and spec is not None:
        float_model = args.model  # fake quant: the same folder without a qconfig is the float one
    float_identity = load_float = None
    if float_model is not None:
        float_identity = {**model_fingerprint(resolve_model(float_model)), **run_id}
        if str(float_model) == str(args.model) and not exported:

            def load_float():
                return pipe  # the same float pipeline, run without the qconfig
        else:

            def load_float():
                return load_pipeline(float_model, scheduler=scheduler, dtype=dtype, **lora)

    subject = Subject(
        pipe=pipe, identity={**model_fingerprint(folder), **run_id}, quantization=quantization,
        qconfig=qconfig, float_identity=float_identity, load_float=load_float,
    )  # fmt: skip
    return subject, float_model


def _efficiency(args: argparse.Namespace, subject, latent: tuple[int, int]) -> dict:
    """Storage and BOPs of the model under test (its export plan, or the spec of the options)."""
    from mixdq_jax.evaluation import bops  # noqa: PLC0415

    quantized = getattr(subject.pipe, "quantized", None)  # a loaded export's packed UNet
    plan = getattr(getattr(quantized, "mode", None), "plan", None)
    config = subject.pipe.unet.config
    if plan is None:
        return bops.efficiency(config, spec=spec_from_args(args), latent=latent)
    from mixdq_jax.deploy.checkpoint import read_quant_meta  # noqa: PLC0415
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415

    bos_dim = read_quant_meta(resolve_model(args.model) / "unet").get("bos_dim")
    return bops.efficiency(config, plan=plan, latent=latent, bos_dim=bos_dim)
