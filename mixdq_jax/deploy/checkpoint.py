"""Quantized pipelines: freeze in memory, export to a folder, load back.

Folder layout written by :func:`export_quantized_pipeline` (``mixdq export``; the full
schema: ``docs/export_format.md``)::

    OUT/scheduler/, text_encoder*/, tokenizer*/, vae/   copied (or linked) from the source:
                                        only the components the pipeline loads
    OUT/model_index.json                the source's, components not carried set to nulls
    OUT/unet/config.json                the diffusers config, with a ``quantization_config``
                                        (``quant_method: "mixdq"``, per-layer bits) derived
                                        from the metadata (:func:`quantization_config`)
    OUT/unet/mixdq_unet.safetensors     packed weights, scales, float params ("/"-joined paths)
    OUT/unet/mixdq_quant.json           format version, per-layer plan, spec, activation ranges,
                                        the weights file's size and sha256, PTQD's noise
                                        model (``noise_model``, a multi-step PTQD export)
    OUT/.mixdq_export.json              the manifest: the files the export wrote (written
                                        first), then the size and sha256 of every file it
                                        relies on (see `mixdq_jax.deploy.export_folder`)

SVDQuant's group format (a spec with ``group_size`` / ``lowrank``) is written at the same
format version: its plan entries add ``group``, ``smooth`` and ``rank`` (left out of every
other entry, so other exports read and write as before) and its packed nodes hold the
residual's codes, group scales, the f32 smoothing vector and the fp16 branch
(`mixdq_jax.deploy.grouped`); ``quantization_config`` names the granularities, the group size
and the branch ranks. Older exports load unchanged.

A folder with a noise model is written as format version :data:`NOISE_MODEL_VERSION`
(older readers refuse it instead of sampling without the correction); others keep
:data:`FORMAT_VERSION`. Loading checks the format version, the file size (truncation), the
checksum (a file from another export) and every tensor's name, shape and dtype against the
packed tree the plan and config imply, so a damaged or mismatched checkpoint is a clear
:class:`QuantCheckpointError`. Loading a whole folder (:func:`load_quantized_pipeline`) first
checks every file against the manifest (:func:`check_export`): an edited ``mixdq_quant.json``
or ``config.json``, a truncated or missing component is an :class:`ExportDamagedError` naming
the file, not a silently different model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.deploy.export_folder import (
    INDEX,
    MANIFEST,
    ExportFolder,
    ExportProblem,
    begin_export,
    describe_problems,
    file_digest,
    finish_export,
    plan_export_folder,
)
from mixdq_jax.deploy.export_folder import verify_export as _verify_manifest
from mixdq_jax.deploy.layers import Deployed
from mixdq_jax.deploy.packed import (
    F32_LEAVES,
    FORMAT_VERSION,
    DeployPlan,
    node_at,
    pack_unet_params_by_layer,
    packed_shapes,
)
from mixdq_jax.io_utils import atomic_write_json
from mixdq_jax.loader import assemble, load_components, resolve_model
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, param_shapes
from mixdq_jax.pipeline import Pipeline, QuantizedPipeline
from mixdq_jax.quant.build import Calibration, qconfig_for
from mixdq_jax.quant.quantized import QuantizedUNet
from mixdq_jax.schedulers.noise_correction import NoiseModel
from pallas_kernels.grid import FLOAT_BITS
from weights_convert.checkpoint import CheckpointError, read_json
from weights_convert.safetensors_io import (
    SafetensorsError,
    load_safetensors,
    read_safetensors_header,
    save_safetensors,
)

FORMAT_NAME = "mixdq-jax-quantized-unet"
META_FILE = "mixdq_quant.json"
WEIGHTS_FILE = "mixdq_unet.safetensors"
_SEP = "/"
# the version of an export whose sampling loop must apply a noise model
NOISE_MODEL_VERSION = FORMAT_VERSION + 1
EXPORT_UNET_FILES = ("unet/config.json", f"unet/{WEIGHTS_FILE}", f"unet/{META_FILE}")
# quantization_config: diffusers' key in a model's config.json naming its quantization backend
QUANT_METHOD = "mixdq"
QUANTIZATION_CONFIG_VERSION = 1


class QuantCheckpointError(CheckpointError):
    """A quantized checkpoint is truncated, corrupt, from another export or another version."""


class ExportDamagedError(QuantCheckpointError):
    """An exported folder's files differ from what its export wrote (``problems``: each one
    names the file, see `ExportProblem`)."""

    def __init__(self, folder: str | os.PathLike, problems: list[ExportProblem]) -> None:
        self.folder, self.problems = Path(folder), list(problems)
        super().__init__(
            f"{folder}: damaged export: {describe_problems(self.problems)}; export it again "
            "(mixdq export, or mixdq quantize with its --run and --out), or, to load it as it "
            "is, load_pipeline(..., verify=False) in Python"
        )


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """True for a folder written by ``mixdq export`` (what `load_pipeline` dispatches on);
    one that lost its metadata but keeps its manifest too, so loading names the damage."""
    path = Path(path)
    return (path / "unet" / META_FILE).is_file() or (path / MANIFEST).is_file()


# ------------------------------------------------------------------------------ in memory
def bos_embedding(pipe: Any) -> jax.Array:
    """The text context's token-0 row: CLIP's BOS embedding, the same for every prompt
    (causal attention: position 0 sees only itself)."""
    context, _ = pipe.encode_prompt(pipe.tokenize([""]))
    return jnp.asarray(context[0, 0], jnp.float32)


def freeze(
    pipe: Pipeline,
    spec: Any,
    calib: Calibration | None = None,
    *,
    float_dtype: Any = None,
) -> tuple[DeployPlan, dict, dict]:
    """``(plan, packed UNet params, activation ranges)`` of ``spec`` for ``pipe``'s float UNet."""
    if isinstance(pipe, QuantizedPipeline):
        raise ValueError(
            f"{pipe.source}: this model's UNet is already quantized (packed); freeze or export "
            "from the float model"
        )
    qconfig = qconfig_for(pipe, spec, calib)
    params = pipe.params["unet"]
    plan = DeployPlan.from_qconfig(qconfig, params)
    # grouped layers scale their activations per token at run time: no range to store
    act = {n: lq.a_range for n, lq in qconfig.layers.items()
           if n in plan.layers and plan.layers[n].group is None}  # fmt: skip
    lowrank = {n: lq.lowrank for n, lq in qconfig.layers.items()
               if n in plan.layers and lq.lowrank is not None}  # fmt: skip
    x_bos = bos_embedding(pipe) if plan.needs_bos() else None
    packed = pack_unet_params_by_layer(
        params, plan, act, x_bos, float_dtype=float_dtype, lowrank=lowrank
    )
    return plan, packed, {n: np.asarray(r) for n, r in act.items()}


