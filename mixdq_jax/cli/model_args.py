"""``--model``, ``--revision`` and ``--variant``: one definition for every command that loads a
model, so a Hugging Face repo id works (and reads the same) everywhere.

Once the command line and ``--config`` are merged, `finish` makes ``args.model`` a
`mixdq_jax.hub.ModelName`: its text is ``OWNER/NAME@REV`` when ``--revision REV`` is given, so
``str(args.model)`` and a run's recorded settings name the exact revision, and it carries the
weight ``variant``. A command body passes ``args.model`` on, and
`mixdq_jax.loader.resolve_model` / `mixdq_jax.api.load_pipeline` fetch just that revision and
weight variant.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mixdq_jax.hub import ModelName

MODEL_HELP = (
    "a diffusers folder, a Hugging Face repo id OWNER/NAME[@REVISION] (downloaded into the hub "
    "cache on first use, only the files a load reads; HF_HUB_OFFLINE=1: the cache alone), or "
    "testbed (the built-in model)"
)
REVISION_HELP = (
    "branch, tag or commit of a repo id --model (default: main); the same as --model "
    "OWNER/NAME@REVISION"
)
VARIANT_HELP = (
    "weight variant, e.g. fp16: reads *.fp16.safetensors (a repo id downloads only those, where "
    "a component has them; default: the full-precision files)"
)


def _with_revision(text: str, revision: str | None) -> str:
    """``text`` naming ``revision`` (``OWNER/NAME@REVISION``); a ValueError for a local folder
    or testbed (they have no revisions) or a different revision after '@'."""
    if revision is None:
        return text
    if text == "testbed" or Path(text).expanduser().is_dir():
        raise ValueError(f"--revision {revision}: {text} is not a hub repo id (OWNER/NAME)")
    _, at, named = text.partition("@")
    if at and named != revision:
        raise ValueError(f"--model {text} and --revision {revision} name different revisions")
    return text if at else f"{text}@{revision}"


def finish(args: argparse.Namespace) -> None:
    """``args.model`` as a `ModelName` carrying ``--revision`` and ``--variant``, once the
    command line and ``--config`` are merged (either may give any of the three). A ValueError
    for a revision that cannot apply; the caller turns it into a usage error."""
    configs_only = getattr(args, _CONFIGS_ONLY, None)
    if configs_only is None:  # the command takes no --model
        return
    text, revision = getattr(args, "model", None), getattr(args, "revision", None)
    if text is None:  # `mixdq layers --unet-config FILE`
        if revision is not None:
            raise ValueError(f"--revision {revision} needs --model OWNER/NAME")
        return
    text = _with_revision(str(text), revision)
    variant = getattr(args, "variant", None)
    args.model = ModelName(text, variant=variant, configs_only=configs_only)


_CONFIGS_ONLY = "_model_configs_only"  # set by `add_model_args`: the mark `finish` looks for


def add_model_args(
    parser: Any,
    *,
    default: str | None = "testbed",
    help_text: str = f"{MODEL_HELP}; default: testbed",
    group: Any = None,
    variant: bool = True,
    configs_only: bool = False,
) -> None:
    """Add ``--model`` (to ``group`` when given, e.g. a mutually exclusive one), ``--revision``
    and, unless the command defines its own (``variant=False``), ``--variant`` to ``parser``
    (a parser or an argument group). ``configs_only``: the command reads configs alone, so a
    repo id downloads no weights (``mixdq layers``)."""
    (parser if group is None else group).add_argument(
        "--model", default=default, metavar="MODEL", help=help_text
    )
    parser.add_argument("--revision", default=None, metavar="REVISION", help=REVISION_HELP)
    parser.set_defaults(**{_CONFIGS_ONLY: configs_only})
    if variant:
        parser.add_argument("--variant", default=None, metavar="VARIANT", help=VARIANT_HELP)
