"""Locate and read diffusers-layout checkpoints: pipeline folders, components, shards, variants.

A diffusers pipeline folder has ``model_index.json`` and one sub-folder per component, each with a
``config.json`` and weights named ``diffusion_pytorch_model[.<variant>].safetensors`` (diffusers
models) or ``model[.<variant>].safetensors`` (transformers models), possibly sharded behind a
``*.safetensors.index.json``. A Hugging Face repo id resolves to a snapshot in the local cache;
with ``download=True`` (a pipeline's ``--model``) `mixdq_jax.hub` fetches what a load reads.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixdq_jax.hub import HubError, pipeline_snapshot
from weights_convert.safetensors_io import load_safetensors

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_PICKLE_NAMES = ("diffusion_pytorch_model", "pytorch_model")


class CheckpointError(ValueError):
    """A folder or file is not a usable diffusers/transformers checkpoint."""


@dataclass(frozen=True, kw_only=True)
class ComponentWeights:
    """A component's tensors (PyTorch names, numpy arrays) and the file each came from."""

    state: dict[str, np.ndarray]
    sources: dict[str, str]
    files: tuple[str, ...]


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def resolve_model_path(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    download: bool = False,
    configs_only: bool = False,
) -> Path:
    """A local folder, or the snapshot of a Hugging Face repo id ``OWNER/NAME[@REVISION]``.

    Without ``download`` only a snapshot already in the cache is found (what the evaluation
    metrics' weights use: nothing is fetched behind the user's back). With ``download`` a
    pipeline is fetched as `mixdq_jax.hub.pipeline_snapshot` does (only what a load reads,
    ``variant``'s weights; ``configs_only`` for commands that read configs alone), and the
    cache alone is used offline. Every failure is a `CheckpointError` naming the repo.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(
                f"{path}: a local folder has no revision {revision!r} (a revision selects a "
                "commit of a Hugging Face repo id OWNER/NAME)"
            )
        return path
    text = str(path_or_repo_id)
    if path.exists():
        raise CheckpointError(f"{text}: is a file, expected a diffusers pipeline folder")
    if download:
        try:
            return pipeline_snapshot(
                text, revision=revision, variant=variant, configs_only=configs_only
            )
        except HubError as err:
            raise CheckpointError(str(err)) from err
    text, _, in_text = text.partition("@")
    asked = revision or in_text or None
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise CheckpointError(f"{path_or_repo_id}: no such folder")
    org, name = text.split("/")
    tried = []
    for cache in _hf_cache_dirs():
        repo = cache / f"models--{org}--{name}"
        tried.append(str(repo))
        if not repo.is_dir():
            continue
        ref = repo / "refs" / (asked or "main")
        snap = ref.read_text().strip() if ref.is_file() else (asked or "main")
        folder = repo / "snapshots" / snap
        if folder.is_dir():
            return folder
        snaps = sorted((repo / "snapshots").glob("*"))
        if len(snaps) == 1 and asked is None:  # the only snapshot, when no revision is asked
            return snaps[0]
    raise CheckpointError(
        f"{text}: not a local folder, and no cached snapshot of repo {text!r} was found "
        f"(looked in {', '.join(tried)}). Nothing is downloaded here: pass a local folder or "
        "populate the Hugging Face cache first."
    )


def read_json(path: Path, *, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({what}): {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what})")
    return data


def read_model_index(folder: Path) -> dict:
    """``model_index.json`` of a pipeline folder, or a clear error if it is not one."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise CheckpointError(
            f"{folder}: not a diffusers pipeline folder (no model_index.json); expected "
            "model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/"
        )
    return read_json(index, what="pipeline index")


def _weight_files(folder: Path, variant: str | None) -> list[Path] | None:
    """Safetensors files of one component for a variant, following a shard index."""
    suffix = f".{variant}" if variant else ""
    for stem in _WEIGHT_STEMS:
        single = folder / f"{stem}{suffix}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index{suffix}.json"
        if not index.is_file():
            index = folder / f"{stem}{suffix}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, what="shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no 'weight_map' in shard index")
            files = []
            for name in dict.fromkeys(weight_map.values()):
                shard = folder / name
                if not shard.is_file():
                    raise CheckpointError(f"{index}: shard file {name!r} is missing")
                files.append(shard)
            return files
    return None


def load_component_weights(
    folder: str | os.PathLike,
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> ComponentWeights:
    """Read all tensors of one component folder (e.g. ``unet/``) as numpy arrays.

    ``variant="fp16"`` reads ``*.fp16.safetensors``, falling back (with a warning, as diffusers)
    to the full-precision file for a component without that variant; without a variant the
    full-precision file is read, falling back to the fp16 variant when it is the only one
    present. Pickled ``.bin``
    weights execute code on load, so they are refused unless ``allow_pickle`` is set.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: component folder is missing")
    files = _weight_files(folder, variant)
    if files is None and variant is None:
        files = _weight_files(folder, "fp16")
    elif files is None and _weight_files(folder, None) is not None:
        warnings.warn(
            f"{folder}: no {variant!r} variant of these weights; reading the full-precision "
            "file instead",
            stacklevel=2,
        )
        files = _weight_files(folder, None)
    if files is None:
        suffix = f".{variant}" if variant else ""
        pickled = [folder / f"{stem}{suffix}.bin" for stem in _PICKLE_NAMES]
        pickled = [p for p in pickled if p.is_file()]
        if pickled and not allow_pickle:
            raise CheckpointError(
                f"{pickled[0]}: pickled PyTorch weights are refused (loading them can run "
                "arbitrary code); convert to safetensors or pass allow_pickle=True "
                "(--allow-pickle)"
            )
        if pickled:
            return _load_pickled(pickled[0])
        want = f" for variant {variant!r}" if variant else ""
        raise CheckpointError(
            f"{folder}: no weights{want} (expected diffusion_pytorch_model.safetensors or "
            "model.safetensors, or a *.safetensors.index.json)"
        )
    state: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for file in files:
        for key, value in load_safetensors(file).items():
            if key in state:
                raise CheckpointError(f"{file}: tensor {key!r} also appears in {sources[key]}")
            state[key] = value
            sources[key] = str(file)
    return ComponentWeights(state=state, sources=sources, files=tuple(str(f) for f in files))


def _load_pickled(path: Path) -> ComponentWeights:
    try:
        import torch  # noqa: PLC0415  (optional, only for explicitly allowed pickles)
    except ImportError as err:
        raise CheckpointError(f"{path}: reading .bin weights needs torch installed") from err
    raw = torch.load(path, map_location="cpu", weights_only=False)
    state = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in raw.items()}
    sources = dict.fromkeys(state, str(path))
    return ComponentWeights(state=state, sources=sources, files=(str(path),))
