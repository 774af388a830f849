"""The GPU check (issue 17) cannot rot: `benchmarks/gpu_check.sh --dry-run` runs the same script
on CPU (tiny shapes, interpret-mode Pallas, a tiny UNet) and its JSON is checked here; and the
tuned-tiles lookup of `pallas_kernels.tuning` is checked with temporary JSON files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.gemm as gemm_module
from pallas_kernels import GemmTiles, int8_conv2d, int8_matmul, pack_weights, tuning, w4a8_matmul

ROOT = Path(__file__).resolve().parents[2]
DRY_RUN_TIMEOUT_S = 330  # the dry run takes ~125 s on the 2-core development machine (60 s
# of it the selection section's two testbed compiles), about twice that when other jobs share
# its cores; its deadline leaves room for that (sections are skipped, and the test fails,
# when the deadline comes first)
SECTIONS = ["versions", "kernel_checks", "autotune", "gemm_timing", "unet", "selection",
            "layer_costs"]
LAYER_FORMATS = ["float", "fp8", "w8a8", "w4a8", "w4a16", "w4a4lr"]
UNET_CONFIGS = ["fp16", "w8a8", "w4a8", "bf16"]
FORBIDDEN = ("diffusers", "cvxpy", "highspy", "torch", "mixdq_jax.allocation")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    before = sorted(p.name for p in tuning.TUNED_DIR.glob("*"))
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--deadline-s", "300"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S,
    )
    wall = time.perf_counter() - t0
    after = sorted(p.name for p in tuning.TUNED_DIR.glob("*"))
    doc = json.loads((out / "gpu_check.json").read_text())
    return {"out": out, "proc": proc, "wall": wall, "doc": doc, "tuned_dir": (before, after)}


def test_dry_run_completes_and_every_kernel_check_passes(dry_run):
    proc, doc = dry_run["proc"], dry_run["doc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert dry_run["wall"] < DRY_RUN_TIMEOUT_S
    assert doc["status"] == "complete" and doc["mode"] == "dry-run"
    kc = doc["sections"]["kernel_checks"]["result"]
    assert kc["interpret"] is True and kc["all_passed"] is True
    assert kc["failed"] == kc["not_run"] == 0
    assert kc["passed"] == len(kc["cases"]) >= 25
    ops = {c["op"] for c in kc["cases"]}
    assert ops == {
        "int8_matmul", "w4a8_matmul", "quantize_activation", "int8_conv2d", "w4a4_matmul"
    }
    for case in kc["cases"]:
        assert case["passed"] is True, case
        assert case["rule"].startswith(("exact", "4*eps32")), case
    # exact integer checks for every packed width, float epilogues with the tolerance
    assert {c["wbits"] for c in kc["cases"] if c.get("out_dtype") == "int32"} == {8, 4, 2}
    assert {c["out_dtype"] for c in kc["cases"] if c["rule"] != "exact"} >= {
        "float32", "bfloat16", "float16"}
    assert doc["summary"]["kernel_checks"]["all_passed"] is True


def test_dry_run_json_schema(dry_run):
    doc, out = dry_run["doc"], dry_run["out"]
    assert doc["schema_version"] == 1 and doc["script"] == "benchmarks/gpu_check.py"
    for key in ("started_utc", "finished_utc", "elapsed_s", "deadline_s", "summary", "argv",
                "jax_backend", "interpret"):
        assert key in doc, key
    assert doc["forbidden_imports"] == []
    assert list(doc["sections"]) == SECTIONS
    for name, section in doc["sections"].items():
        assert set(section) >= {"status", "seconds", "error", "result"}, name
        assert section["status"] == "ok" and section["error"] is None, (name, section["error"])
    assert doc["summary"]["sections"] == dict.fromkeys(SECTIONS, "ok")

    versions = doc["sections"]["versions"]["result"]
    for key in ("python", "jax", "jaxlib", "cuda_plugins", "devices", "flax", "torch",
                "default_backend", "nvidia_smi"):
        assert key in versions, key
    assert versions["devices"][0]["device_kind"] == "cpu"

    tune = doc["sections"]["autotune"]["result"]
    assert tune["repo_file"] is None  # the dry run never writes pallas_kernels/tuned/
    assert tune["mismatches"] == 0 and tune["tuned_entries"] == len(tune["entries"]) > 0
    for entry in tune["entries"]:
        assert {"m", "k", "n", "wbits", "tiles", "ms", "default_ms", "candidates"} <= set(entry)
        assert all(c.get("equal_to_default") for c in entry["candidates"])
    tuned_file = out / "tuned" / "cpu.json"
    assert Path(tune["file"]) == tuned_file
    loaded = tuning.load_entries(tuned_file)
    assert len(loaded) == tune["tuned_entries"]
    m, k, n, wbits, tiles = loaded[0]
    assert tuning.tuned_tiles(m, k, n, "cpu", wbits=wbits, directory=out / "tuned") == tiles

    gemm = doc["sections"]["gemm_timing"]["result"]
    assert gemm["shapes"]
    for entry in gemm["shapes"].values():
        assert entry["errors"] == {}
        assert set(entry["ms"]) >= {"bf16_dot", "fp16_dot", "int8_xla", "int8_pallas",
                                    "int8_pallas_default", "w4a8_xla", "w4a8_pallas",
                                    "quantize_act_xla", "quantize_act_pallas", "w4a4_xla",
                                    "w4a4_pallas"}
        assert all(v > 0 for v in entry["ms"].values())
        assert set(entry["tops"]) == {op for op in entry["ms"] if not op.startswith("quantize")}

    unet = doc["sections"]["unet"]["result"]
    assert list(unet["configs"]) == UNET_CONFIGS and unet["latent"] == [8, 8]
    for name, cfg in unet["configs"].items():
        assert cfg["status"] == "ok" and cfg["stage"] == "done", (name, cfg.get("log_tail"))
        for key in ("ms", "min_ms", "compile_s", "trace_lower_s", "params_s", "param_bytes",
                    "compiled_peak_bytes", "first_run_ms"):
            assert cfg[key] > 0, (name, key)
        assert "peak_bytes_in_use" in cfg  # None on CPU: jax has no memory stats there
        assert cfg["forbidden_imports"] == []
        assert cfg["output_finite_fraction"] == 1.0
        assert (out / f"unet_{name}.json").exists() and (out / f"unet_{name}.log").exists()
    b = {name: cfg["param_bytes"] for name, cfg in unet["configs"].items()}
    assert b["w4a8"] < b["w8a8"] < b["fp16"] == b["bf16"]
    assert unet["configs"]["w8a8"]["kernel_backend"] == "xla"  # auto on CPU
    assert set(unet["speedup_vs_fp16"]) == set(UNET_CONFIGS)
    assert doc["summary"]["unet_ms"].keys() == set(UNET_CONFIGS)

    log = (out / "gpu_check.log").read_text()
    assert "gpu_check.sh exit 0" in log and "jax " in log


def test_dry_run_layer_costs(dry_run):
    """The bounded per-layer cost table of the tiny UNet: written, readable, within its
    budget (it stops between layers; what it wrote is a valid, resumable table)."""
    from mixdq_jax.deploy.layer_costs import load_costs  # noqa: PLC0415

    doc, out = dry_run["doc"], dry_run["out"]
    section = doc["sections"]["layer_costs"]
    res = section["result"]
    assert res["file"] == str(out / "layer_costs.json") and res["latent"] == [8, 8]
    assert res["formats"] == LAYER_FORMATS and res["batch"] == 1
    table = load_costs(out / "layer_costs.json")
    assert table["settings"]["formats"] == LAYER_FORMATS
    assert table["settings"]["platform"] == "cpu" and table["settings"]["latent"] == [8, 8]
    assert 0 < res["layers_done"] == len(table["layers"]) <= res["layers_total"]
    assert table["complete"] == res["complete"] == (res["layers_done"] == res["layers_total"])
    for entry in table["layers"].values():
        assert list(entry["formats"]) == LAYER_FORMATS
    # the budget bounds when a layer starts; one layer (six formats) may run past it
    assert section["seconds"] < res["budget_s"] + 60
    assert set(res["totals"]) == set(LAYER_FORMATS)
    assert doc["summary"]["layer_costs"]["layers"] == f"{res['layers_done']}/{res['layers_total']}"


def test_dry_run_selection(dry_run):
    """The selection section on the testbed: the per-call loop and vmapped chunks (lax.map
    only on a GPU run) each timed apart from their compile, and the batched images equal the
    pipeline call's (weights only, float activations: the same arithmetic)."""
    res = dry_run["doc"]["sections"]["selection"]["result"]
    assert res["model"] == "testbed" and res["candidates"] == 4 and res["chunk"] == 2
    assert list(res["ways"]) == ["per_call", "vmap"]
    for name, entry in res["ways"].items():
        assert entry["per_candidate_s"] > 0 and entry["first_chunk_s"] > 0, name
        assert entry["max_abs_diff_vs_per_call"] < 2e-5, name
    assert dry_run["doc"]["summary"]["selection_per_candidate_s"].keys() == res["ways"].keys()


