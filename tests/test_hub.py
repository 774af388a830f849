"""``--model OWNER/NAME[@REVISION]``: Hugging Face hub ids, with no network.

A hub cache is built in the layout huggingface_hub writes (``models--OWNER--NAME/refs``,
``snapshots/<commit>/`` links into ``blobs/``) from the shipped testbed; the hub's API is
replaced where a test needs an online answer. Every test runs with ``HF_HUB_CACHE`` in a
temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest

from mixdq_jax import hub
from mixdq_jax.cli import build_parser, config_file
from mixdq_jax.hub import HubError, ModelName, pipeline_files
from mixdq_jax.loader import resolve_model
from mixdq_jax.testbed import TESTBED_PATH
from weights_convert.checkpoint import CheckpointError, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "a" * 40
COMMIT_2 = "b" * 40

# ------------------------------------------------------------------------------ a hub cache


def _cache_repo(
    cache: Path,
    repo_id: str,
    commit: str,
    *,
    files: dict[str, bytes],
    refs: tuple[str, ...] = ("main",),
    tree: list[str] | None = None,
) -> Path:
    """One snapshot of ``repo_id`` in ``cache`` as huggingface_hub lays it out; ``tree``: the
    repo's whole file list, cached as huggingface_hub's snapshot_download caches it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    if tree is not None:
        entries = {p: {"size": 1, "blob_id": hashlib.sha1(p.encode()).hexdigest()} for p in tree}
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(
            json.dumps({"format_version": 1, "files": entries})
        )
    return snap