def deploy_pipeline(
    pipe: Pipeline,
    spec: Any,
    calib: Calibration | None = None,
    *,
    backend: str = "auto",
    float_dtype: Any = None,
) -> Any:
    """``pipe`` bound to the real low-bit path of ``spec`` (a `QuantizedPipeline`)."""
    plan, packed, ranges = freeze(pipe, spec, calib, float_dtype=float_dtype)
    quantized = QuantizedUNet(params=packed, mode=Deployed(plan=plan, backend=backend),
                              act_ranges=ranges)  # fmt: skip
    return QuantizedPipeline(pipe.without_unet(), quantized)


# ------------------------------------------------------------------------------ on disk
def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if _SEP in key:
            raise ValueError(f"param key {key!r} contains {_SEP!r}")
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + _SEP))
        else:
            out[path] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(_SEP)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _sha256(path: Path) -> str:
    return file_digest(path)["sha256"]


def save_quantized_unet(
    unet_dir: str | os.PathLike,
    plan: DeployPlan,
    packed: Mapping,
    *,
    unet_config: Mapping[str, Any],
    act_ranges: Mapping[str, Any],
    float_dtype: Any,
    spec: Mapping[str, Any] | None = None,
    source: str = "",
    noise_model: NoiseModel | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the packed tensors, ``config.json`` (with its `quantization_config`) and the
    metadata; returns the metadata. ``noise_model``: PTQD's correction the sampling loop of
    this UNet applies; ``recipe``: what chose the bits (``method``, ``target``, ``preset``,
    ``objective``), when known."""
    unet_dir = Path(unet_dir)
    unet_dir.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v) for k, v in _flatten(packed).items()}
    weights = unet_dir / WEIGHTS_FILE
    save_safetensors(
        weights, flat, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    )
    digest = file_digest(weights)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION if noise_model is None else NOISE_MODEL_VERSION,
        "weights_file": WEIGHTS_FILE,
        "weights_bytes": digest["bytes"],
        "weights_sha256": digest["sha256"],
        "num_tensors": len(flat),
        "param_bytes": int(sum(a.nbytes for a in flat.values())),
        "float_dtype": jnp.dtype(float_dtype).name,
        "bos_dim": _bos_dim(packed, plan),
        "spec": dict(spec or {}),
        "source": source,
        "plan": plan.as_dict(),
        "act_ranges": {n: np.asarray(r).tolist() for n, r in act_ranges.items()},
    }
    if noise_model is not None:
        meta["noise_model"] = noise_model.as_dict()
    if recipe:
        meta["recipe"] = {k: v for k, v in recipe.items() if v is not None}
    config = {k: v for k, v in unet_config.items() if k != "quantization_config"}
    atomic_write_json(unet_dir / "config.json", {**config, "quantization_config":
                                                 quantization_config(meta)})  # fmt: skip
    atomic_write_json(unet_dir / META_FILE, meta)  # written last: marks a complete UNet
    return meta


def _bits_or_null(bits: int) -> int | None:
    return None if bits >= FLOAT_BITS else int(bits)


def quantization_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``unet/config.json``'s ``quantization_config`` (diffusers' convention: ``quant_method``
    names the backend), derived from the metadata of ``mixdq_quant.json`` alone, so the two
    cannot disagree. Per layer the weight and activation bits (``null``: float) and the
    packed width of the weights; a layer absent from the maps stays float. Schema:
    ``docs/export_format.md``."""
    plan = meta["plan"]
    weighted = {n: lp for n, lp in plan.items() if lp["w_bits"] < FLOAT_BITS}
    groups = sorted({lp["group"] for lp in plan.values() if lp.get("group")})
    config: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "version": QUANTIZATION_CONFIG_VERSION,
        "format": meta["format"],
        "format_version": meta["format_version"],
        "weights_file": meta["weights_file"],
        "float_dtype": meta["float_dtype"],
        "weight_format": "int",
        "weight_granularity": "per_group" if groups else "per_output_channel",
        "symmetric_weights": bool(weighted) and all(lp["symmetric"] for lp in weighted.values()),
        "act_format": "int",
        "act_granularity": "per_token_group" if groups else "per_tensor",
        "weight_bits": {n: _bits_or_null(lp["w_bits"]) for n, lp in sorted(plan.items())},
        "act_bits": {n: _bits_or_null(lp["a_bits"]) for n, lp in sorted(plan.items())},
        "weight_storage_bits": {n: int(lp["storage_bits"]) for n, lp in sorted(weighted.items())},
        "shortcut_split": {n: lp["split"] for n, lp in sorted(plan.items()) if lp.get("split")},
        "bos_aware": sorted(n for n, lp in plan.items() if lp.get("bos")),
        "noise_correction": "ptqd" if "noise_model" in meta else None,
    }
    if groups:  # SVDQuant's format: group size, smoothing, the 16-bit branch's ranks
        config["group_size"] = groups[0] if len(groups) == 1 else groups
        config["smoothing"] = sorted(n for n, lp in plan.items() if lp.get("smooth"))
        config["lowrank_rank"] = {n: lp["rank"] for n, lp in sorted(plan.items())
                                  if lp.get("rank")}  # fmt: skip
        config["lowrank_dtype"] = "float16"
    for key in ("method", "target", "preset", "objective"):
        config[key] = meta.get("recipe", {}).get(key)
    return config


