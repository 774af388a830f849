"""``mixdq generate``: images from prompts with a float (or quantized) pipeline.

The images are written by the evaluation's resumable writer
(`mixdq_jax.evaluation.images.write_images`); this command keeps its own folder layout:
``NNNN.png`` and ``prompts.json`` (the settings and one record per image), an image listed
before it is made, so a folder holds no image this command did not index.

``--lora`` (repeatable) with ``--lora-scale`` (one for all, or one per ``--lora``): a float
model fuses a LoRA into its weights when it loads (several: one after the other); a quantized
folder (``mixdq export``) keeps its integer weights and runs each LoRA as a 16-bit low-rank
branch beside them (`mixdq_jax.deploy.lora`), with no requantization.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mixdq_jax.cli import argtypes
from mixdq_jax.cli.argtypes import (
    MAX_SEED,
    existing_file,
    finite_float,
    nonneg_float,
    positive_int,
    seed,
)
from mixdq_jax.cli.calibrate import native_size
from mixdq_jax.cli.model_args import add_model_args
from mixdq_jax.cli.outputs import claim, output_folder
from mixdq_jax.cli.quant_args import (
    add_dtype_arg,
    add_quant_args,
    check_bits_files,
    describe,
    resolve_dtype,
    spec_from_args,
)
from mixdq_jax.evaluation.images import plan_images, write_images
from mixdq_jax.io_utils import atomic_write_json, read_text

INDEX = "prompts.json"  # the run's settings and one record per image written
_IMAGE_NAME = re.compile(r"\d{4,}\.png")  # the names this command gives its images


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from text prompts")
    add_model_args(p, variant=False)  # its own --variant follows
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=existing_file, help="text file, one prompt per line")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=positive_int, default=1)
    p.add_argument("--guidance", type=nonneg_float, default=0.0)
    p.add_argument(
        "--height", type=positive_int, default=None, help="default: the model's native size"
    )
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--seed", type=seed, default=0, help="seed of the first image; +1 per image")
    p.add_argument(
        "--scheduler",
        type=argtypes.scheduler_name,
        default=None,
        help="override, e.g. LCMScheduler",
    )
    p.add_argument(
        "--lora", type=existing_file, action="append", default=None,
        help="LoRA safetensors (repeatable): fused into a float model's weights; on a quantized "
        "folder run beside the integer weights as a low-rank branch (no requantization)",
    )  # fmt: skip
    p.add_argument(
        "--lora-scale", type=finite_float, nargs="+", default=None, metavar="S",
        help="LoRA scale: one for every --lora, or one per --lora in order (default 1)",
    )  # fmt: skip
    p.add_argument("--variant", default=None, help="weight variant, e.g. fp16")
    add_dtype_arg(p)
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder for PNGs and prompts.json; a rerun resumes an interrupted run",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out made with other settings or prompts, or write "
        "into a folder holding other files (replacing those this run writes; others are kept)",
    )
    add_quant_args(p)
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
        text = read_text(args.prompts_file, "--prompts-file")
        prompts += [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    if args.seed + len(prompts) - 1 > MAX_SEED:
        raise ValueError(
            f"--seed {args.seed}: image i uses seed+i, and {len(prompts)} prompts go past "
            f"{MAX_SEED} (JAX keeps 32 bits of a seed); use a smaller --seed"
        )
    return prompts


def plan_records(prompts: list[str], first_seed: int) -> list[dict]:
    """One ``{file, prompt, seed}`` record per image, in order (image i: ``NNNN.png``, seed +
    i)."""
    return plan_images(prompts, first_seed, digits=4)


def read_index(out: Path) -> dict | None:
    """The earlier run's index in ``out``, ``None`` if there is none, or a ValueError when
    ``prompts.json`` is not one (a file this command did not write)."""
    path = out / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: not an index written by mixdq generate ({err}); use another --out, or "
            "--overwrite to replace it"
        ) from None
    images = index.get("images") if isinstance(index, dict) else None
    if not (isinstance(images, list) and all(isinstance(r, dict) for r in images)):
        raise ValueError(
            f"{path}: not an index written by mixdq generate; use another --out, or "
            "--overwrite to replace it"
        )
    return index


def check_out_folder(
    out: Path, index: dict | None, records: list[dict], settings: dict | None, overwrite: bool
) -> None:
    """Refuse to write where this run would orphan or replace files it does not own.

    Without ``overwrite``: an earlier run's index must have the same settings (once known:
    ``settings`` is None before the model loads) and its images must be this run's first
    images (same file, prompt, seed): a resumed or extended run. An image name this run
    writes must not exist unless the index lists it (the user's own file)."""
    if overwrite:
        return
    where = f"--out {out}"
    if index is not None:
        if settings is not None and index.get("settings") != settings:
            old = index.get("settings") or {}
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{where} holds an earlier run made with other settings "
                f"({', '.join(changed) or 'unknown'}); use another --out, or --overwrite to "
                "replace that run"
            )
        ours = {r["file"]: r for r in records}
        differ = [r.get("file") for r in index["images"] if ours.get(r.get("file")) != r]
        if differ:
            raise ValueError(
                f"{where} holds an earlier run with other prompts or seeds (first differing "
                f"image: {differ[0]}); use another --out, or --overwrite to replace that run"
            )
    listed = {r.get("file") for r in index["images"]} if index is not None else set()
    foreign = [r["file"] for r in records if r["file"] not in listed and (out / r["file"]).exists()]
    if foreign:
        raise ValueError(
            f"{where} already holds {', '.join(foreign[:5])}, not written by an earlier "
            "mixdq generate run there; use another --out, or --overwrite to replace them"
        )