def test_dry_run_leaves_the_package_tuned_folder_alone(dry_run):
    before, after = dry_run["tuned_dir"]
    assert before == after


def test_gpu_check_imports_none_of_the_missing_packages():
    """diffusers, cvxpy and highspy are absent on the GPU machine: the script must not import
    them (nor torch, which it does not need) in the parent or a UNet child."""
    code = (
        "import sys, runpy; sys.argv = ['gpu_check.py', '--help']\n"
        "try:\n    runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "import benchmarks.gpu_check as g\n"
        "import mixdq_jax.deploy.layers, mixdq_jax.deploy.memory, mixdq_jax.models.unet\n"
        "import mixdq_jax.deploy.layer_costs as lc; lc.layer_rank((8, 8), 0.5)\n"
        "import mixdq_jax.quant.forward, pallas_kernels.tuning\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('diffusers', 'cvxpy', 'highspy', 'torch') or m.startswith('mixdq_jax.allocation')))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------- tuned tiles (tuning.py)

TUNED = GemmTiles(block_m=64, block_n=64, block_k=32, num_warps=2, num_stages=2)
TUNED_4096 = GemmTiles(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
TUNED_W4 = GemmTiles(block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=4)


def _write(folder: Path, device_kind: str, rows) -> Path:
    entries = [dict(m=m, k=k, n=n, wbits=wbits, tiles=tiles, ms=0.01)
               for m, k, n, wbits, tiles in rows]
    path = folder / f"{tuning.device_kind_slug(device_kind)}.json"
    return tuning.write_tuned(path, device_kind, entries, source="test")


def test_device_kind_slug():
    assert tuning.device_kind_slug("NVIDIA H200") == "nvidia_h200"
    assert tuning.device_kind_slug(" NVIDIA GeForce RTX 4090 ") == "nvidia_geforce_rtx_4090"
    assert tuning.device_kind_slug("TPU v5 lite") == "tpu_v5_lite"
    assert tuning.device_kind_slug("--") == "unknown"


def test_tuned_tiles_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    assert tuning.tuned_tiles(1024, 640, 640, "NVIDIA H200") is None  # no file
    path = _write(tmp_path, "NVIDIA H200", [
        (1024, 640, 640, 8, TUNED), (4096, 640, 640, 8, TUNED_4096), (1024, 640, 640, 4, TUNED_W4),
    ])
    assert path == tmp_path / "nvidia_h200.json"
    assert json.loads(path.read_text())["entries"][0]["tiles"] == {
        "block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 2, "num_stages": 2}
    look = tuning.tuned_tiles
    assert look(1024, 640, 640, "NVIDIA H200") == TUNED
    assert look(1500, 640, 640, "NVIDIA H200") == TUNED  # nearest M on a log2 scale
    assert look(3000, 640, 640, "NVIDIA H200") == TUNED_4096
    assert look(16384, 640, 640, "NVIDIA H200") == TUNED_4096  # 4x: still served
    assert look(16385, 640, 640, "NVIDIA H200") is None  # beyond MAX_M_RATIO
    assert look(256, 640, 640, "NVIDIA H200") == TUNED
    assert look(255, 640, 640, "NVIDIA H200") is None
    assert look(1024, 640, 640, "NVIDIA H200", wbits=4) == TUNED_W4
    assert look(1024, 640, 640, "NVIDIA H200", wbits=2) is None
    assert look(1024, 640, 1280, "NVIDIA H200") is None  # K and N must match
    assert look(1024, 640, 640, "NVIDIA H100 80GB HBM3") is None  # another generation
    other = tmp_path / "elsewhere"
    _write(other, "NVIDIA H200", [(1024, 640, 640, 8, TUNED_W4)])
    assert look(1024, 640, 640, "NVIDIA H200", directory=other) == TUNED_W4
    for off in ("", "off"):
        monkeypatch.setenv(tuning.ENV_DIR, off)
        assert look(1024, 640, 640, "NVIDIA H200") is None
    monkeypatch.delenv(tuning.ENV_DIR)
    assert tuning.tuned_file("NVIDIA H200") == tuning.TUNED_DIR / "nvidia_h200.json"


def test_rewritten_file_is_read_again(tmp_path):
    _write(tmp_path, "gpu", [(64, 64, 64, 8, TUNED)])
    assert tuning.tuned_tiles(64, 64, 64, "gpu", directory=tmp_path) == TUNED
    _write(tmp_path, "gpu", [(64, 64, 64, 8, TUNED_4096), (128, 64, 64, 4, TUNED)])
    assert tuning.tuned_tiles(64, 64, 64, "gpu", directory=tmp_path) == TUNED_4096


@pytest.mark.parametrize("content", [
    "not json",
    json.dumps({"schema": 2, "entries": []}),
    json.dumps({"schema": 1, "entries": [
        {"m": 64, "k": 64, "n": 64, "wbits": 8, "tiles": {"block_n": 48}}]}),
])
def test_malformed_file_is_ignored_with_a_warning(tmp_path, content):
    (tmp_path / "gpu.json").write_text(content)
    with pytest.warns(UserWarning, match="ignoring tuned tiles file"):
        assert tuning.tuned_tiles(64, 64, 64, "gpu", directory=tmp_path) is None


def test_write_tuned_validates_tiles(tmp_path):
    with pytest.raises(ValueError, match="block_n"):
        tuning.write_tuned(tmp_path / "x.json", "gpu", [
            dict(m=1, k=1, n=1, wbits=8, tiles={"block_n": 48})])
    assert not (tmp_path / "x.json").exists()


def test_gemm_wrappers_use_tuned_tiles_only_for_compiled_pallas_on_gpu(tmp_path, monkeypatch):
    """`tiles=None` takes the tuned entry only for backend "pallas", compiled (not interpret),
    on a GPU; explicit tiles always win; CPU and interpret mode keep the defaults."""
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    conv_m, conv_k = 1 * 9 * 11, 3 * 3 * 24  # (1, 9, 11, 24) NHWC, 3x3, stride 1, padding 1
    _write(tmp_path, "cpu", [  # the CPU device's kind: the lookup runs with it below
        (77, 100, 70, 8, TUNED), (77, 100, 70, 4, TUNED_W4), (conv_m, conv_k, 20, 8, TUNED_4096),
    ])
    seen = []

    def spy(x2, w, zc, scale, bias, *, wbits, out_dtype, tiles, interpret):
        seen.append((wbits, tiles, interpret))
        return jnp.zeros((x2.shape[0], zc.shape[0]), out_dtype)

    monkeypatch.setattr(gemm_module, "gemm_pallas", spy)
    x = np.zeros((77, 100), np.int8)
    w = np.zeros((100, 70), np.int8)
    w4 = pack_weights(jnp.asarray(w), 4)
    i32 = dict(out_dtype=jnp.int32, backend="pallas")

    int8_matmul(x, w, **i32)  # CPU: interpret mode, defaults
    int8_matmul(x, w, interpret=False, **i32)  # compiled but not on a GPU: defaults
    assert seen == [(8, GemmTiles(), True), (8, GemmTiles(), False)]

    monkeypatch.setattr(tuning, "on_gpu", lambda: True)
    seen.clear()
    int8_matmul(x, w, interpret=False, **i32)
    int8_matmul(x.reshape(7, 11, 100), w, interpret=False, **i32)  # M counts leading dims
    int8_matmul(x, w, interpret=False, tiles=TUNED_W4, **i32)  # explicit tiles win
    int8_matmul(x, w, interpret=True, **i32)  # interpret mode: defaults
    w4a8_matmul(x, w4, bits=4, interpret=False, **i32)
    w4a8_matmul(x, w4, bits=4, interpret=True, **i32)
    int8_conv2d(np.zeros((1, 9, 11, 24), np.int8), np.zeros((3, 3, 24, 20), np.int8),
                interpret=False, **i32)
    assert seen == [
        (8, TUNED, False), (8, TUNED, False), (8, TUNED_W4, False), (8, GemmTiles(), True),
        (4, TUNED_W4, False), (4, GemmTiles(), True), (8, TUNED_4096, False),
    ]
    int8_matmul(x, w, out_dtype=jnp.int32, backend="xla")  # other backends never look
    assert len(seen) == 7
    with pytest.raises(TypeError, match="GemmTiles"):
        int8_conv2d(np.zeros((1, 9, 11, 24), np.int8), np.zeros((3, 3, 24, 20), np.int8),
                    tiles=object(), **i32)