def _bos_dim(packed: Mapping, plan: DeployPlan) -> int | None:
    for name, lp in plan.layers.items():
        if lp.bos and lp.mode != "act_only":
            return int(node_at(packed, name)["bos_in"].shape[0])
    return None


def spec_summary(spec: Any) -> dict[str, Any]:
    """A JSON-able record of a QuantSpec (bits mappings are in the plan already)."""
    out = {}
    for key in ("symmetric_weights", "bos_aware", "shortcut_split", "fp8"):
        out[key] = bool(getattr(spec, key))
    for key in ("weight_bits", "act_bits"):
        value = getattr(spec, key)
        out[key] = value if isinstance(value, int) else "per-layer"
    if getattr(spec, "group_size", None):
        out["group_size"] = int(spec.group_size)
        lowrank = getattr(spec, "lowrank", None) or {}
        out["lowrank_layers"] = len(lowrank)
    return out


def check_export_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    link_components: bool = False,
    overwrite: bool = False,
) -> ExportFolder:
    """What an export of the float folder ``source`` would write into ``out``, or a
    ValueError naming the files in the way (the rules: `mixdq_jax.deploy.export_folder`).
    Cheap: call it before loading the model."""
    src = Path(source)
    if not (src / "model_index.json").is_file():
        raise ValueError(f"the pipeline's source {src} is not a diffusers folder")
    return plan_export_folder(
        src, out, unet_files=EXPORT_UNET_FILES, meta_file=f"unet/{META_FILE}",
        link=link_components, overwrite=overwrite,
    )  # fmt: skip


