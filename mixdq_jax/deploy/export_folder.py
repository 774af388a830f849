"""Where ``mixdq export`` may write: checked before the packing work, never deleting a user file.

An export writes the source folder's components (copies, or symlinks with ``link``), then
``unet/config.json``, the packed weights and the metadata. It first writes a manifest,
``OUT/.mixdq_export.json``, listing every file it writes, so a later export into the same
folder knows which files are its own (an export made before the manifest existed is
recognised by its ``unet/mixdq_quant.json``).

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
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from mixdq_jax.io_utils import LOCK_FILE, atomic_write_json

MANIFEST = ".mixdq_export.json"
_MANIFEST_FORMAT = "mixdq-export-manifest"
_IGNORED = frozenset({MANIFEST, LOCK_FILE})
_TEMP = re.compile(r"\.(.+)\.[A-Za-z0-9_]+\.tmp")


@dataclass(frozen=True, kw_only=True)
class ExportFolder:
    """The checked plan of one export into ``out``."""

    src: Path
    out: Path
    link: bool
    components: tuple[str, ...]  # relative paths copied (or linked) from ``src``
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


def component_files(src: Path, *, link: bool) -> list[str]:
    """What the export takes from ``src``: every top-level entry but ``unet/`` and hidden ones
    (linked whole, or copied file by file)."""
    out = []
    for entry in sorted(src.iterdir()):
        if entry.name == "unet" or entry.name.startswith("."):
            continue
        if link or not entry.is_dir():
            out.append(entry.name)
        else:
            out += sorted(f"{entry.name}/{rel}" for rel in _walk(entry, follow=True))
    return out


def _safe(rel: str) -> bool:
    path = Path(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts


def _earlier_export(
    out: Path, src: Path, unet_files: tuple[str, ...], meta_file: str
) -> set[str] | None:
    """The files an earlier export in ``out`` wrote, or ``None`` if ``out`` holds none."""
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            files = data["files"] if data.get("format") == _MANIFEST_FORMAT else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            files = None
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


def _write_manifest(plan: ExportFolder, files: Iterable[str]) -> None:
    payload = {"format": _MANIFEST_FORMAT, "source": str(plan.src), "files": sorted(files)}
    atomic_write_json(plan.out / MANIFEST, payload)


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


def _place(src: Path, dest: Path, *, link: bool) -> None:
    """Copy (or link) ``src`` to ``dest`` through a temp name, replacing a file or link at
    ``dest`` itself and never writing through a link into its target."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link and dest.is_dir() and not dest.is_symlink():
        dest.rmdir()  # an empty folder (the plan refused one holding anything)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if link:
            os.unlink(tmp)
            os.symlink(src.resolve(), tmp, target_is_directory=src.is_dir())
        else:
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def begin_export(plan: ExportFolder) -> None:
    """Mark ``out`` as an export in progress and put the source components in place: the
    manifest first (with the earlier export's stale files, so an interrupted export still
    knows them), the old metadata removed (an interrupted export is incomplete), the stale
    files deleted, then the components copied or linked."""
    plan.out.mkdir(parents=True, exist_ok=True)
    _write_manifest(plan, plan.files | set(plan.stale))
    (plan.out / plan.meta_file).unlink(missing_ok=True)
    _remove_stale(plan)
    for rel in plan.components:
        _place(plan.src / rel, plan.out / rel, link=plan.link)


def finish_export(plan: ExportFolder) -> None:
    """Record the files this export wrote; warn about user files left beside the UNet."""
    _write_manifest(plan, plan.files)
    if plan.kept:
        warnings.warn(
            f"{plan.out}: kept {_listing(plan.kept)} beside the quantized UNet (mixdq export "
            "never deletes files it did not write; the quantized pipeline does not read them)",
            stacklevel=2,
        )