def _testbed_files() -> dict[str, bytes]:
    return {
        p.relative_to(TESTBED_PATH).as_posix(): p.read_bytes()
        for p in sorted(TESTBED_PATH.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline (``HF_HUB_OFFLINE=1``)."""
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder.resolve()


@pytest.fixture
def cached(cache) -> Path:
    """``owner/tiny``: the testbed at main (COMMIT) and at tag v1 (COMMIT_2)."""
    files = _testbed_files()
    _cache_repo(cache, "owner/tiny", COMMIT, files=files)
    _cache_repo(cache, "owner/tiny", COMMIT_2, files=files, refs=("v1",))
    return cache


# ------------------------------------------------------------------------------ what to fetch
SDXL_REPO = [
    "model_index.json", "README.md", "sd_xl_base_1.0.safetensors", "01.png",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
    "text_encoder/model.onnx", "text_encoder/flax_model.msgpack",
    "text_encoder/openvino_model.xml",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/merges.txt", "tokenizer_2/vocab.json", "tokenizer_2/tokenizer_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_flax_model.msgpack",
    "unet/model.onnx", "unet/model.onnx_data", "unet/openvino_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
    "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.safetensors",
    "vae_decoder/model.onnx", "safety_checker/model.safetensors",
    "feature_extractor/preprocessor_config.json",
]  # fmt: skip
TEXT = [
    "scheduler/scheduler_config.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "tokenizer_2/merges.txt", "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json",
]  # fmt: skip


def _weights(files: list[str]) -> list[str]:
    return sorted(f for f in files if f.endswith((".safetensors", ".bin", ".msgpack", ".onnx")))


def test_fp16_variant_is_picked_where_present_and_plain_elsewhere():
    files = pipeline_files(SDXL_REPO, variant="fp16")
    assert _weights(files) == [
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.safetensors",  # no fp16 copy: the plain one
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert sorted(files) == sorted(
        ["model_index.json", *TEXT, "text_encoder/config.json", "text_encoder_2/config.json",
         "unet/config.json", "vae/config.json", *_weights(files)]
    )  # fmt: skip


def test_without_a_variant_the_plain_weights_else_fp16():
    files = pipeline_files(SDXL_REPO)
    assert _weights(files) == [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",  # the loader's own fallback
    ]


def test_configs_only_fetches_no_weights():
    files = pipeline_files(SDXL_REPO, variant="fp16", configs_only=True)
    assert _weights(files) == []
    assert "unet/config.json" in files and "tokenizer/vocab.json" in files


def test_shards_of_the_chosen_variant_only():
    repo = [
        "model_index.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ]  # fmt: skip
    assert pipeline_files(repo, variant="fp16")[1:] == [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ]
    assert pipeline_files(repo)[2:] == [
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    ]


def test_a_mixdq_export_on_the_hub_fetches_its_packed_unet():
    repo = [*SDXL_REPO, "unet/mixdq_quant.json", "unet/mixdq_unet.safetensors"]
    files = pipeline_files(repo, variant="fp16")
    unet = [f for f in files if f.startswith("unet/")]
    assert unet == ["unet/config.json", "unet/mixdq_quant.json", "unet/mixdq_unet.safetensors"]
    # with its checksum manifest, an export is fetched whole: it verifies as it was written
    export = ["model_index.json", ".mixdq_export.json", "LICENSE.md", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "unet/config.json",
              "unet/mixdq_quant.json", "unet/mixdq_unet.safetensors"]  # fmt: skip
    assert pipeline_files(export) == sorted(export)
    assert ".mixdq_export.json" not in pipeline_files(export, configs_only=True)


def test_export_file_names_are_deploys():
    """hub sits below deploy (no import of it): the names it fetches must stay deploy's."""
    from mixdq_jax.cli.config_file import EXPORT_SETTINGS_FILE
    from mixdq_jax.deploy.checkpoint import META_FILE, WEIGHTS_FILE
    from mixdq_jax.deploy.export_folder import MANIFEST

    assert hub.EXPORT_UNET_FILES == (META_FILE, WEIGHTS_FILE)
    assert hub.EXPORT_SETTINGS_FILE == EXPORT_SETTINGS_FILE
    assert hub.EXPORT_MANIFEST == MANIFEST


def test_not_a_pipeline_or_pickles_only_is_said_before_a_download():
    with pytest.raises(HubError, match="not a diffusers pipeline repository"):
        pipeline_files(["config.json", "model.safetensors"], repo="owner/clip")
    pickled = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"]
    with pytest.raises(HubError, match=r"unet/ has no safetensors weights.*\.bin"):
        pipeline_files(pickled, repo="owner/old")


@pytest.mark.parametrize(
    ("text", "repo_id", "revision"),
    [("owner/name", "owner/name", None), ("o-1/n_2.x@v1.0", "o-1/n_2.x", "v1.0"),
     ("owner/name@refs/pr/3", "owner/name", "refs/pr/3")],
)  # fmt: skip
def test_repo_ids_parse(text, repo_id, revision):
    ref = hub.parse_repo_ref(text)
    assert (ref.repo_id, ref.revision) == (repo_id, revision)


@pytest.mark.parametrize(
    "text", ["name", "a/b/c", "./a/b", "/abs/path", "owner/", "a--b/c", "own er/name", "a/b@"]
)
def test_malformed_repo_ids(text):
    with pytest.raises(HubError, match="no such folder|empty revision"):
        hub.parse_repo_ref(text)


def test_two_different_revisions_are_an_error():
    with pytest.raises(HubError, match="names revision 'v1', but revision 'v2'"):
        hub.parse_repo_ref("owner/name@v1", revision="v2")


# ------------------------------------------------------------------------------ offline
def test_repo_id_resolves_to_its_cached_snapshot(cached):
    repo = cached / "models--owner--tiny"
    assert resolve_model("owner/tiny") == repo / "snapshots" / COMMIT
    assert resolve_model(f"owner/tiny@{COMMIT_2}") == repo / "snapshots" / COMMIT_2
    assert resolve_model("owner/tiny@v1") == repo / "snapshots" / COMMIT_2
    assert resolve_model("owner/tiny", revision="v1") == repo / "snapshots" / COMMIT_2
    assert resolve_model(ModelName("owner/tiny", revision="v1")) == repo / "snapshots" / COMMIT_2


def test_load_pipeline_from_the_cache(cached):
    from mixdq_jax.api import load_pipeline

    pipe = load_pipeline("owner/tiny", revision="v1")
    assert pipe.source == str(cached / "models--owner--tiny" / "snapshots" / COMMIT_2)


def test_missing_repo_offline_names_repo_cache_and_what_to_do(cache):
    with pytest.raises(CheckpointError) as err:
        resolve_model("owner/missing@v2")
    text = str(err.value)
    for part in ("owner/missing", "revision v2", str(cache), "HF_HUB_OFFLINE=1", "network"):
        assert part in text, (part, text)


def test_revision_of_a_local_folder_or_testbed_is_an_error(cached, tmp_path):
    with pytest.raises(CheckpointError, match="no revision 'v1'"):
        resolve_model("testbed", revision="v1")
    with pytest.raises(CheckpointError, match="no revision 'v1'"):
        resolve_model(TESTBED_PATH, revision="v1")
    assert resolve_model("testbed") == TESTBED_PATH  # folders and testbed: as before
    assert resolve_model(str(TESTBED_PATH)) == TESTBED_PATH


def test_cached_listing_limits_what_a_partial_snapshot_must_hold(cache):
    """A snapshot fetched by this loader holds only what it needs: the repo's cached file
    list (with .bin and ONNX files never downloaded) does not make it incomplete; a needed
    file that is missing does."""
    files = _testbed_files()
    tree = [*files, "unet/diffusion_pytorch_model.bin", "unet/model.onnx", "README.md"]
    snap = _cache_repo(cache, "owner/partial", COMMIT, files=files, tree=tree)
    assert resolve_model("owner/partial") == snap
    del files["vae/diffusion_pytorch_model.safetensors"]
    _cache_repo(cache, "owner/broken", COMMIT, files=files, tree=tree)
    with pytest.raises(CheckpointError, match="lacks files this model needs"):
        resolve_model("owner/broken")


def test_evaluation_weights_still_resolve_from_the_cache_only(cached, monkeypatch):
    """``resolve_model_path`` without ``download`` (CLIP weights): no pipeline checks."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    snap = cached / "models--owner--tiny" / "snapshots" / COMMIT_2
    assert resolve_model_path("owner/tiny@v1") == snap
    with pytest.raises(CheckpointError, match="no cached snapshot of repo 'owner/other'"):
        resolve_model_path("owner/other")


# ------------------------------------------------------------------------------ "online"
class _FakeHub:
    """The hub's API for one repo: its file list, and what snapshot_download was asked for."""

    def __init__(self, monkeypatch, files: list[str] | BaseException, folder: Path) -> None:
        import huggingface_hub

        self.calls: list[dict] = []
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        real = huggingface_hub.snapshot_download  # the cache alone: no network

        def model_info(api, repo_id, *, revision=None, **kw):
            if isinstance(files, BaseException):
                raise files
            return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files])

        def snapshot_download(repo_id, **kw):
            if kw.get("local_files_only"):
                return real(repo_id, **kw)
            self.calls.append({"repo_id": repo_id, **kw})
            return str(folder)

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_online_download_asks_for_the_selected_files_only(cache, monkeypatch, tmp_path):
    fake = _FakeHub(monkeypatch, SDXL_REPO, tmp_path)
    assert resolve_model(ModelName("owner/sdxl", variant="fp16"), revision="v1") == tmp_path
    (call,) = fake.calls
    assert call["repo_id"] == "owner/sdxl" and call["revision"] == "v1"
    assert Path(call["cache_dir"]) == cache
    assert sorted(call["allow_patterns"]) == sorted(pipeline_files(SDXL_REPO, variant="fp16"))