def export_quantized_pipeline(
    pipe: Any,
    spec: Any,
    out: str | os.PathLike,
    *,
    calib: str | os.PathLike | Mapping[str, Any] | None = None,
    float_dtype: Any = jnp.float16,
    link_components: bool = False,
    overwrite: bool = False,
    unet: QuantizedUNet | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Freeze ``spec`` on ``pipe`` (a float pipeline loaded from a diffusers folder) and write
    a quantized pipeline folder that `load_quantized_pipeline` (and `load_pipeline`) run.
    ``unet``: a refined UNet of this pipeline to freeze instead of its float one (learned
    params; its ``correction``, PTQD's noise model, is stored; ``calib`` defaults to its
    activation ranges). ``recipe``: what chose the bits (``method``, ``target``, ``preset``,
    ``objective``), recorded in the metadata and the ``quantization_config``.

    Only the components the pipeline loads are taken from the source (other files of the
    source folder stay behind); the finished export's manifest records the size and sha256
    of every file it relies on (:func:`verify_export`).

    ``out`` is checked before the packing work: it must be new, empty or an earlier export
    (replaced). A non-empty folder that is not one, a file the export would replace that it
    did not write, or a user file under ``out/unet/`` (say the float weights of a copied
    model, which would sit unused beside the quantized ones) is refused unless
    ``overwrite``; with ``overwrite`` the export replaces the files it writes and keeps every
    other file, warning about those under ``unet/``. A file mixdq export did not write is
    never deleted or moved.
    """
    folder = check_export_folder(
        pipe.source, out, link_components=link_components, overwrite=overwrite
    )
    if unet is not None:
        pipe = pipe.with_params(unet=unet.params)
        calib = dict(unet.act_ranges) if calib is None else calib
    plan, packed, ranges = freeze(pipe, spec, calib, float_dtype=float_dtype)
    digests = begin_export(folder)
    unet_config = read_json(folder.src / "unet" / "config.json", what="unet config")
    meta = save_quantized_unet(
        folder.out / "unet",
        plan,
        packed,
        unet_config=unet_config,
        act_ranges=ranges,
        float_dtype=float_dtype,
        spec=spec_summary(spec),
        source=str(folder.src),
        noise_model=None if unet is None else unet.correction,
        recipe=recipe,
    )
    digests[f"unet/{WEIGHTS_FILE}"] = {"bytes": meta["weights_bytes"],
                                       "sha256": meta["weights_sha256"]}  # fmt: skip
    finish_export(folder, digests)
    return meta


# the files a quantized pipeline cannot load without: the manifest must cover them
EXPORT_REQUIRED = (INDEX, *EXPORT_UNET_FILES)


def verify_export(folder: str | os.PathLike, *, checksums: bool = True) -> list[ExportProblem]:
    """What is wrong with the export in ``folder``: ``[]`` when every file it relies on
    (``unet/mixdq_quant.json``, ``unet/config.json``, the weights, every component file)
    has the size and, with ``checksums``, the sha256 its manifest records. Each problem is
    a string ``"PATH: what"`` naming the file (`ExportProblem`: also ``path`` and ``kind``);
    an export made before the manifest carried checksums gives one problem of kind
    ``"unchecked"``. Sizes are checked first, the checksums (a read of every file, a few
    at a time) only when every size is right."""
    return _verify_manifest(folder, checksums=checksums, required=EXPORT_REQUIRED)


def check_export(folder: str | os.PathLike, *, checksums: bool = True) -> bool:
    """Raise :class:`ExportDamagedError` naming the damaged files of the export in
    ``folder``; ``True`` when every file is verified, ``False`` (with a warning) for an
    export older than the checksums, which loads as before (its weights checksum only)."""
    problems = verify_export(folder, checksums=checksums)
    damage = [p for p in problems if p.kind != "unchecked"]
    if damage:
        raise ExportDamagedError(folder, damage)
    if problems:
        warnings.warn(f"{folder}: {problems[0]} (only the weights file is checked)", stacklevel=2)
        return False
    return True


def verified_export(
    out: str | os.PathLike,
) -> tuple[dict[str, Any] | None, list[ExportProblem]]:
    """``(metadata, problems)`` of the export in ``out`` for a caller deciding whether to
    trust it (`mixdq quantize`'s export stage): the metadata when it reads, and every
    problem `verify_export` finds (an unreadable metadata file is one); ``(None, [])`` when
    ``out`` holds no export at all."""
    out = Path(out)
    if not (out / MANIFEST).is_file() and not (out / "unet" / META_FILE).is_file():
        return None, []
    problems = verify_export(out)
    try:
        meta = read_quant_meta(out / "unet")
    except (OSError, ValueError) as err:
        meta = None
        if not any(p.path in (f"unet/{META_FILE}", "unet/") for p in problems):
            why = str(err).removeprefix(f"{out / 'unet' / META_FILE}: ")
            problems.append(ExportProblem(f"unet/{META_FILE}", "unreadable", why))
    return meta, problems


def read_quant_meta(unet_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(unet_dir) / META_FILE
    meta = read_json(path, what="quantized UNet metadata")
    if meta.get("format") != FORMAT_NAME:
        raise QuantCheckpointError(f"{path}: not a {FORMAT_NAME} file")
    version = meta.get("format_version")
    if version not in (FORMAT_VERSION, NOISE_MODEL_VERSION):
        raise QuantCheckpointError(
            f"{path}: format version {version!r} is not supported by this mixdq-jax "
            f"(reads versions {FORMAT_VERSION} and {NOISE_MODEL_VERSION}); re-export the model"
        )
    for key in ("weights_file", "weights_bytes", "weights_sha256", "plan", "float_dtype"):
        if key not in meta:
            raise QuantCheckpointError(f"{path}: missing field {key!r}")
    if (version == NOISE_MODEL_VERSION) != ("noise_model" in meta):
        raise QuantCheckpointError(
            f"{path}: format version {version} "
            + ("needs a 'noise_model'" if version == NOISE_MODEL_VERSION else "has no")
            + " field 'noise_model'; re-export the model"
        )
    return meta


def read_noise_model(unet_dir: str | os.PathLike, meta: Mapping[str, Any]) -> NoiseModel | None:
    """The PTQD noise model an export stores (None without one), checked."""
    if "noise_model" not in meta:
        return None
    try:
        return NoiseModel.from_dict(meta["noise_model"], what="noise_model")
    except ValueError as e:
        raise QuantCheckpointError(f"{Path(unet_dir) / META_FILE}: {e}") from None


def load_quantized_unet(
    unet_dir: str | os.PathLike, *, dtype: Any = jnp.float32, verify: bool = True
) -> tuple[DeployPlan, dict, dict[str, Any]]:
    """``(plan, packed params as jnp arrays, metadata)``; float params cast to ``dtype``.

    ``verify``: check the sha256 of the weights file (size and tensor shapes are always
    checked).
    """
    unet_dir = Path(unet_dir)
    meta = read_quant_meta(unet_dir)
    weights = unet_dir / meta["weights_file"]
    if not weights.is_file():
        raise QuantCheckpointError(f"{weights}: missing weights file")
    size = weights.stat().st_size
    if size != meta["weights_bytes"]:
        raise QuantCheckpointError(
            f"{weights}: {size} bytes but the export wrote {meta['weights_bytes']} "
            "(truncated or replaced file)"
        )
    if verify and _sha256(weights) != meta["weights_sha256"]:
        raise QuantCheckpointError(
            f"{weights}: checksum mismatch: the file does not belong to {unet_dir / META_FILE}"
        )
    try:
        read_safetensors_header(weights)
        flat = load_safetensors(weights)
    except SafetensorsError as err:
        raise QuantCheckpointError(str(err)) from err
    plan = DeployPlan.from_dict(meta["plan"])
    config = UNetConfig.from_dict(read_json(unet_dir / "config.json", what="unet config"))
    stored_dtype = jnp.dtype(meta["float_dtype"])
    model = UNet2DConditionModel(config=config, dtype=stored_dtype, param_dtype=stored_dtype)
    ranges = {n: np.zeros((len(lp.parts()), 2), np.float32) for n, lp in plan.layers.items()}
    expected = _flatten(
        packed_shapes(
            param_shapes(model), plan, ranges, float_dtype=stored_dtype, bos_dim=meta.get("bos_dim")
        )
    )
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise QuantCheckpointError(
            f"{weights}: tensors do not match the plan in {META_FILE}: missing "
            f"{missing[:10]}, unexpected {extra[:10]}"
        )
    arrays = {}
    for key, want in expected.items():
        got = flat[key]
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            raise QuantCheckpointError(
                f"{weights}: tensor {key!r} is {got.dtype}{list(got.shape)}, the plan needs "
                f"{np.dtype(want.dtype)}{list(want.shape)}"
            )
        arr = jnp.asarray(got)
        if got.dtype == stored_dtype and key.rsplit(_SEP, 1)[-1] not in F32_LEAVES:
            arr = arr.astype(dtype)
        arrays[key] = arr
    return plan, _unflatten(arrays), meta


def load_quantized_pipeline(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    variant: str | None = None,
    scheduler: str | Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    backend: str = "auto",
    verify: bool = True,
) -> QuantizedPipeline:
    """Load a folder written by ``mixdq export``: float text encoders / VAE and the packed
    UNet on the real low-bit path (a `QuantizedUNet` in the ``Deployed`` mode, with PTQD's
    correction when the folder stores one).

    ``verify``: first check every file of the folder against the sizes and sha256 its
    manifest records (:func:`check_export`; an edited ``mixdq_quant.json`` or a truncated
    component is an :class:`ExportDamagedError` naming the file). ``verify=False`` loads
    the folder as it is: the escape hatch for a deliberately edited export (the weights
    file's size and every tensor's shape are still checked)."""
    folder = resolve_model(path)
    # the whole folder against its manifest (the weights' checksum among them, not read twice)
    covered = check_export(folder) if verify else False
    unet_plan, unet_params, meta = load_quantized_unet(
        folder / "unet", dtype=dtype, verify=verify and not covered
    )
    base = load_components(
        folder, dtype=dtype, variant=variant, allow_pickle=allow_pickle, unet=False
    )
    unet_cfg = UNetConfig.from_dict(read_json(folder / "unet" / "config.json", what="unet config"))
    dtype = jnp.dtype(dtype)
    pipe = assemble(
        folder, base, scheduler,
        unet=UNet2DConditionModel(config=unet_cfg, dtype=dtype, param_dtype=dtype),
    )  # fmt: skip
    quantized = QuantizedUNet(
        params=unet_params, mode=Deployed(plan=unet_plan, backend=backend),
        correction=read_noise_model(folder / "unet", meta),
    )  # fmt: skip
    return QuantizedPipeline(pipe, quantized)
