"""Hugging Face hub ids as local pipeline folders, fetching only what the loader reads.

``--model OWNER/NAME[@REVISION]`` becomes a snapshot folder in the standard hub cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``). A pipeline repo
holds far more than a load reads (pickled ``.bin`` copies, ONNX/Flax/OpenVINO exports, a second
precision, single-file checkpoints at the root: tens of GB for SDXL), so the download is limited
to ``model_index.json``, the scheduler and tokenizer files, and per model component its
``config.json`` and exactly one safetensors weight set (`pipeline_files`). With
``HF_HUB_OFFLINE=1``, or when the hub cannot be reached, the cache alone is used: an already
cached repo works without network. Failures are `HubError` naming the repo, the revision, the
cache folder and what to do; `weights_convert.checkpoint.resolve_model_path` re-raises them as
its ``CheckpointError`` (a ``ValueError``: the CLI's message and exit 2, as any load error).
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

INDEX_FILE = "model_index.json"
MODEL_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")  # what the loader reads
TEXT_FOLDERS = ("scheduler", "tokenizer", "tokenizer_2")  # configs and vocabularies: all small
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers / transformers file stems
# a `mixdq export` folder pushed to the hub: its UNet is these files instead of float weights
EXPORT_UNET_FILES = ("mixdq_quant.json", "mixdq_unet.safetensors")
EXPORT_SETTINGS_FILE = "mixdq_settings.json"
EXPORT_MANIFEST = ".mixdq_export.json"  # an export's checksums: it relies on every file listed
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # the hub's rule for owner and name
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})  # as huggingface_hub reads HF_HUB_OFFLINE


class HubError(ValueError):
    """A hub id that cannot become a local folder (bad id, not found, offline, no network)."""


@dataclass(frozen=True, kw_only=True)
class RepoRef:
    """A model repo on the hub and the revision (branch, tag or commit) to read."""

    repo_id: str
    revision: str | None = None  # None: the default branch (main)

    @property
    def label(self) -> str:
        return f"{self.repo_id} (revision {self.revision or 'main'})"


class ModelName(str):
    """A model argument that also says how to fetch a hub id: the ``revision``, the weight
    ``variant`` to download, or ``configs_only`` for a command that reads configs alone
    (``mixdq layers``). The CLI's ``--model`` value is one, so a command body passing
    ``args.model`` along passes these too."""

    revision: str | None = None
    variant: str | None = None
    configs_only: bool = False

    def __new__(
        cls,
        text: str,
        *,
        revision: str | None = None,
        variant: str | None = None,
        configs_only: bool = False,
    ) -> ModelName:
        obj = super().__new__(cls, text)
        if revision is not None:
            obj.revision = revision
        if variant is not None:
            obj.variant = variant
        if configs_only:
            obj.configs_only = True
        return obj


def hub_cache_dir() -> Path:
    """The hub cache folder as huggingface_hub defines it, read from the environment now (its
    own constant is fixed when it is first imported, before a caller may set HF_HUB_CACHE)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    home = os.path.expandvars(os.path.expanduser(home))
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, read now."""
    return any(
        os.environ.get(var, "").strip().upper() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def parse_repo_ref(text: str, *, revision: str | None = None) -> RepoRef:
    """``OWNER/NAME[@REVISION]`` (``revision``: the same given apart, e.g. ``--revision``)."""
    repo_id, at, in_text = str(text).partition("@")
    parts = repo_id.split("/")
    if (
        repo_id.startswith((".", "/", "~")) or "\\" in repo_id or len(parts) != 2
        or not all(_NAME.fullmatch(p) for p in parts)
        or any(bad in repo_id for bad in ("--", "..")) or repo_id.endswith(".git")
    ):  # fmt: skip
        raise HubError(
            f"{text}: no such folder, and not a Hugging Face repo id (expected OWNER/NAME or "
            "OWNER/NAME@REVISION: letters, digits, '-', '_' and '.'), nor testbed"
        )
    if (at and not in_text) or (revision is not None and not revision.strip()):
        raise HubError(f"{text}: an empty revision (expected OWNER/NAME@REVISION)")
    if at and revision is not None and revision != in_text:
        raise HubError(
            f"{text}: names revision {in_text!r}, but revision {revision!r} is also given"
        )
    return RepoRef(repo_id=repo_id, revision=in_text or revision)


# ------------------------------------------------------------------------------ what to fetch
def _weight_set(names: set[str], variant: str | None) -> list[str] | None:
    """One component's safetensors for ``variant``: a single file, or a shard index and its
    shards (the files `weights_convert.checkpoint.load_component_weights` reads)."""
    suffix = f".{variant}" if variant else ""
    for stem in WEIGHT_STEMS:
        if f"{stem}{suffix}.safetensors" in names:
            return [f"{stem}{suffix}.safetensors"]
        indexes = (
            f"{stem}.safetensors.index{suffix}.json",
            f"{stem}{suffix}.safetensors.index.json",
        )
        for index in indexes:
            if index in names:
                shard = re.compile(re.escape(f"{stem}{suffix}") + r"-\d+-of-\d+\.safetensors")
                return [index, *sorted(n for n in names if shard.fullmatch(n))]
    return None


def pipeline_files(
    files: Iterable[str],
    *,
    variant: str | None = None,
    configs_only: bool = False,
    repo: str = "the repository",
) -> list[str]:
    """The files of a pipeline repo (its file list ``files``) that a load reads.

    Per model component one weight set: ``variant``'s (``*.fp16.safetensors``) where the
    component has it, else the plain one; without a variant the plain one, else fp16 (the
    loader's own fallback). Never ``.bin``/``.ckpt``/ONNX/Flax files, never two precisions.
    ``configs_only``: no weights at all. A `mixdq export` folder with its checksum manifest is
    taken whole (it holds nothing else, and is verified against the manifest). A `HubError`
    when the repo is no diffusers pipeline or a component has no safetensors weights (nothing
    would load: better said before a download).
    """
    names = set(files)
    if INDEX_FILE not in names:
        raise HubError(f"{repo}: not a diffusers pipeline repository (no {INDEX_FILE})")
    folders: dict[str, set[str]] = {}
    for name in names:
        folder, _, rest = name.partition("/")
        if rest and "/" not in rest:
            folders.setdefault(folder, set()).add(rest)
    if EXPORT_MANIFEST in names and not configs_only:
        # an exported folder holds only what it needs, and its checksums cover every file:
        # fetch it whole, so it verifies as it was written
        return sorted(names)
    out = [INDEX_FILE]
    if EXPORT_SETTINGS_FILE in names:
        out.append(EXPORT_SETTINGS_FILE)
    for folder in TEXT_FOLDERS:
        small = (n for n in sorted(folders.get(folder, ())) if n.endswith((".json", ".txt")))
        out += [f"{folder}/{n}" for n in small]
    for folder in MODEL_FOLDERS:
        present = folders.get(folder, set())
        exported = folder == "unet" and EXPORT_UNET_FILES[0] in present
        picked = ["config.json"] if "config.json" in present else []
        if exported:
            export = EXPORT_UNET_FILES[:1] if configs_only else EXPORT_UNET_FILES
            picked += [n for n in export if n in present]
        elif present and not configs_only:
            fallback = None if variant else "fp16"
            weights = _weight_set(present, variant) or _weight_set(present, fallback)
            if weights is None:
                want = f" (variant {variant!r} or plain)" if variant else ""
                others = ", ".join(sorted(n for n in present if n != "config.json")[:4]) or "none"
                raise HubError(
                    f"{repo}: {folder}/ has no safetensors weights{want} (found: {others}); only "
                    "safetensors are downloaded: convert them, or pass a local folder"
                )
            picked += weights
        out += [f"{folder}/{n}" for n in picked]
    return out


def _local_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# ------------------------------------------------------------------------------ download
def pipeline_snapshot(
    text: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    configs_only: bool = False,
) -> Path:
    """The local snapshot folder of hub id ``text`` (``OWNER/NAME[@REVISION]``), downloading
    what a load needs (`pipeline_files`) into the hub cache, with huggingface_hub's progress
    bars; offline (``HF_HUB_OFFLINE=1``) or without network, the cached snapshot."""
    ref = parse_repo_ref(text, revision=revision)
    cache = hub_cache_dir()
    want = {"variant": variant, "configs_only": configs_only}
    if offline_mode():
        return _cached(ref, cache, reason="HF_HUB_OFFLINE=1 is set", **want)
    import httpx2  # noqa: PLC0415  (huggingface_hub's HTTP client: its network errors)
    from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415  (slow import)

    try:  # one request, no retries: without network the cache answers at once
        info = HfApi().model_info(ref.repo_id, revision=ref.revision)
        siblings = info.siblings
        if siblings is None:
            files = HfApi().list_repo_files(ref.repo_id, revision=ref.revision)
        else:
            files = [s.rfilename for s in siblings]
    except (OSError, httpx2.HTTPError) as err:
        _raise_refusal(err, ref, cache)
        reason = f"the hub could not be reached ({_short(err)})"  # no network, proxy, hub down
        return _cached(ref, cache, reason=reason, failed=True, **want)
    wanted = pipeline_files(files, repo=ref.label, **want)
    try:
        folder = snapshot_download(
            ref.repo_id, revision=ref.revision, cache_dir=cache,
            allow_patterns=[glob.escape(name) for name in wanted],
        )  # fmt: skip
    except (OSError, httpx2.HTTPError) as err:
        _raise_refusal(err, ref, cache)  # a gated repo lists its files, refuses their download
        raise HubError(
            f"{ref.label}: the download into {cache} failed ({_short(err)}): run again to "
            "resume (finished files are kept), or pass a local folder"
        ) from err
    return Path(folder)


def _raise_refusal(err: BaseException, ref: RepoRef, cache: Path) -> None:
    """The hub's answers that no cache or retry can fix, as a `HubError` saying what to do."""
    from huggingface_hub.errors import (  # noqa: PLC0415
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{ref.label}; cache {cache}"
    if isinstance(err, GatedRepoError):
        raise HubError(
            f"{ref.repo_id}: a gated repository: accept its terms on "
            f"https://huggingface.co/{ref.repo_id} and log in with `hf auth login` (or set "
            f"HF_TOKEN) ({where})"
        ) from err
    if isinstance(err, RepositoryNotFoundError):
        raise HubError(
            f"{ref.repo_id}: repository not found on the Hugging Face hub (check the id, or log "
            f"in with `hf auth login` / set HF_TOKEN for a private or gated repo) ({where})"
        ) from err
    if isinstance(err, RevisionNotFoundError):
        raise HubError(
            f"{ref.repo_id}: revision {ref.revision!r} not found on the hub (give a branch, tag "
            f"or commit of the repo) ({where})"
        ) from err


def _cached(
    ref: RepoRef,
    cache: Path,
    *,
    variant: str | None,
    configs_only: bool,
    reason: str,
    failed: bool = False,
) -> Path:
    """The cached snapshot without any network call; its file list is the one huggingface_hub
    cached with it when there is one (else the folder's files), so a partial snapshot that
    lacks a needed file is an error here, not in the loader."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        CachedRepoTreeNotFoundError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
    )

    args = {"revision": ref.revision, "cache_dir": cache}
    try:
        listed = [f.path for f in get_cached_repo_tree(ref.repo_id, **args)]
    except CachedRepoTreeNotFoundError:
        listed = None
    opts = {"variant": variant, "configs_only": configs_only, "repo": ref.label}
    wanted = None if listed is None else pipeline_files(listed, **opts)
    todo = "run once with network" if not failed else "check the network (proxy, HF_ENDPOINT)"
    try:
        folder = Path(snapshot_download(
            ref.repo_id, **args, local_files_only=True,
            allow_patterns=None if wanted is None else [glob.escape(n) for n in wanted],
        ))  # fmt: skip
    except IncompleteSnapshotError as err:
        raise HubError(
            f"{ref.label}: the cached snapshot in {cache} lacks files this model needs, and "
            f"{reason}: {todo} to complete it, or pass a local folder"
        ) from err
    except LocalEntryNotFoundError as err:
        raise HubError(
            f"{ref.label}: not in the Hugging Face cache at {cache}, and {reason}: {todo}, or "
            "pass a local folder"
        ) from err
    if wanted is None:  # no cached listing: check the folder itself
        pipeline_files(_local_files(folder), **opts)
    if failed:
        warnings.warn(f"{ref.label}: {reason}; using the cached snapshot {folder}", stacklevel=2)
    return folder
