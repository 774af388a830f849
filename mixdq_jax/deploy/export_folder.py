"""Where ``mixdq export`` may write, what it takes from the source, and the manifest that
lets anyone check an export later.

An export takes from the source folder only what a pipeline loads: the components
``model_index.json`` lists among :data:`PIPELINE_COMPONENTS` (copied file by file, or
symlinked whole with ``link``) and ``model_index.json`` itself (written, with the components
it does not carry set to ``[null, null]``); a user's other files beside them (a single-file
checkpoint, images, notes) stay behind. Then it writes ``unet/config.json``, the packed
weights and the metadata. It first writes a manifest, ``OUT/.mixdq_export.json``, listing
every file it writes, so a later export into the same folder knows which files are its own
(an export made before the manifest existed is recognised by its ``unet/mixdq_quant.json``);
the finished export rewrites it with the size and sha256 of every file it relies on (through
the links too), ``unet/mixdq_quant.json`` included: :func:`verify_export` checks them.

The rules (what a careful user expects):

- an empty or new folder, or an earlier export: written (an earlier export's files are
  replaced; its files this export no longer writes are deleted: the tool wrote them);
- a non-empty folder that is not an export: refused, unless ``overwrite``;
- a file the export would replace that it did not write, or a file under ``unet/`` that it
  did not write (e.g. the float ``diffusion_pytorch_model.safetensors`` of a copied model,
  which would sit unused beside the quantized weights): refused, unless ``overwrite``; with
  ``overwrite`` the first are replaced and the second are kept, with a warning naming them;
- files the export does not write are never deleted or moved, with or without
  ``overwrite``; a user's file or link standing where the export needs a folder or a link
  is refused even with ``overwrite``.

The manifest's format (version 2) and the checks are documented in ``docs/export_format.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from mixdq_jax.io_utils import LOCK_FILE, atomic_write_json
from weights_convert.checkpoint import read_json

MANIFEST = ".mixdq_export.json"
INDEX = "model_index.json"
_MANIFEST_FORMAT = "mixdq-export-manifest"
# 1: the files list only (no checksums); 2: ``complete`` and, once complete, ``checksums``
MANIFEST_VERSION = 2
# What the mixdq pipeline loads from a diffusers folder besides the UNet (`mixdq_jax.loader`)
PIPELINE_COMPONENTS = (
    "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae",
)  # fmt: skip
_IGNORED = frozenset({MANIFEST, LOCK_FILE})
_TEMP = re.compile(r"\.(.+)\.[A-Za-z0-9_]+\.tmp")
_CHUNK = 1 << 22  # 4 MiB reads: streaming, whatever the file's size
Digest = dict[str, Any]  # {"bytes": size, "sha256": hex digest}


@dataclass(frozen=True, kw_only=True)
class ExportFolder:
    """The checked plan of one export into ``out``."""

    src: Path
    out: Path
    link: bool
    components: tuple[str, ...]  # relative paths taken (copied, linked, written) from ``src``
    unet_files: tuple[str, ...]  # relative paths written by the UNet writer
    meta_file: str  # among them, the metadata written last (marks a complete export)
    stale: tuple[str, ...]  # an earlier export's files this one no longer writes
    kept: tuple[str, ...]  # user files under unet/ left in place (only with overwrite)

    @property
    def files(self) -> frozenset[str]:
        return frozenset(self.components) | frozenset(self.unet_files)


def _walk(folder: Path, *, follow: bool) -> set[str]:
    """Relative paths of the files (and, not following links, the symlinks) under ``folder``."""
    found = set()
    for root, dirs, names in os.walk(folder, followlinks=follow):
        base = Path(root)
        for d in list(dirs):
            if not follow and (base / d).is_symlink():
                found.add((base / d).relative_to(folder).as_posix())
                dirs.remove(d)
        found.update((base / n).relative_to(folder).as_posix() for n in names)
    return found


def _is_component(entry: Any) -> bool:
    """A ``model_index.json`` entry naming a component (``[library, class]``, not nulls)."""
    return isinstance(entry, list) and len(entry) == 2 and entry != [None, None]


def pipeline_components(src: Path) -> list[str]:
    """The component folders of ``src`` a pipeline loads: those of :data:`PIPELINE_COMPONENTS`
    its ``model_index.json`` lists (the UNet is quantized, not taken)."""
    index = read_json(src / INDEX, what="pipeline index")
    return [n for n in PIPELINE_COMPONENTS if _is_component(index.get(n)) and (src / n).is_dir()]


_LICENCE = re.compile(r"(licen[cs]e|copying|notice)([._-].*)?", re.IGNORECASE)


def component_files(src: Path, *, link: bool) -> list[str]:
    """What the export takes from ``src``: ``model_index.json``, the top-level licence files
    (the quantized weights are derived from the model's and travel under its licence) and the
    pipeline's component folders (linked whole, or copied file by file); nothing else."""
    out = [INDEX]
    out += sorted(p.name for p in src.iterdir() if p.is_file() and _LICENCE.fullmatch(p.name))
    for name in pipeline_components(src):
        if link:
            out.append(name)
        else:
            out += sorted(f"{name}/{rel}" for rel in _walk(src / name, follow=True))
    return out


def _safe(rel: str) -> bool:
    path = Path(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts


def read_manifest(out: Path) -> dict[str, Any] | None:
    """``out``'s manifest, or ``None`` when it has none (or an unreadable one)."""
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT:
        return None
    return data


def _earlier_export(
    out: Path, src: Path, unet_files: tuple[str, ...], meta_file: str
) -> set[str] | None:
    """The files an earlier export in ``out`` wrote, or ``None`` if ``out`` holds none."""
    data = read_manifest(out)
    files = None if data is None else data.get("files")
    if isinstance(files, list):
        return {f for f in files if isinstance(f, str) and _safe(f)}
    if (out / meta_file).is_file():  # an export from before the manifest
        both = component_files(src, link=False) + component_files(src, link=True)
        return set(both) | set(unet_files)
    return None


def _temp_of(rel: str) -> str | None:
    """The file a leftover temp file (``.NAME.XXXXXXXX.tmp``, from a killed atomic write)
    was to become, or ``None``."""
    path = PurePosixPath(rel)
    match = _TEMP.fullmatch(path.name)
    return (path.parent / match.group(1)).as_posix() if match else None


def _listing(paths: Iterable[str], limit: int = 5) -> str:
    paths = sorted(paths)
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def plan_export_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    unet_files: Iterable[str],
    meta_file: str,
    link: bool = False,
    overwrite: bool = False,
) -> ExportFolder:
    """Check that an export of ``src`` may write ``out`` (rules in the module docstring) and
    return what it will write and delete; a ValueError naming the files otherwise."""
    src, out = Path(src), Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from the source model folder")
    if src.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} is inside the source model folder {src}; choose another")
    unet_files = tuple(unet_files)
    components = tuple(component_files(src, link=link))
    plan = ExportFolder(
        src=src, out=out, link=link, components=components, unet_files=unet_files,
        meta_file=meta_file, stale=(), kept=(),
    )  # fmt: skip
    existing = (_walk(out, follow=False) if out.is_dir() else set()) - _IGNORED
    if not existing:
        return plan
    ours = _earlier_export(out, src, unet_files, meta_file)
    files = plan.files
    if ours is None and not overwrite:
        unet = sorted(e for e in existing - files if e.startswith("unet/"))
        note = f"; {_listing(unet)} would sit unused beside the quantized UNet" if unet else ""
        raise ValueError(
            f"--out {out} is not empty ({_listing(existing)}) and is not a folder written by "
            f"mixdq export{note}; choose a new or empty folder, or pass --overwrite to write "
            "into it (files mixdq export does not write are kept)"
        )
    if ours is None:
        ours = set()
    else:  # an earlier export killed mid-write left temp files of its own
        ours |= {e for e in existing if _temp_of(e) in ours | files}
    stale = (ours & existing) - files
    in_way = [
        e for e in existing - stale
        if any(f.startswith(e + "/") or e.startswith(f + "/") for f in files)
    ]  # fmt: skip
    if in_way:
        raise ValueError(
            f"--out {out}: mixdq export needs {'a link' if link else 'a folder or file'} "
            f"where it finds {_listing(in_way)}, which it did not write; move that away or "
            "choose another --out"
        )
    replaced = (existing & files) - ours
    strays = {e for e in existing - files - ours if e.startswith("unet/")}
    if not overwrite and (replaced or strays):
        what = []
        if replaced:
            what.append(f"would replace {_listing(replaced)}, which it did not write")
        if strays:
            what.append(
                f"would leave {_listing(strays)} (not written by mixdq export) beside the "
                "quantized UNet"
            )
        raise ValueError(
            f"--out {out}: mixdq export {' and '.join(what)}; move those files away, choose "
            "another --out, or pass --overwrite (files it does not write are kept, never "
            "deleted)"
        )
    return replace(plan, stale=tuple(sorted(stale)), kept=tuple(sorted(strays)))


