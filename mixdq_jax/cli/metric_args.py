"""The paper's metrics on the command line: where their weights are, and the report options.

`mixdq evaluate` takes the weight options; `mixdq quantize` and `mixdq demo` take them too,
with ``--eval-prompts``, to put FID / CLIP score / ImageReward / LPIPS / SSIM / PSNR into
their reports (`mixdq_jax.evaluation.run.ReportEval`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixdq_jax.cli.argtypes import existing_file, positive_int, seed


def metric_names(text: str) -> str:
    """``--metrics``/``--eval-metrics``: comma-separated metric names, checked at parse time
    (the message then names the option given); the text is kept as given."""
    from mixdq_jax.evaluation.run import METRICS  # noqa: PLC0415

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        shown = f"unknown {', '.join(bad)}" if bad else "no metric named"
        raise argparse.ArgumentTypeError(f"{shown}; choose from {','.join(METRICS)}")
    return text


def add_weight_args(group: argparse._ActionsContainer) -> None:
    """``--reference-images``, ``--inception-weights``, ``--clip-model``,
    ``--imagereward-weights``, ``--lpips-weights``."""
    group.add_argument("--reference-images", type=Path, default=None,
                       help="FID: folder of real images (COCO val2014)")  # fmt: skip
    group.add_argument(
        "--inception-weights", type=Path, default=None,
        help="FID: weights-inception-2015-12-05-6726825d.pth (or .safetensors)",
    )  # fmt: skip
    group.add_argument(
        "--clip-model", type=Path, default=None,
        help="CLIP score: a transformers CLIP folder (openai/clip-vit-large-patch14)",
    )  # fmt: skip
    group.add_argument(
        "--imagereward-weights", type=Path, default=None,
        help="ImageReward: folder with ImageReward.pt, med_config.json and bert-base-uncased's "
        "vocab.txt",
    )  # fmt: skip
    group.add_argument(
        "--lpips-weights", type=Path, default=None,
        help="LPIPS: folder with torchvision's AlexNet weights and LPIPS v0.1 alex.pth",
    )  # fmt: skip


def metric_weights(args: argparse.Namespace):
    from mixdq_jax.evaluation.run import MetricWeights  # noqa: PLC0415

    return MetricWeights(
        inception=args.inception_weights, clip_model=args.clip_model,
        imagereward=args.imagereward_weights, lpips=args.lpips_weights,
        reference_images=args.reference_images,
    )  # fmt: skip


def check_fid_count(metrics: tuple[str, ...], num: int, flag: str) -> None:
    """FID of one image has no covariance: refuse before generating, naming the option."""
    if "fid" in metrics and num < 2:
        raise ValueError(f"fid: needs at least 2 generated images, and {num} prompt is "
                         f"selected; raise {flag} or give more prompts (thousands for a "
                         "meaningful number; the paper uses 1,024 or more)")  # fmt: skip


def add_report_eval_args(parser: argparse.ArgumentParser) -> None:
    """The options that put the paper's metrics into a report."""
    g = parser.add_argument_group(
        "the paper's metrics in the report (with --eval-prompts; see README 'Evaluating like "
        "the paper')"
    )
    g.add_argument(
        "--eval-prompts", type=existing_file, default=None,
        help="a text file (one prompt a line) or COCO's captions_val2014.json: evaluate each "
        "quantized model on these prompts (images and metrics.json in the run directory)",
    )  # fmt: skip
    g.add_argument("--eval-num", type=positive_int, default=None,
                   help="prompts to evaluate (default: all of --eval-prompts)")  # fmt: skip
    g.add_argument(
        "--eval-select", choices=["first", "random"], default="first",
        help="first: the file's first --eval-num; random: drawn with --eval-prompt-seed",
    )  # fmt: skip
    g.add_argument("--eval-prompt-seed", type=seed, default=0)
    g.add_argument(
        "--eval-metrics", type=metric_names, default=None,
        help="comma-separated, from fid,clip,imagereward,lpips,ssim,psnr (default: ssim,psnr "
        "and every metric whose weights are given)",
    )  # fmt: skip
    g.add_argument("--eval-batch", type=positive_int, default=8, help="images per batch (8)")
    g.add_argument(
        "--eval-cache", type=Path, default=None,
        help="float images and FID statistics, shared across evaluations (default: "
        "$MIXDQ_CACHE or ~/.cache/mixdq)",
    )  # fmt: skip
    add_weight_args(g)


def report_eval(args: argparse.Namespace):
    """The `ReportEval` of the options (``None`` without ``--eval-prompts``); the metrics'
    weights are checked here, before any model loads."""
    from mixdq_jax.evaluation.run import (  # noqa: PLC0415
        ReportEval,
        check_weights,
        implied_metrics,
        parse_metrics,
    )

    weights = metric_weights(args)
    if args.eval_prompts is None:
        given = [f for f in ("reference_images", "inception_weights", "clip_model",
                             "imagereward_weights", "lpips_weights", "eval_metrics", "eval_num")
                 if getattr(args, f) is not None]  # fmt: skip
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"{flags}: the report's metrics need --eval-prompts FILE (a text "
                             "file or COCO's captions_val2014.json)")  # fmt: skip
        return None
    from mixdq_jax.evaluation.coco import load_prompts  # noqa: PLC0415

    metrics = (
        implied_metrics(weights) if args.eval_metrics is None else parse_metrics(args.eval_metrics)
    )
    prompts = load_prompts(args.eval_prompts, num=args.eval_num, select=args.eval_select,
                           seed=args.eval_prompt_seed)  # fmt: skip
    check_fid_count(metrics, len(prompts.prompts), "--eval-num")
    check_weights(metrics, weights)
    return ReportEval(prompts=prompts, metrics=metrics, weights=weights, batch=args.eval_batch,
                      cache=args.eval_cache)  # fmt: skip