def _http_error(cls, status: int):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/owner/x")
    return cls("boom", response=httpx2.Response(status, request=request))


def test_hub_answers_become_clear_errors(cache, monkeypatch, tmp_path):
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    _FakeHub(monkeypatch, _http_error(RepositoryNotFoundError, 404), tmp_path)
    with pytest.raises(CheckpointError, match=r"owner/x: repository not found.*hf auth login"):
        resolve_model("owner/x")
    _FakeHub(monkeypatch, _http_error(RevisionNotFoundError, 404), tmp_path)
    with pytest.raises(CheckpointError, match=r"revision 'nope' not found"):
        resolve_model("owner/x@nope")
    _FakeHub(monkeypatch, _http_error(GatedRepoError, 403), tmp_path)
    with pytest.raises(CheckpointError, match=r"owner/x: a gated repository.*hf auth login"):
        resolve_model("owner/x")


def test_no_network_falls_back_to_the_cache(cached, monkeypatch, tmp_path):
    _FakeHub(monkeypatch, httpx2.ConnectError("name resolution failed"), tmp_path)
    with pytest.warns(UserWarning, match="could not be reached"):
        path = resolve_model("owner/tiny")
    assert path == cached / "models--owner--tiny" / "snapshots" / COMMIT
    with pytest.raises(CheckpointError, match=r"owner/gone.*not in the.*could not be reached"):
        resolve_model("owner/gone")


# ------------------------------------------------------------------------------ the CLI
def _parse(*argv: str) -> argparse.Namespace:
    return config_file.parse_args(build_parser(), list(argv))


def test_cli_revision_and_variant_travel_with_model():
    args = _parse(
        "calibrate", "--run", "r", "--revision", "v1", "--model", "o/n", "--variant", "fp16"
    )
    assert (str(args.model), args.model.variant) == ("o/n@v1", "fp16")
    # a command's own --variant, after --model
    args = _parse(
        "export", "--model", "o/n", "--out", "x", "--weight-bits", "8", "--variant", "fp16"
    )
    assert (str(args.model), args.model.variant) == ("o/n", "fp16")
    args = _parse("layers", "--model", "o/n@v1", "--revision", "v1")
    assert str(args.model) == "o/n@v1" and args.model.configs_only
    assert _parse("generate", "--prompt", "p", "--out", "x").model == "testbed"


def test_cli_revision_and_variant_from_a_config_file(tmp_path):
    """A recipe file may give the model, its revision and its variant as separate keys."""
    config = tmp_path / "recipe.yaml"
    config.write_text("model: o/n\nrevision: v2\nvariant: fp16\n")
    args = _parse("quantize", "--config", str(config), "--target", "W8A8", "--run", "r")
    assert (str(args.model), args.model.variant) == ("o/n@v2", "fp16")
    args = _parse("quantize", "--config", str(config), "--target", "W8A8", "--run", "r",
                  "--revision", "v3")  # fmt: skip
    assert str(args.model) == "o/n@v3"  # the command line wins


@pytest.mark.parametrize(
    "argv",
    [("layers", "--model", "o/n@v1", "--revision", "v2"),
     ("calibrate", "--run", "r", "--revision", "v1", "--model", "testbed")],
)  # fmt: skip
def test_cli_revision_conflicts_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(*argv)
    assert exit_.value.code == 2
    assert "--revision" in capsys.readouterr().err


def _mixdq(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MIXDQ_DEBUG"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "mixdq_jax.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_reads_a_cached_repo_offline_and_names_a_missing_one(cached):
    proc = _mixdq("layers", "--model", "owner/tiny@v1", "--format", "json", cache=cached)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layers = json.loads(proc.stdout)
    assert layers and layers[0]["name"] == "time_embedding.linear_1"
    proc = _mixdq("layers", "--model", "owner/missing", cache=cached)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "owner/missing" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