def remove_stale(out: Path, index: dict | None, records: list[dict]) -> None:
    """With --overwrite: delete the earlier run's images this run does not rewrite (they are
    listed in its index, so this command wrote them), so none is left unindexed."""
    if index is None:
        return
    keep = {r["file"] for r in records}
    for record in index["images"]:
        name = record.get("file")
        if isinstance(name, str) and name not in keep and _IMAGE_NAME.fullmatch(name):
            (out / name).unlink(missing_ok=True)


def lora_list(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """``[(file, scale)]`` of the ``--lora`` / ``--lora-scale`` options (a ValueError naming
    them when the counts do not fit)."""
    files = list(args.lora or [])
    scales = list(args.lora_scale or [1.0])
    if not files:
        if args.lora_scale is not None:
            raise ValueError("--lora-scale without --lora: give the LoRA file(s) with --lora")
        return []
    if len(scales) not in (1, len(files)):
        raise ValueError(
            f"--lora-scale: {len(scales)} values for {len(files)} --lora file(s): give one "
            "scale for all, or one per --lora in the same order"
        )
    scales = scales * len(files) if len(scales) == 1 else scales
    return list(zip(files, scales, strict=True))


def _lora_settings(loras: list[tuple[Path, float]]) -> tuple[Any, Any]:
    """The index's ``lora`` / ``lora_scale`` (one LoRA or none: as recorded before several
    were possible, so earlier runs resume)."""
    if len(loras) <= 1:
        return str(loras[0][0] if loras else None), loras[0][1] if loras else 1.0
    return [str(f) for f, _ in loras], [s for _, s in loras]


def run(args: argparse.Namespace) -> int:
    lora_list(args)  # the counts, before anything loads
    prompts = read_prompts(args)
    spec = spec_from_args(args)  # reads bit files: before the model loads
    records = plan_records(prompts, args.seed)
    # an earlier run of this command (its index) or a new or empty folder (outputs.claim)
    target = output_folder("--out", args.out, own=lambda out: (out / INDEX).is_file())
    with claim(args, target):
        index = _index_or_none(args.out) if args.overwrite else read_index(args.out)
        check_out_folder(args.out, index, records, None, args.overwrite)
        written = _generate(args, spec, records, index)
    print(f"wrote {written} image(s) to {args.out}")
    return 0


def _index_or_none(out: Path) -> dict | None:
    """With --overwrite an unreadable index is simply replaced."""
    try:
        return read_index(out)
    except ValueError:
        return None


def _generate(args: argparse.Namespace, spec: Any, records: list[dict], index: dict | None) -> int:
    """Load the model and write the images not already in ``args.out`` (locked)."""
    from mixdq_jax.api import load_pipeline, quantized_config  # noqa: PLC0415  (fast --help)
    from mixdq_jax.pipeline import NonFiniteError  # noqa: PLC0415

    loras = lora_list(args)
    pipe = _load(args, loras, load_pipeline)
    check_bits_files(args, spec, pipe)
    qconfig = quantized_config(pipe, spec, args.calib)
    native_h, native_w = native_size(pipe)
    height, width = args.height or native_h, args.width or native_w
    settings = {
        "model": str(args.model),
        "steps": args.steps,
        "guidance": args.guidance,
        "height": height,
        "width": width,
        "scheduler": args.scheduler,
        "negative_prompt": args.negative_prompt,
        "lora": _lora_settings(loras)[0],
        "lora_scale": _lora_settings(loras)[1],
        "dtype": resolve_dtype(args.dtype),
        "quant": describe(spec),
        "weight_bits": args.weight_bits,
        "act_bits": args.act_bits,
        "calib": str(args.calib),
    }
    check_out_folder(args.out, index, records, settings, args.overwrite)
    done = set()
    if index is not None and index.get("settings") == settings:  # resume
        listed = {r.get("file"): r for r in index["images"]}
        done = {r["file"] for r in records
                if listed.get(r["file"]) == r and (args.out / r["file"]).is_file()}  # fmt: skip
    if args.overwrite:
        remove_stale(args.out, index, records)
    todo = [r for r in records if r["file"] not in done]
    embeds = {
        r["file"]: pipe.prompt_embeddings([r["prompt"]], args.negative_prompt, args.guidance)
        for r in tqdm(todo, desc="prompts", unit="prompt", disable=len(todo) < 2)
    }
    pipe = pipe.without_text_encoders()  # every prompt is encoded: free them for the UNet

    def render(chunk: list[dict]) -> Any:
        (record,) = chunk
        name = record["file"]
        try:
            return pipe(
                record["prompt"],
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=height,
                width=width,
                seed=record["seed"],
                qconfig=qconfig,
                check=True,
                prompt_embeds=embeds.pop(name),
            )
        except NonFiniteError as err:
            raise ValueError(
                f"{name} (prompt {record['prompt']!r}, seed {record['seed']}): {err}; "
                f"{_HINTS[err.stage]}; no image was written for it"
            ) from err

    # listed before the image exists: a run killed in between finds its own file on resume
    written = write_images(
        args.out, records, render,
        write_index=lambda images: atomic_write_json(
            args.out / INDEX, {"settings": settings, "images": images}
        ),
        done=done, listed_first=True, progress="images",
    )  # fmt: skip
    return len(written)


def _load(args: argparse.Namespace, loras: list[tuple[Path, float]], load_pipeline: Any) -> Any:
    """The pipeline with its LoRAs: a quantized folder runs them as low-rank branches
    (`mixdq_jax.deploy.lora.apply_lora`); a float model fuses the first as it loads and the
    others after it (`mixdq_jax.deploy.lora.fuse_into_pipeline`)."""
    from mixdq_jax.deploy import is_quantized_folder  # noqa: PLC0415
    from mixdq_jax.deploy.lora import apply_lora, fuse_into_pipeline  # noqa: PLC0415
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415

    dtype = resolve_dtype(args.dtype)
    quantized = bool(loras) and is_quantized_folder(resolve_model(args.model,
                                                                  variant=args.variant))
    first = loras[0] if loras and not quantized else (None, 1.0)
    pipe = load_pipeline(
        args.model,
        dtype=dtype,
        variant=args.variant,
        scheduler=args.scheduler,
        lora=first[0],
        lora_scale=first[1],
        allow_pickle=args.allow_pickle,
    )
    if quantized:
        return apply_lora(pipe, [(str(f), s) for f, s in loras], dtype=dtype)
    if len(loras) > 1:
        return fuse_into_pipeline(pipe, [(str(f), s) for f, s in loras[1:]])
    return pipe


_HINTS = {
    "text encoder": "check the text encoder weights of --model",
    "UNet": "with quantization check --calib and the bits; in float16 try --dtype float32",
    "VAE decoder": "the latents were finite; in float16 try --dtype float32",
}