# ------------------------------------------------------------------------------ checksums
def file_digest(path: str | os.PathLike) -> Digest:
    """``{"bytes", "sha256"}`` of one file, read in 4 MiB chunks (any size)."""
    h, size = hashlib.sha256(), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"bytes": size, "sha256": h.hexdigest()}


def _digests(folder: Path, rels: Iterable[str]) -> dict[str, Digest]:
    """:func:`file_digest` of many files, a few at a time (hashlib releases the GIL)."""
    rels = list(rels)
    if not rels:
        return {}
    workers = max(1, min(8, os.cpu_count() or 1, len(rels)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(rels, pool.map(lambda r: file_digest(folder / r), rels), strict=True))


def _covered(plan: ExportFolder) -> list[str]:
    """Every file the finished export relies on: its own files, and those under its links."""
    out = []
    for rel in sorted(plan.files):
        path = plan.out / rel
        if path.is_dir():  # a linked component folder
            out += sorted(f"{rel}/{sub}" for sub in _walk(path, follow=True))
        else:
            out.append(rel)
    return out


def _write_manifest(
    plan: ExportFolder, files: Iterable[str], checksums: Mapping[str, Digest] | None = None
) -> None:
    payload: dict[str, Any] = {
        "format": _MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "source": str(plan.src),
        "files": sorted(files),
        "complete": checksums is not None,
    }
    if checksums is not None:
        payload["checksums"] = {rel: dict(checksums[rel]) for rel in sorted(checksums)}
    atomic_write_json(plan.out / MANIFEST, payload)


# ------------------------------------------------------------------------------ writing
def _remove_stale(plan: ExportFolder) -> None:
    """Delete the earlier export's files this one does not write, then the folders that
    leaves empty (only those: a folder holding anything else stays)."""
    for rel in plan.stale:
        path = plan.out / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        for parent in Path(rel).parents:
            if parent == Path("."):
                break
            with contextlib.suppress(OSError):
                (plan.out / parent).rmdir()  # fails (kept) when not empty


def _copy_hashing(src: Path, dest: Path) -> Digest:
    """Copy ``src`` to ``dest`` and return its digest: one read of the data for both."""
    h, size = hashlib.sha256(), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fin, open(dest, "wb") as fout:
        while n := fin.readinto(buf):
            h.update(view[:n])
            fout.write(view[:n])
            size += n
    shutil.copystat(src, dest)
    return {"bytes": size, "sha256": h.hexdigest()}


def _place(src: Path, dest: Path, *, link: bool) -> Digest | None:
    """Copy (or link) ``src`` to ``dest`` through a temp name, replacing a file or link at
    ``dest`` itself and never writing through a link into its target; a copy's digest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link and dest.is_dir() and not dest.is_symlink():
        dest.rmdir()  # an empty folder (the plan refused one holding anything)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    digest = None
    try:
        if link:
            os.unlink(tmp)
            os.symlink(src.resolve(), tmp, target_is_directory=src.is_dir())
        else:
            digest = _copy_hashing(src, Path(tmp))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest


def _write_index(plan: ExportFolder) -> None:
    """``model_index.json`` of the export: the source's, the components it does not carry
    (a safety checker, a feature extractor: nothing the pipeline loads) set to nulls."""
    index = read_json(plan.src / INDEX, what="pipeline index")
    carried = {c.split("/", 1)[0] for c in plan.components} | {"unet"}
    for key, entry in index.items():
        if not key.startswith("_") and key not in carried and _is_component(entry):
            index[key] = [None, None]
    atomic_write_json(plan.out / INDEX, index)  # over an earlier export's link: the link


def begin_export(plan: ExportFolder) -> dict[str, Digest]:
    """Mark ``out`` as an export in progress and put the source components in place: the
    manifest first (with the earlier export's stale files, so an interrupted export still
    knows them), the old metadata removed (an interrupted export is incomplete), the stale
    files deleted, then the components copied or linked and ``model_index.json`` written.
    Returns the copies' digests (taken while copying; :func:`finish_export` reuses them)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    _write_manifest(plan, plan.files | set(plan.stale))
    (plan.out / plan.meta_file).unlink(missing_ok=True)
    _remove_stale(plan)
    digests = {}
    for rel in plan.components:
        if rel == INDEX:
            _write_index(plan)
        elif (digest := _place(plan.src / rel, plan.out / rel, link=plan.link)) is not None:
            digests[rel] = digest
    return digests


def finish_export(plan: ExportFolder, digests: Mapping[str, Digest] | None = None) -> None:
    """Record the files this export wrote with the size and sha256 of every file it relies
    on (``digests``: those already known, not read again); warn about user files left beside
    the UNet."""
    digests = dict(digests or {})
    covered = _covered(plan)
    digests.update(_digests(plan.out, [r for r in covered if r not in digests]))
    _write_manifest(plan, plan.files, {rel: digests[rel] for rel in covered})
    if plan.kept:
        warnings.warn(
            f"{plan.out}: kept {_listing(plan.kept)} beside the quantized UNet (mixdq export "
            "never deletes files it did not write; the quantized pipeline does not read them)",
            stacklevel=2,
        )


# ------------------------------------------------------------------------------ verifying
class ExportProblem(str):
    """One damaged, missing or unverifiable file of an export: the text ``"PATH: what"``
    (a ``str``, so lists of them print and serialise as they are), with ``path`` (relative
    to the folder; ``"vae/"`` for a whole folder) and ``kind``: ``"missing"``, ``"size"``,
    ``"checksum"``, ``"unreadable"``, ``"uncovered"`` (a file the reader needs that the
    manifest does not list), ``"incomplete"`` (an interrupted export) or ``"unchecked"`` (an
    export made before the manifest carried checksums: nothing to check against, not
    damage)."""

    path: str
    kind: str

    def __new__(cls, path: str, kind: str, detail: str) -> ExportProblem:
        self = super().__new__(cls, f"{path}: {detail}")
        self.path, self.kind = path, kind
        return self

    def __reduce__(self):  # str subclasses with attributes pickle through their arguments
        return (ExportProblem, (self.path, self.kind, str(self)[len(self.path) + 2 :]))


_NO_MANIFEST = (
    "missing: no checksums to verify against (an export made before mixdq-jax recorded them, "
    "or the manifest was removed); re-export to cover the files"
)
_OLD_MANIFEST = "written by an older mixdq-jax, without checksums; re-export to cover the files"


def _manifest_checksums(folder: Path) -> tuple[dict[str, Digest] | None, list[ExportProblem]]:
    """The checksums the manifest records, or the problem that stops the check."""
    data = read_manifest(folder)
    if data is None:
        if not (folder / MANIFEST).is_file():
            return None, [ExportProblem(MANIFEST, "unchecked", _NO_MANIFEST)]
        return None, [ExportProblem(MANIFEST, "unreadable", "not an export manifest (corrupt)")]
    version = data.get("version", 1)
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        why = f"manifest version {version!r}, newer than this mixdq-jax reads: not verified"
        return None, [ExportProblem(MANIFEST, "unchecked", why)]
    if version < MANIFEST_VERSION:
        return None, [ExportProblem(MANIFEST, "unchecked", _OLD_MANIFEST)]
    if not data.get("complete") or "checksums" not in data:
        why = "the export did not finish (interrupted); export again"
        return None, [ExportProblem(MANIFEST, "incomplete", why)]
    checks = data["checksums"]
    good = isinstance(checks, dict) and all(
        isinstance(rel, str) and _safe(rel) and isinstance(d, dict)
        and isinstance(d.get("bytes"), int) and isinstance(d.get("sha256"), str)
        for rel, d in checks.items()
    )  # fmt: skip
    if not good:
        return None, [ExportProblem(MANIFEST, "unreadable", "malformed checksums")]
    return checks, []


def verify_export(
    folder: str | os.PathLike, *, checksums: bool = True, required: Iterable[str] = ()
) -> list[ExportProblem]:
    """What is wrong with the export in ``folder``, checked against its manifest: ``[]`` when
    every file it recorded is there with its size and (``checksums``) its sha256.

    Sizes first, for every file (cheap: a truncated, missing or replaced file is found without
    reading anything); the checksums, read in chunks a few files at a time, only when every
    size is right. ``required``: files the reader relies on that the manifest must cover (a
    manifest that lost one of them is a problem). A problem of kind ``"unchecked"`` alone
    means an export older than the checksums (see :class:`ExportProblem`)."""
    folder = Path(folder)
    checks, problems = _manifest_checksums(folder)
    if checks is None:
        return problems
    problems += [
        ExportProblem(rel, "uncovered", "not covered by the manifest's checksums")
        for rel in sorted(set(required) - set(checks))
    ]
    gone: set[str] = set()
    for rel in sorted(checks):
        top = rel.split("/", 1)[0]
        if top in gone:
            continue
        path, want = folder / rel, checks[rel]
        if top != rel and not (folder / top).is_dir():  # a whole component folder
            gone.add(top)
            link = folder / top
            what = f"a broken link to {os.readlink(link)}" if link.is_symlink() else "missing"
            problems.append(ExportProblem(f"{top}/", "missing", what))
        elif not path.is_file():
            problems.append(ExportProblem(rel, "missing", "missing"))
        elif (size := path.stat().st_size) != want["bytes"]:
            why = f"{size} bytes, the export wrote {want['bytes']} (truncated or replaced)"
            problems.append(ExportProblem(rel, "size", why))
    if problems or not checksums:
        return problems
    try:
        got = _digests(folder, checks)
    except OSError as err:
        where = Path(err.filename or folder)
        rel = where.relative_to(folder).as_posix() if where.is_relative_to(folder) else str(where)
        return [ExportProblem(rel, "unreadable", str(err.strerror or err))]
    return [
        ExportProblem(rel, "checksum", "content differs from what the export wrote (edited or "
                      "replaced)")
        for rel in sorted(checks) if got[rel]["sha256"] != checks[rel]["sha256"]
    ]  # fmt: skip


def describe_problems(problems: Iterable[str], limit: int = 4) -> str:
    """Problems on one line: the first few, and how many more."""
    problems = list(problems)
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more
