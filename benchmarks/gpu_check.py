"""GPU check: compile, check and time the Pallas kernels and the quantized SDXL-turbo UNet.

On the GPU machine (one command, under 8 minutes on an H200; `$OUT/gpu_check.json` + a log):

    bash benchmarks/gpu_check.sh                      # OUT=... sets the output folder
    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR         # the same without the log

Here, on CPU (tiny shapes, interpret-mode Pallas, a tiny UNet; what the test runs):

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check

Sections, in order: ``versions``, ``kernel_checks`` (the Pallas kernels compiled for the GPU
against their references: exact equality for integer results, the documented tolerance for
float epilogues), ``autotune`` (a few `GemmTiles` candidates per GEMM shape, timed within a
budget; winners written to ``pallas_kernels/tuned/<device>.json`` and ``$OUT/tuned/``),
``gemm_timing`` (SDXL GEMM shapes: float dots, int8/W4A8 and group-scaled W4A4 with a rank-32
branch on XLA and Pallas, activation quantization) and ``unet`` (one full-size SDXL-turbo UNet
forward at 512x512, batch 1, for fp16, w8a8, w4a8 and bf16, each in a fresh subprocess so its
peak GPU memory is its own), ``selection`` (the recipe's candidate pick on the shipped testbed
model: one pipeline call per candidate against `mixdq_jax.batch_render` chunks under vmap and
lax.map, compile and per-candidate seconds apart, images compared) and ``layer_costs``
(`mixdq_jax.deploy.layer_costs`: every Dense/Conv of the full-size SDXL-turbo UNet at batch 1,
128x128 latent, timed alone in each per-layer format float, fp8, w8a8, w4a8, w4a16, w4a4lr,
with bytes and BOPs, into
``$OUT/layer_costs.json``; within ``--layer-costs-budget-s`` and the deadline it stops between
layers, keeps what it wrote, and a rerun with the same ``$OUT`` resumes the table).
Every section runs in try/except and stores its error; the JSON is rewritten atomically after
every section, autotune shape and UNet configuration, so a timeout keeps what finished. The
output schema is documented in BENCHMARKS.md ("GPU check").

Why not `mixdq_jax.deploy.latency.unet_latency` as is: it draws the random weights on the host
with numpy (a minute and >10 GB of host memory for SDXL), runs every configuration in one
process (no per-configuration peak memory) and does not separate compile from run time. The
child here reuses its pieces (`deploy.memory.plan_for_spec`, `tree_nbytes`,
`deploy.packed.packed_shapes`, the `Float` / `Deployed` modes through `forward`) and draws the
weights on the device.

Imports: jax, flax, numpy and this project only (no diffusers, cvxpy, highspy, torch; the
JSON lists any of them found in ``sys.modules`` under ``forbidden_imports``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SDXL_CONFIG = REPO / "benchmarks" / "data" / "sdxl_turbo_unet_config.json"
SCHEMA_VERSION = 1
SECTIONS = ("versions", "kernel_checks", "autotune", "gemm_timing", "unet", "selection",
            "layer_costs")
LAYER_COST_FORMATS = ("float", "fp8", "w8a8", "w4a8", "w4a16", "w4a4lr")
UNET_CONFIGS = ("fp16", "w8a8", "w4a8", "bf16")  # bf16 last: the least informative
FORBIDDEN = ("diffusers", "cvxpy", "highspy", "torch", "mixdq_jax.allocation")

# (M, K, N) of SDXL-turbo UNet GEMMs at 512x512 (64x64 latent: M = 4096 / 1024 / 256 tokens in
# the 320 / 640 / 1280-channel stages), plus one 1024px shape.
GPU_GEMM_SHAPES: dict[str, tuple[int, int, int]] = {
    "attn_proj_1024x640x640": (1024, 640, 640),  # down_blocks.1 attention q/k/v/out
    "ff_in_1024x640x5120": (1024, 640, 5120),  # down_blocks.1 GEGLU proj (2 x 2560)
    "ff_out_1024x2560x640": (1024, 2560, 640),  # down_blocks.1 ff.net.2
    "attn_proj_256x1280x1280": (256, 1280, 1280),  # down_blocks.2 / mid attention q/k/v/out
    "ff_in_256x1280x10240": (256, 1280, 10240),  # down_blocks.2 GEGLU proj (2 x 5120)
    "conv3x3_4096x2880x320": (4096, 2880, 320),  # 64x64 resnet conv 3x3x320 (im2col GEMM)
    "attn_proj_4096x640x640": (4096, 640, 640),  # the same layer at 1024x1024
}
# Timed in gemm_timing only (not autotuned): the 1024x1024 down_blocks.2 GEGLU proj, one of
# its two 5120-wide halves, where the W4A4 branch and the group scaling are the smallest share.
GPU_TIMING_ONLY_SHAPES: dict[str, tuple[int, int, int]] = {
    "ff_in_half_1024x1280x5120": (1024, 1280, 5120),
}
W4A4_GROUP = 64  # SVDQuant's group size and rank of the low-rank branch, for the timings
W4A4_RANK = 32
DRY_GEMM_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny_64x64x64": (64, 64, 64),
    "tiny_ragged_77x96x80": (77, 96, 80),
}
# A tiny SDXL-shaped UNet (diffusers keyword arguments) for the dry run.
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 8 * 6 + 32,
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
}

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu_check +{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to strings, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())
    return str(obj)


def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_jsonable(obj), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def forbidden_imports() -> list[str]:
    return sorted(
        m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
    )


def setup_jax_env(args: argparse.Namespace) -> None:
    """Environment that must be set before jax is imported (inherited by the UNet children)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # children share the GPU
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"


def setup_jax_cache(cache_dir: str) -> None:
    """Persistent compilation cache (a rerun on the same machine skips the compiles)."""
    if not cache_dir:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def time_call(fn: Callable, args: tuple, *, repeats: int, target_s: float = 2e-3,
              max_inner: int = 100) -> dict[str, Any]:
    """CUDA-synchronised timing: the first call (compile + run), then `repeats` samples of
    `inner` back-to-back calls ended by one block_until_ready (inner chosen so a sample lasts
    about `target_s`, which hides the per-call dispatch of short kernels); median and min ms
    per call."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    inner = max(1, min(max_inner, int(target_s / max(one, 1e-7))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return {
        "ms": round(1e3 * statistics.median(samples), 5),
        "min_ms": round(1e3 * min(samples), 5),
        "first_call_s": round(first, 3),
        "inner": inner,
        "repeats": repeats,
    }


class Context:
    """Settings, clock and the report of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry_run = bool(args.dry_run)
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / "gpu_check.json"
        self.deadline = T_START + args.deadline_s
        self.on_gpu = False
        self.interpret = True
        self.doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "script": "benchmarks/gpu_check.py",
            "mode": "dry-run" if self.dry_run else "gpu",
            "argv": sys.argv[1:],
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "finished_utc": None,
            "elapsed_s": 0.0,
            "deadline_s": args.deadline_s,
            "status": "running",
            "sections": {},
            "summary": {},
            "forbidden_imports": [],
        }

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - T_START, 2)
        self.doc["forbidden_imports"] = forbidden_imports()
        atomic_write_json(self.json_path, self.doc)

    def run_section(self, name: str, fn: Callable[[Context, dict], None]) -> None:
        """Runs `fn(ctx, result)`; `result` is filled in place (and written on progress)."""
        entry: dict[str, Any] = {"status": "running", "seconds": None, "error": None,
                                 "result": {}}
        self.doc["sections"][name] = entry
        if self.args.sections and name not in self.args.sections:
            entry.update(status="skipped", error="not selected (--sections)")
            self.write()
            return
        log(f"== {name}")
        self.write()
        t0 = time.perf_counter()
        try:
            fn(self, entry["result"])
            if entry["result"].pop("_skipped", None):
                entry["status"] = "skipped"
                entry["error"] = entry["result"].pop("_why", None)
            else:
                entry["status"] = "ok"
        except Exception as err:  # a section must never lose the others
            entry["status"] = "error"
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc()[-4000:]
            log(f"{name} FAILED: {entry['error']}")
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"{name}: {entry['status']} in {entry['seconds']} s")
        self.write()


def skip(result: dict, why: str) -> None:
    result["_skipped"] = True
    result["_why"] = why
    log(f"skipped: {why}")


# ------------------------------------------------------------------------------ versions


def section_versions(ctx: Context, result: dict) -> None:
    from importlib import metadata

    import jax
    import jaxlib

    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    plugins = {}
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(("jax-cuda", "jax-rocm")):
            plugins[name] = d.version
    devices = []
    for d in jax.devices():
        stats = None
        try:
            stats = d.memory_stats()
        except Exception as err:  # not every backend has memory stats
            stats = {"error": str(err)}
        devices.append({
            "id": d.id, "platform": d.platform, "device_kind": str(d.device_kind),
            "bytes_limit": (stats or {}).get("bytes_limit"),
        })
    result.update(
        python=sys.version.split()[0],
        platform=platform.platform(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        cuda_plugins=plugins,
        default_backend=jax.default_backend(),
        devices=devices,
        flax=dist("flax"),
        optax=dist("optax"),
        numpy=dist("numpy"),
        torch=dist("torch"),
        triton=dist("triton"),
        env={k: os.environ.get(k) for k in (
            "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES"
        )},
    )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
        )
        result["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        result["nvidia_smi"] = f"unavailable: {err}"
    try:
        result["environment_info"] = jax.print_environment_info(return_string=True)
    except Exception as err:  # informative only
        result["environment_info"] = f"unavailable: {err}"
    for key in ("python", "jax", "jaxlib", "cuda_plugins", "default_backend", "flax", "optax",
                "torch", "triton", "nvidia_smi"):
        log(f"{key}: {result[key]}")
    for d in devices:
        log(f"device: {d}")
    print(result["environment_info"], flush=True)
    if not ctx.dry_run and not ctx.on_gpu:
        raise RuntimeError(
            f"no GPU: jax.default_backend() is {jax.default_backend()!r}; the kernel checks run "
            "in interpret mode on small shapes and autotune / UNet are skipped"
        )


# -------------------------------------------------------------------------- kernel checks

F32_EPS = 2.0**-23
# Final rounding of the epilogue's output dtype (the tolerance of
# tests/pallas_kernels/_gemm_cases.py: assert_epilogue_close).
FINAL_ROUNDING = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-10}


def _operands(rng, m, k, n, w_lo=-128, w_hi=127):
    """int8 codes with the extremes on both operands, scales, zero point, bias (as the tests)."""
    import numpy as np

    x_q = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    x_q[0, :] = -128
    x_q[-1, :] = 127
    w_q = rng.integers(w_lo, w_hi + 1, size=(k, n)).astype(np.int8)
    w_q[:, 0] = w_lo
    w_q[:, -1] = w_hi
    w_scale = rng.uniform(1e-3, 2e-2, size=(n,)).astype(np.float32)
    bias = rng.normal(size=(n,)).astype(np.float32)
    return x_q, w_q, np.float32(0.037), -17, w_scale, bias


def _exact(y, ref) -> dict[str, Any]:
    import numpy as np

    y = np.asarray(y)
    ref = np.asarray(ref)
    if y.shape != ref.shape:
        return {"passed": False, "detail": f"shape {y.shape} != reference {ref.shape}"}
    diff = y.astype(np.int64) != ref.astype(np.int64)
    max_abs = int(np.max(np.abs(y.astype(np.int64) - ref.astype(np.int64)))) if y.size else 0
    return {"passed": not bool(diff.any()), "mismatches": int(diff.sum()),
            "max_abs_err": max_abs, "rule": "exact"}


def _close(y, ref64, magnitude, out_dtype: str, *, sums: int | None = None,
           sums_note: str = "") -> dict[str, Any]:
    """|y - ref| <= 4 eps32 |terms| + final_rounding |ref| (tests/pallas_kernels/_gemm_cases).

    ``sums``: the result adds that many f32-rounded terms (W4A4: groups + rank + scales and
    bias), so the bound becomes ``sums * eps32 * |terms|`` (written 4*eps32*...*sums/4)."""
    import numpy as np

    y = np.asarray(y).astype(np.float64)
    if y.shape != ref64.shape:
        return {"passed": False, "detail": f"shape {y.shape} != reference {ref64.shape}"}
    factor = 1.0 if sums is None else max(sums / 4, 1.0)
    tol = (4 * factor * F32_EPS * magnitude + FINAL_ROUNDING[out_dtype] * np.abs(ref64)
           + 1e-30)
    err = np.abs(y - ref64)
    rule = "4*eps32*sum|terms| + final_rounding(out_dtype)*|ref|"
    if sums is not None:
        rule = f"4*eps32*sum|terms|*{sums}/4 + final_rounding(out_dtype)*|ref| ({sums_note})"
    return {"passed": bool(np.all(err <= tol)), "max_abs_err": float(np.max(err)),
            "max_err_over_tol": float(np.max(err / tol)), "rule": rule}


def _w4a4_numpy(x_q, x_scale, w_q, w_scale, group, lr_x, lr_up, bias):
    """The W4A4 contract in float64 from the unpacked codes: (result, sum of |terms|)."""
    import numpy as np

    y = np.zeros((x_q.shape[0], w_q.shape[1]))
    mag = np.zeros_like(y)
    for g in range(w_q.shape[0] // group):
        sl = slice(g * group, (g + 1) * group)
        sc = x_scale[:, g, None].astype(np.float64) * w_scale[None, g, :].astype(np.float64)
        y += sc * (x_q[:, sl].astype(np.int64) @ w_q[sl].astype(np.int64))
        mag += sc * (np.abs(x_q[:, sl].astype(np.int64)) @ np.abs(w_q[sl].astype(np.int64)))
    if lr_up is not None:
        lx = lr_x.astype(lr_up.dtype).astype(np.float64)
        y += lx @ lr_up.astype(np.float64)
        mag += np.abs(lx) @ np.abs(lr_up.astype(np.float64))
    if bias is not None:
        y += bias
        mag += np.abs(bias)
    return y, mag


def _on_cpu(fn: Callable, *args, **kwargs):
    """Runs a jnp reference on the CPU device (independent of the GPU under test)."""
    import jax
    import numpy as np

    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return np.asarray(fn(*args, **kwargs))
    with jax.default_device(cpu):
        args = jax.device_put(args, cpu)
        kwargs = jax.device_put(kwargs, cpu)
        return np.asarray(fn(*args, **kwargs))


def _tiles_dict(tiles) -> dict | None:
    return None if tiles is None else dataclasses.asdict(tiles)


def kernel_cases(ctx: Context) -> list[tuple[str, dict, Callable[[], dict]]]:
    """(name, description, check) triples; check() returns at least {"passed": bool}."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import (
        GemmTiles,
        QuantizeTiles,
        int8_conv2d,
        int8_conv2d_reference,
        int8_matmul,
        pack_group_weights,
        pack_weights,
        quantize_activation,
        quantize_activation_reference,
        w4a4_matmul,
        w4a8_matmul,
    )
    from pallas_kernels.tuning import gemm_tiles

    interp = ctx.interpret
    small = GemmTiles(block_m=32, block_n=32, block_k=32)
    big = not ctx.dry_run and ctx.on_gpu
    cases: list[tuple[str, dict, Callable[[], dict]]] = []
    w_range = {8: (-128, 127), 4: (-8, 7), 2: (-2, 1)}

    def gemm(x_q, w_q, wbits, tiles, **kw):
        if wbits == 8:
            return int8_matmul(x_q, w_q, backend="pallas", tiles=tiles, interpret=interp, **kw)
        wp = pack_weights(jnp.asarray(w_q), wbits)
        return w4a8_matmul(x_q, wp, bits=wbits, backend="pallas", tiles=tiles,
                           interpret=interp, **kw)

    def int_case(m, k, n, wbits, tiles):
        def check():
            rng = np.random.default_rng(m * 7 + k * 3 + n + wbits)
            x_q, w_q, _, zp, _, _ = _operands(rng, m, k, n, *w_range[wbits])
            y = gemm(x_q, w_q, wbits, tiles, a_zero_point=zp, out_dtype=jnp.int32)
            # float64 BLAS is exact here: every partial sum is an integer below 2**53
            ref = (x_q.astype(np.float64) - zp) @ w_q.astype(np.float64)
            res = _exact(y, ref)
            res["tiles"] = _tiles_dict(
                gemm_tiles(tiles, m, k, n, wbits=wbits, backend="pallas", interpret=interp)
            )
            return res
        name = f"gemm_w{wbits}a8_int32_{m}x{k}x{n}_{'small' if tiles else 'default'}_tiles"
        cases.append((name, {"op": "int8_matmul" if wbits == 8 else "w4a8_matmul",
                             "mkn": [m, k, n], "wbits": wbits, "out_dtype": "int32"}, check))

    def epi_case(m, k, n, wbits, out_dtype, tiles):
        def check():
            rng = np.random.default_rng(11 + m + wbits)
            x_q, w_q, a_s, zp, w_s, bias = _operands(rng, m, k, n, *w_range[wbits])
            y = gemm(x_q, w_q, wbits, tiles, a_scale=a_s, a_zero_point=zp, w_scale=w_s,
                     bias=bias, out_dtype=getattr(jnp, out_dtype))
            x = a_s * (x_q.astype(np.float64) - zp)
            w = w_q.astype(np.float64) * w_s.astype(np.float64)
            ref = x @ w + bias.astype(np.float64)
            mag = np.abs(x) @ np.abs(w) + np.abs(bias)
            res = _close(np.asarray(y.astype(jnp.float32)), ref, mag, out_dtype)
            res["dtype_ok"] = str(y.dtype) == out_dtype
            res["passed"] = res["passed"] and res["dtype_ok"]
            return res
        name = f"gemm_w{wbits}a8_{out_dtype}_epilogue_{m}x{k}x{n}"
        cases.append((name, {"op": "int8_matmul" if wbits == 8 else "w4a8_matmul",
                             "mkn": [m, k, n], "wbits": wbits, "out_dtype": out_dtype}, check))

    # integer GEMMs, exact: ragged M / N / K, divisible, tiny K; int8, packed int4 and int2
    for m, k, n in [(77, 100, 70), (64, 128, 96), (5, 36, 16)]:
        for tiles in (small, None):
            int_case(m, k, n, 8, tiles)
    for tiles in (small, None):
        int_case(77, 100, 70, 4, tiles)
        int_case(77, 100, 70, 2, tiles)
    int_case(64, 128, 96, 4, small)
    if big:
        for wbits in (8, 4, 2):
            int_case(1024, 640, 640, wbits, None)
        int_case(333, 1280, 1000, 8, None)
        int_case(333, 1280, 1000, 4, None)
    # float epilogues, documented tolerance
    for out_dtype in ("float32", "bfloat16", "float16"):
        epi_case(77, 100, 70, 8, out_dtype, small)
    epi_case(77, 100, 70, 4, "bfloat16", small)
    epi_case(77, 100, 72, 2, "float16", None)
    if big:
        epi_case(1024, 640, 640, 8, "bfloat16", None)
        epi_case(333, 1280, 1000, 4, "float32", None)

    def leading_dims():
        rng = np.random.default_rng(1)
        x_q, w_q, a_s, zp, w_s, _ = _operands(rng, 2 * 77, 64, 48)
        y = int8_matmul(x_q.reshape(2, 77, 64), w_q, a_scale=a_s, a_zero_point=zp,
                        w_scale=w_s, backend="pallas", interpret=interp)
        x = a_s * (x_q.astype(np.float64) - zp)
        w = w_q.astype(np.float64) * w_s.astype(np.float64)
        res = _close(np.asarray(y).reshape(-1, 48), x @ w, np.abs(x) @ np.abs(w), "float32")
        res["passed"] = res["passed"] and tuple(y.shape) == (2, 77, 48)
        return res

    cases.append(("gemm_w8a8_leading_dims_2x77x64x48_default_tiles",
                  {"op": "int8_matmul", "x_shape": [2, 77, 64], "n": 48,
                   "out_dtype": "float32"}, leading_dims))

    # W4A4 (SVDQuant's format): group-scaled 4-bit codes, low-rank branch, bias; against the
    # float64 contract computed from the unpacked codes
    def w4a4_case(m, k, n, group, rank, lr_dtype, out_dtype, tiles):
        def check():
            import ml_dtypes

            rng = np.random.default_rng(m + k + n + group)
            g = k // group
            x_q = rng.integers(-8, 8, size=(m, k)).astype(np.int8)
            x_q[0], x_q[-1] = -8, 7
            w_q = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
            w_q[:, 0], w_q[:, -1] = -8, 7
            x_s = rng.uniform(1e-3, 5e-2, size=(m, g)).astype(np.float32)
            w_s = rng.uniform(1e-3, 2e-2, size=(g, n)).astype(np.float32)
            bias = rng.normal(size=(n,)).astype(np.float32)
            lr_x = lr_up = None
            if rank:
                lr_x = rng.normal(size=(m, rank)).astype(np.float32)
                np_dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
                            "float32": np.float32}[lr_dtype]
                lr_up = (0.1 * rng.normal(size=(rank, n))).astype(np_dtype)
            y = w4a4_matmul(x_q, pack_group_weights(jnp.asarray(w_q), group), x_scale=x_s,
                            w_scale=w_s, group=group, lr_x=lr_x, lr_up=lr_up, bias=bias,
                            out_dtype=getattr(jnp, out_dtype), backend="pallas", tiles=tiles,
                            interpret=interp)
            ref, mag = _w4a4_numpy(x_q, x_s, w_q, w_s, group, lr_x, lr_up, bias)
            res = _close(np.asarray(y.astype(jnp.float32)), ref, mag, out_dtype,
                         sums=g + (rank or 0) + 4, sums_note=f"G={g} groups, rank {rank or 0}")
            res["dtype_ok"] = str(y.dtype) == out_dtype
            res["passed"] = res["passed"] and res["dtype_ok"]
            return res
        name = (f"gemm_w4a4_g{group}_r{rank or 0}_{out_dtype}_{m}x{k}x{n}_"
                f"{'small' if tiles else 'default'}_tiles")
        cases.append((name, {"op": "w4a4_matmul", "mkn": [m, k, n], "wbits": 4, "abits": 4,
                             "group": group, "rank": rank, "lr_dtype": lr_dtype,
                             "out_dtype": out_dtype}, check))

    w4a4_case(77, 128, 70, 64, 32, "float16", "float32", small)  # ragged M/N, 2 groups
    w4a4_case(5, 320, 48, 64, None, None, "bfloat16", None)  # 5 groups: a loop tail
    if big:
        w4a4_case(1024, 640, 640, 64, 32, "float16", "float32", None)
        w4a4_case(333, 1280, 1000, 64, 96, "bfloat16", "bfloat16", None)
        w4a4_case(256, 2880, 320, 64, 32, "float32", "float16", None)  # 45 groups, f32 branch

    # activation quantization, exact codes: ties at x/s = k + 0.5, random values, ragged size
    def quant_case(shape, dtype, bits, scale, ties, tiles):
        def check():
            rng = np.random.default_rng(len(shape) + bits)
            size = int(np.prod(shape))
            if ties:
                v = (rng.integers(-200, 200, size=size) + 0.5) * scale
            else:
                v = rng.normal(scale=3.0, size=size)
            x = jnp.asarray(v.reshape(shape), getattr(jnp, dtype))
            zp = 3 if bits == 8 else 1
            q = quantize_activation(x, scale, zp, bits=bits, backend="pallas", tiles=tiles,
                                    interpret=interp)
            ref = _on_cpu(functools.partial(quantize_activation_reference, bits=bits),
                          np.asarray(x), np.float32(scale), np.int32(zp))
            res = _exact(q, ref)
            res["dtype_ok"] = str(q.dtype) == "int8"
            res["passed"] = res["passed"] and res["dtype_ok"]
            return res
        name = (f"quantize_act_{dtype}_{bits}bit_{'x'.join(map(str, shape))}_"
                f"{'ties' if ties else 'random'}_block{tiles.block if tiles else 'default'}")
        cases.append((name, {"op": "quantize_activation", "shape": list(shape), "dtype": dtype,
                             "bits": bits, "scale": scale}, check))

    qt = QuantizeTiles(block=1024)
    quant_case((77, 100), "float32", 8, 0.25, True, qt)
    quant_case((77, 100), "float32", 8, 0.0371, False, None)
    quant_case((77, 100), "bfloat16", 8, 0.25, True, None)
    quant_case((77, 100), "float16", 8, 0.0371, False, qt)
    quant_case((77, 100), "float32", 4, 0.25, True, qt)
    if big:
        quant_case((1024, 640), "bfloat16", 8, 0.0371, False, None)
        quant_case((4096, 320), "float16", 8, 0.25, True, None)

    # conv: im2col + the Pallas GEMM against the per-tap int32 reference
    def conv_case(b, h, w, cin, cout, kk, stride, pad, wbits, out_dtype, tiles):
        def check():
            rng = np.random.default_rng(h * w + cin + wbits)
            lo, hi = w_range[wbits]
            x_q = rng.integers(-128, 128, size=(b, h, w, cin)).astype(np.int8)
            w_q = rng.integers(lo, hi + 1, size=(kk, kk, cin, cout)).astype(np.int8)
            zp = 5
            w_s = rng.uniform(1e-3, 2e-2, size=(cout,)).astype(np.float32)
            bias = rng.normal(size=(cout,)).astype(np.float32)
            kw = dict(stride=stride, padding=pad, a_zero_point=zp)
            if wbits == 8:
                w_arg, extra = w_q, {}
            else:
                w_arg = pack_weights(jnp.asarray(w_q.reshape(-1, cout)), wbits)
                extra = dict(kernel_size=(kk, kk), weight_bits=wbits)
            acc = _on_cpu(functools.partial(int8_conv2d_reference, out_dtype=jnp.int32, **kw),
                          x_q, w_q)
            if out_dtype == "int32":
                y = int8_conv2d(x_q, w_arg, out_dtype=jnp.int32, backend="pallas", tiles=tiles,
                                interpret=interp, **kw, **extra)
                return _exact(y, acc)
            a_s = np.float32(0.037)
            y = int8_conv2d(x_q, w_arg, a_scale=a_s, w_scale=w_s, bias=bias,
                            out_dtype=getattr(jnp, out_dtype), backend="pallas", tiles=tiles,
                            interpret=interp, **kw, **extra)
            scale = np.float64(a_s) * w_s.astype(np.float64)
            ref = acc.astype(np.float64) * scale + bias
            mag = np.abs(acc.astype(np.float64)) * scale + np.abs(bias)
            return _close(np.asarray(y.astype(jnp.float32)), ref, mag, out_dtype)
        name = (f"conv{kk}x{kk}_s{stride}_w{wbits}a8_{out_dtype}_{b}x{h}x{w}x{cin}to{cout}_"
                f"{'small' if tiles else 'default'}_tiles")
        cases.append((name, {"op": "int8_conv2d", "bhwc": [b, h, w, cin], "cout": cout,
                             "kernel": kk, "stride": stride, "padding": pad, "wbits": wbits,
                             "out_dtype": out_dtype}, check))

    conv_case(1, 9, 11, 24, 20, 3, 1, 1, 8, "int32", small)
    conv_case(2, 9, 11, 24, 20, 3, 2, 1, 8, "int32", None)
    conv_case(1, 9, 11, 24, 20, 1, 1, 0, 8, "int32", small)
    conv_case(1, 9, 11, 24, 20, 3, 1, 1, 4, "int32", small)
    conv_case(1, 9, 11, 24, 20, 3, 1, 1, 8, "float32", None)
    if big:
        conv_case(1, 32, 32, 320, 320, 3, 1, 1, 8, "int32", None)
        conv_case(1, 32, 32, 320, 320, 3, 1, 1, 4, "bfloat16", None)
    return cases


def section_kernel_checks(ctx: Context, result: dict) -> None:
    result.update(interpret=ctx.interpret, backend="pallas", cases=[], passed=0, failed=0,
                  not_run=0, all_passed=False)
    for name, desc, check in kernel_cases(ctx):
        if ctx.time_left() < 10:  # the first priority: only the deadline stops them
            result["cases"].append({"name": name, **desc, "passed": False,
                                    "error": "not run: deadline"})
            result["not_run"] += 1
            continue
        t0 = time.perf_counter()
        try:
            res = check()
        except Exception as err:
            res = {"passed": False, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-2000:]}
        res = {"name": name, **desc, **res, "seconds": round(time.perf_counter() - t0, 3)}
        result["cases"].append(res)
        result["passed" if res["passed"] else "failed"] += 1
        log(f"{'PASS' if res['passed'] else 'FAIL'} {name} ({res['seconds']} s)"
            + ("" if res["passed"] else f": {res.get('error') or res}"))
    result["all_passed"] = result["failed"] == result["not_run"] == 0 and result["passed"] > 0
    ctx.doc["summary"]["kernel_checks"] = {
        k: result[k] for k in ("passed", "failed", "not_run", "all_passed", "interpret")
    }


# ------------------------------------------------------------------------------- autotune


def autotune_candidates(dry_run: bool):
    from pallas_kernels import GemmTiles

    if dry_run:
        return [GemmTiles(), GemmTiles(block_m=32, block_n=32, block_k=32, num_warps=2)]
    return [
        GemmTiles(),  # the defaults first: the baseline every entry is compared with
        GemmTiles(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
        GemmTiles(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
        GemmTiles(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4),
        GemmTiles(block_m=128, block_n=64, block_k=128, num_warps=4, num_stages=4),
        GemmTiles(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3),
    ]


def _int_gemm_operands(m, k, n, wbits, seed=0):
    """Random device operands: int8 codes, (packed) weights, column sums."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import pack_weights, weight_column_sums

    k1, k2 = jax.random.split(jax.random.key(seed))
    x_q = jax.random.randint(k1, (m, k), -128, 128, jnp.int32).astype(jnp.int8)
    lo = -(1 << (wbits - 1))
    w = jax.random.randint(k2, (k, n), lo, -lo, jnp.int32).astype(jnp.int8)
    colsum = weight_column_sums(w)
    return x_q, (w if wbits == 8 else pack_weights(w, wbits)), colsum


def _gemm_fn(wbits, tiles, interpret, out_dtype, backend="pallas"):
    import jax

    from pallas_kernels import int8_matmul, w4a8_matmul

    epi = dict(a_scale=0.02, a_zero_point=3, out_dtype=out_dtype, backend=backend,
               tiles=tiles, interpret=interpret)
    if wbits == 8:
        return jax.jit(lambda x, w, c, s, b: int8_matmul(x, w, colsum=c, w_scale=s, bias=b,
                                                         **epi))
    return jax.jit(lambda x, w, c, s, b: w4a8_matmul(x, w, bits=wbits, colsum=c, w_scale=s,
                                                     bias=b, **epi))


def section_autotune(ctx: Context, result: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import tuning

    if not ctx.dry_run and not ctx.on_gpu:
        return skip(result, "no GPU")
    budget = ctx.args.autotune_budget_s
    budget_end = time.perf_counter() + min(budget, max(ctx.time_left() - 60, 0))
    kind = str(jax.devices()[0].device_kind)
    slug = tuning.device_kind_slug(kind)
    out_file = ctx.out / "tuned" / f"{slug}.json"
    repo_file = None
    if not ctx.dry_run and not ctx.args.no_write_tuned:
        repo_file = tuning.TUNED_DIR / f"{slug}.json"
    shapes = DRY_GEMM_SHAPES if ctx.dry_run else GPU_GEMM_SHAPES
    cands = autotune_candidates(ctx.dry_run)
    result.update(budget_s=budget, device_kind=kind, file=str(out_file),
                  repo_file=str(repo_file) if repo_file else None, interpret=ctx.interpret,
                  candidates=[dataclasses.asdict(t) for t in cands], entries=[],
                  budget_exhausted=False, timing="int32 output (exact); median ms per call")
    entries = []
    for wbits, (name, (m, k, n)) in [(b, s) for b in (8, 4) for s in shapes.items()]:
        if time.perf_counter() > budget_end:
            result["budget_exhausted"] = True
            break
        x_q, w, colsum = _int_gemm_operands(m, k, n, wbits)
        s = jnp.full((n,), 0.01, jnp.float32)
        b = jnp.zeros((n,), jnp.float32)
        rows, ref = [], None
        for tiles in cands:
            if time.perf_counter() > budget_end and rows:
                result["budget_exhausted"] = True
                break
            row: dict[str, Any] = {"tiles": dataclasses.asdict(tiles)}
            try:
                fn = _gemm_fn(wbits, tiles, ctx.interpret, jnp.int32)
                out = np.asarray(fn(x_q, w, colsum, s, b))
                ref = out if ref is None else ref
                row["equal_to_default"] = bool(np.array_equal(out, ref))
                row.update(time_call(fn, (x_q, w, colsum, s, b),
                                     repeats=ctx.args.gemm_repeats))
            except Exception as err:  # e.g. out of shared memory for large tiles
                row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            rows.append(row)
        ok = [r for r in rows if "ms" in r and r.get("equal_to_default")]
        entry = {"name": name, "m": m, "k": k, "n": n, "wbits": wbits, "candidates": rows}
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            default_ms = rows[0].get("ms")
            entry.update(tiles=best["tiles"], ms=best["ms"], default_ms=default_ms,
                         speedup_vs_default=round(default_ms / best["ms"], 3)
                         if default_ms else None)
            entries.append({k_: entry[k_] for k_ in
                            ("m", "k", "n", "wbits", "tiles", "ms", "default_ms")})
            log(f"autotune {name} w{wbits}: best {best['tiles']} {best['ms']:.4f} ms "
                f"(default {default_ms} ms)")
        if any(r.get("equal_to_default") is False for r in rows):
            entry["mismatch"] = "a tile setting changed the result: see candidates"
            log(f"autotune {name} w{wbits}: RESULT MISMATCH between tile settings")
        result["entries"].append(entry)
        if entries:
            prov = dict(jax_version=jax.__version__, budget_s=budget,
                        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        source="benchmarks/gpu_check.py autotune", interpret=ctx.interpret)
            tuning.write_tuned(out_file, kind, entries, **prov)
            if repo_file is not None:
                try:  # a read-only tree must not stop the autotune: $OUT has the copy
                    tuning.write_tuned(repo_file, kind, entries, **prov)
                except OSError as err:
                    result["repo_file_error"] = str(err)
        ctx.write()
    result["tuned_entries"] = len(entries)
    result["mismatches"] = sum("mismatch" in e for e in result["entries"])
    ctx.doc["summary"]["autotune"] = {"entries": len(entries), "file": str(out_file),
                                      "mismatches": result["mismatches"]}


# ---------------------------------------------------------------------------- gemm timing


def _w4a4_operands(m, k, n, seed=4):
    """Random device operands of `w4a4_matmul` with a rank-`W4A4_RANK` float16 branch. K is
    rounded up to whole groups, as a caller zero-pads it (every SDXL K is already a multiple)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import pack_group_weights

    g = -(-k // W4A4_GROUP)
    k = g * W4A4_GROUP
    ks = jax.random.split(jax.random.key(seed), 6)
    x_q = jax.random.randint(ks[0], (m, k), -8, 8, jnp.int32).astype(jnp.int8)
    w = jax.random.randint(ks[1], (k, n), -8, 8, jnp.int32).astype(jnp.int8)
    return dict(
        x_q=x_q, w_packed=pack_group_weights(w, W4A4_GROUP),
        x_scale=jax.random.uniform(ks[2], (m, g), jnp.float32, 1e-3, 5e-2),
        w_scale=jax.random.uniform(ks[3], (g, n), jnp.float32, 1e-3, 2e-2),
        lr_x=jax.random.normal(ks[4], (m, W4A4_RANK), jnp.float16),
        lr_up=(0.1 * jax.random.normal(ks[5], (W4A4_RANK, n))).astype(jnp.float16),
        bias=jnp.zeros((n,), jnp.float32),
    )


def _w4a4_fn(interpret, backend="pallas"):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import w4a4_matmul

    return jax.jit(lambda x, w, xs, ws, lx, lu, b: w4a4_matmul(
        x, w, x_scale=xs, w_scale=ws, lr_x=lx, lr_up=lu, bias=b, group=W4A4_GROUP,
        out_dtype=jnp.float32, backend=backend, interpret=interpret))


def section_gemm_timing(ctx: Context, result: dict) -> None:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import GemmTiles, quantize_activation
    from pallas_kernels.tuning import gemm_tiles

    shapes = DRY_GEMM_SHAPES if ctx.dry_run else {**GPU_GEMM_SHAPES, **GPU_TIMING_ONLY_SHAPES}
    end = time.perf_counter() + min(ctx.args.gemm_budget_s, max(ctx.time_left() - 30, 0))
    result.update(repeats=ctx.args.gemm_repeats, interpret=ctx.interpret, shapes={},
                  budget_s=ctx.args.gemm_budget_s, budget_exhausted=False,
                  note="median ms per call (CUDA-synchronised, back-to-back calls); "
                       "int8/w4a8/w4a4 ops: f32 output as the deployed UNet; *_pallas = "
                       "tiles=None (tuned tiles when present), *_pallas_default = GemmTiles(); "
                       f"w4a4_*: group {W4A4_GROUP}, rank-{W4A4_RANK} float16 low-rank branch "
                       "and bias in the epilogue (the branch's down projection and the "
                       "activation quantization are not included), GemmTiles() (no tuned "
                       "W4A4 tiles); tops counts 2MKN only")
    for name, (m, k, n) in shapes.items():
        if time.perf_counter() > end:
            result["budget_exhausted"] = True
            break
        k1, k2 = jax.random.split(jax.random.key(1))
        x = jax.random.normal(k1, (m, k), jnp.bfloat16)
        wf = jax.random.normal(k2, (k, n), jnp.bfloat16)
        s = jnp.full((n,), 0.01, jnp.float32)
        b = jnp.zeros((n,), jnp.float32)
        x_q, w8, cs8 = _int_gemm_operands(m, k, n, 8, seed=2)
        _, w4, cs4 = _int_gemm_operands(m, k, n, 4, seed=3)
        w4a4_args = tuple(_w4a4_operands(m, k, n).values())
        dot = jax.jit(jnp.dot)
        ops: dict[str, tuple[Callable, tuple]] = {
            "bf16_dot": (dot, (x, wf)),
            "fp16_dot": (dot, (x.astype(jnp.float16), wf.astype(jnp.float16))),
            "int8_xla": (_gemm_fn(8, None, ctx.interpret, jnp.float32, "xla"),
                         (x_q, w8, cs8, s, b)),
            "int8_pallas_default": (_gemm_fn(8, GemmTiles(), ctx.interpret, jnp.float32),
                                    (x_q, w8, cs8, s, b)),
            "w4a8_xla": (_gemm_fn(4, None, ctx.interpret, jnp.float32, "xla"),
                         (x_q, w4, cs4, s, b)),
            "w4a8_pallas_default": (_gemm_fn(4, GemmTiles(), ctx.interpret, jnp.float32),
                                    (x_q, w4, cs4, s, b)),
            "w4a4_xla": (_w4a4_fn(ctx.interpret, "xla"), w4a4_args),
            "w4a4_pallas": (_w4a4_fn(ctx.interpret), w4a4_args),
            "quantize_act_xla": (jax.jit(lambda a: quantize_activation(a, 0.02, 3,
                                                                       backend="xla")), (x,)),
            "quantize_act_pallas": (jax.jit(lambda a: quantize_activation(
                a, 0.02, 3, backend="pallas", interpret=ctx.interpret)), (x,)),
        }
        resolved = {"w4a4_pallas": dataclasses.asdict(GemmTiles())}
        for wbits, op in ((8, "int8_pallas"), (4, "w4a8_pallas")):
            t = gemm_tiles(None, m, k, n, wbits=wbits, backend="pallas",
                           interpret=ctx.interpret)
            resolved[op] = dataclasses.asdict(t)
            if t != GemmTiles():
                w, cs = (w8, cs8) if wbits == 8 else (w4, cs4)
                ops[op] = (_gemm_fn(wbits, None, ctx.interpret, jnp.float32),
                           (x_q, w, cs, s, b))
        entry: dict[str, Any] = {"mkn": [m, k, n], "tiles": resolved, "ms": {}, "tops": {},
                                 "first_call_s": {}, "errors": {}}
        for op, (fn, args) in ops.items():
            try:
                t = time_call(fn, args, repeats=ctx.args.gemm_repeats)
            except Exception as err:
                entry["errors"][op] = f"{type(err).__name__}: {str(err)[:500]}"
                continue
            entry["ms"][op] = t["ms"]
            entry["first_call_s"][op] = t["first_call_s"]
            if not op.startswith("quantize"):
                entry["tops"][op] = round(2 * m * k * n / (t["ms"] * 1e-3) / 1e12, 3)
        for op in ("int8_pallas", "w4a8_pallas"):
            if op not in entry["ms"] and f"{op}_default" in entry["ms"]:
                entry["ms"][op] = entry["ms"][f"{op}_default"]  # no tuned tiles: same program
                entry["tops"][op] = entry["tops"][f"{op}_default"]
        bf16 = entry["ms"].get("bf16_dot")
        if bf16:
            entry["speedup_vs_bf16"] = {
                op: round(bf16 / v, 3) for op, v in entry["ms"].items()
                if not op.startswith("quantize")
            }
        result["shapes"][name] = entry
        log(f"gemm {name}: " + ", ".join(f"{op} {v:.4f}" for op, v in entry["ms"].items())
            + (f"; errors {entry['errors']}" if entry["errors"] else ""))
        ctx.write()


# ----------------------------------------------------------------------------------- unet


def section_unet(ctx: Context, result: dict) -> None:
    if not ctx.dry_run and not ctx.on_gpu:
        return skip(result, "no GPU")
    if ctx.dry_run:
        cfg_path = ctx.out / "tiny_unet_config.json"
        atomic_write_json(cfg_path, TINY_UNET_CONFIG)
    else:
        cfg_path = Path(ctx.args.unet_config)
    configs = [c for c in ctx.args.unet_configs.split(",") if c]
    result.update(
        config_file=str(cfg_path), latent=[ctx.args.latent, ctx.args.latent], batch=1,
        repeats=ctx.args.unet_repeats, configs={},
        memory_note=(
            "each configuration runs in a fresh subprocess (XLA_PYTHON_CLIENT_PREALLOCATE=false)"
            ": peak_bytes_in_use is jax.devices()[0].memory_stats() of that process alone "
            "(params + compile-time scratch + forward); compiled_peak_bytes is XLA's "
            "memory_analysis of the compiled forward (arguments + outputs + temporaries)"
        ),
    )
    for name in configs:
        left = ctx.time_left()
        child_json = ctx.out / f"unet_{name}.json"
        child_log = ctx.out / f"unet_{name}.log"
        if left < ctx.args.unet_min_start_s:
            result["configs"][name] = {"status": "skipped",
                                       "error": f"deadline: {left:.0f} s left"}
            log(f"unet {name}: skipped, {left:.0f} s left")
            ctx.write()
            continue
        timeout = min(ctx.args.unet_child_timeout_s, left - 5)
        cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--unet-child", name,
               "--child-out", str(child_json), "--unet-config", str(cfg_path),
               "--latent", str(ctx.args.latent), "--unet-repeats", str(ctx.args.unet_repeats),
               "--compile-cache", ctx.args.compile_cache]
        if ctx.dry_run:
            cmd.append("--dry-run")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        log(f"unet {name}: child with timeout {timeout:.0f} s")
        t0 = time.perf_counter()
        child_json.unlink(missing_ok=True)
        with open(child_log, "w") as logf:
            proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    cwd=str(REPO))
            try:
                rc = proc.wait(timeout=timeout)
                status = "ok" if rc == 0 else "error"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc, status = None, "timeout"
        entry: dict[str, Any] = {}
        if child_json.exists():
            try:
                entry = json.loads(child_json.read_text())
            except ValueError as err:
                entry = {"child_json_error": str(err)}
        entry.update(status=status if entry.get("stage") == "done" or status != "ok"
                     else "error", returncode=rc, wall_s=round(time.perf_counter() - t0, 1),
                     log=str(child_log))
        if entry["status"] != "ok":
            entry["log_tail"] = child_log.read_text()[-3000:] if child_log.exists() else ""
            entry.setdefault("error", f"child {status} (rc={rc}) at stage "
                                      f"{entry.get('stage', 'start')}")
        result["configs"][name] = entry
        log(f"unet {name}: {entry['status']} in {entry['wall_s']} s; ms={entry.get('ms')} "
            f"peak={entry.get('peak_bytes_in_use')} compile_s={entry.get('compile_s')}")
        ctx.write()
    ms = {n: e.get("ms") for n, e in result["configs"].items() if e.get("ms")}
    fp = ms.get("fp16")
    if fp:
        result["speedup_vs_fp16"] = {n: round(fp / v, 3) for n, v in ms.items()}
    ctx.doc["summary"]["unet_ms"] = ms
    ctx.doc["summary"]["unet_peak_bytes_in_use"] = {
        n: e.get("peak_bytes_in_use") for n, e in result["configs"].items()
    }


# ----------------------------------------------------------------------------- selection
SELECTION_PROMPTS = ("a red cube on grass", "two blue balls", "a green cone in a room",
                     "a yellow cube next to a red ball")  # fmt: skip


def _time_chunks(chunks: Any) -> dict:
    """Times an iterator of ``(indices, images)`` chunks: the first (compile + run) apart from
    the rest (seconds per candidate); keeps the first chunk's images."""
    t0 = time.perf_counter()
    idx, first = next(chunks)
    first_s = time.perf_counter() - t0
    t0, n = time.perf_counter(), 0
    for rest_idx, _ in chunks:
        n += len(rest_idx)
    run_s = time.perf_counter() - t0
    return {"first_chunk_s": round(first_s, 3), "per_candidate_s": round(run_s / max(n, 1), 5),
            "candidates_timed": n, "images": first[0]}  # fmt: skip


def section_selection(ctx: Context, result: dict) -> None:
    """Random weight-pick candidates (2/4/8 bits per layer, float activations) on the testbed:
    `Pipeline.__call__` per candidate (the recipe's CPU default) against `BatchRenderer` chunks
    (vmap: the accelerator default; lax.map). The dry run leaves lax.map out (one compile
    less; tests/test_batch_render.py checks it)."""
    if not ctx.dry_run and not ctx.on_gpu:
        return skip(result, "no GPU")
    import numpy as np

    from mixdq_jax.api import load_pipeline
    from mixdq_jax.batch_render import BatchRenderer, RenderSettings
    from mixdq_jax.quant.qconfig import QuantSpec
    from mixdq_jax.quant.registry import layer_splits, unet_layers

    chunk = 2 if ctx.dry_run else ctx.args.selection_chunk
    n = 2 * chunk if ctx.dry_run else 4 * chunk
    prompts = SELECTION_PROMPTS[:1] if ctx.dry_run else SELECTION_PROMPTS
    pipe = load_pipeline("testbed")
    splits = layer_splits(unet_layers(pipe.unet.config))
    rng = np.random.default_rng(0)
    qconfigs = [
        QuantSpec(weight_bits={k: int(rng.choice([2, 4, 8])) for k in splits}, act_bits=16)
        .to_qconfig(splits)
        for _ in range(n)
    ]
    h, w = pipe.image_size
    settings = RenderSettings(prompts=prompts, steps=1, guidance_scale=0.0, height=h, width=w,
                              seed=0, batch_size=len(prompts))  # fmt: skip
    result.update(model="testbed", prompts=len(prompts), candidates=n, chunk=chunk, ways={})

    def per_call():
        for i, q in enumerate(qconfigs):
            yield [i], np.asarray(pipe(list(prompts), height=h, width=w, seed=0, qconfig=q))[None]

    ways = {"per_call": per_call}
    for parallel in ("vmap",) if ctx.dry_run else ("vmap", "map"):
        renderer = BatchRenderer(pipe, settings, parallel=parallel)
        ways[parallel] = lambda r=renderer: r.render(qconfigs, chunk=chunk)
    reference = None
    for name, chunks in ways.items():
        if ctx.time_left() < 30:
            result["ways"][name] = {"status": "skipped", "error": "deadline"}
            continue
        entry = _time_chunks(chunks())
        images = entry.pop("images")
        reference = images if reference is None else reference
        entry["max_abs_diff_vs_per_call"] = float(np.max(np.abs(images - reference)))
        result["ways"][name] = entry
        log(f"selection {name}: {entry}")
        ctx.write()
    per = {k: v.get("per_candidate_s") for k, v in result["ways"].items()}
    if per.get("per_call") and per.get("vmap"):
        result["vmap_speedup_per_candidate"] = round(per["per_call"] / per["vmap"], 2)
    ctx.doc["summary"]["selection_per_candidate_s"] = per


# ----------------------------------------------------------------------------- layer costs


def section_layer_costs(ctx: Context, result: dict) -> None:
    """The per-layer cost table, bounded: `cost_table` starts no layer after its budget and
    rewrites the JSON after every layer (an interrupted run keeps every finished layer)."""
    if not ctx.dry_run and not ctx.on_gpu:
        return skip(result, "no GPU")
    from mixdq_jax.deploy import layer_costs
    from mixdq_jax.models.unet import UNetConfig

    if ctx.dry_run:
        config, source = UNetConfig.from_dict(TINY_UNET_CONFIG), "tiny UNet (dry run)"
    else:
        config, source = UNetConfig.from_json(ctx.args.unet_config), ctx.args.unet_config
    left = ctx.time_left()
    budget = min(ctx.args.layer_costs_budget_s, left - ctx.args.layer_costs_margin_s)
    if budget <= 0:
        return skip(result, f"deadline: {left:.0f} s left")
    out = ctx.out / "layer_costs.json"
    latent = ctx.args.layer_costs_latent
    result.update(config=str(source), file=str(out), batch=1, latent=[latent, latent],
                  formats=list(LAYER_COST_FORMATS), repeats=ctx.args.layer_costs_repeats,
                  budget_s=round(budget, 1))
    log(f"layer costs: {source}, latent {latent}, budget {budget:.0f} s -> {out}")
    table = layer_costs.cost_table(
        config, formats=LAYER_COST_FORMATS, batch=1, latent=latent,
        repeats=ctx.args.layer_costs_repeats, out=out, budget_s=budget, progress=False,
    )
    total = len(layer_costs.layer_shapes(config, batch=1, latent=latent))
    result.update(complete=table["complete"], layers_done=len(table["layers"]),
                  layers_total=total, dispatch_ms=table["dispatch_ms"],
                  measuring_s=table["seconds"], totals=table["totals"],
                  float_dtype=table["settings"]["float_dtype"])
    ctx.doc["summary"]["layer_costs"] = {
        "complete": table["complete"], "layers": f"{len(table['layers'])}/{total}",
        "totals_ms": {f: t["ms"] for f, t in table["totals"].items()},
    }
    log(f"layer costs: {len(table['layers'])}/{total} layers, complete={table['complete']}")


def _device_random_like(tree: Any, seed: int) -> Any:
    """Random arrays of the abstract tree's shapes, drawn on the device.

    A counter-based hash (murmur3's finaliser of ``iota + leaf index``) rather than
    `jax.random`: one tiny jitted generator per (shape, dtype, kind) compiles ~10x faster
    than threefry (SDXL has ~60 distinct leaf signatures and 5,000 leaves). Values as
    `deploy.latency._random_like`: int8 codes in [-127, 127), zero points in [-8, 8), scales
    in [1e-3, 2e-2], floats uniform with std 0.02; random values change no timing."""
    import jax
    import jax.numpy as jnp

    def gen(i, *, shape, dtype, kind):
        size = math.prod(shape)
        x = jax.lax.iota(jnp.uint32, size) + i * jnp.uint32(0x9E3779B9)
        x = x ^ (x >> 16)
        x = x * jnp.uint32(0x85EBCA6B)
        x = x ^ (x >> 13)
        x = x * jnp.uint32(0xC2B2AE35)
        x = x ^ (x >> 16)
        u = (x >> 8).astype(jnp.float32) * (1.0 / (1 << 24))  # uniform [0, 1)
        if kind == "int":
            v = jnp.floor(u * 254.0) - 127.0
        elif kind == "zp":
            v = jnp.floor(u * 16.0) - 8.0
        elif kind == "scale":
            v = 1e-3 + u * (2e-2 - 1e-3)
        else:
            v = (u - 0.5) * (0.02 * math.sqrt(12.0))
        return v.astype(dtype).reshape(shape)

    leaves, treedef = jax.tree.flatten_with_path(tree)
    fns: dict[tuple, Callable] = {}
    out = []
    for i, (path, leaf) in enumerate(leaves):
        key = str(getattr(path[-1], "key", path[-1]))
        dtype = jnp.dtype(leaf.dtype)
        if jnp.issubdtype(dtype, jnp.integer):
            kind = "zp" if key == "a_zp" else "int"
        else:
            kind = "scale" if key in ("w_scale", "a_scale") else "float"
        sig = (tuple(leaf.shape), dtype, kind)
        if sig not in fns:
            fns[sig] = jax.jit(functools.partial(gen, shape=sig[0], dtype=dtype, kind=kind))
        out.append(fns[sig](jnp.uint32((seed * 1_000_003 + i) % (1 << 32))))
    return jax.tree.unflatten(treedef, out)


def _memory_stats() -> dict[str, Any]:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # not every backend has them
        stats = {}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def unet_child(args: argparse.Namespace) -> None:
    """One UNet configuration in this (fresh) process; progress written to --child-out after
    every stage (start, shapes, params, lowered, compiled, done), errors included."""
    out = Path(args.child_out)
    name = args.unet_child
    rec: dict[str, Any] = {"config": name, "stage": "start", "pid": os.getpid()}

    def stage(s: str) -> None:
        rec["stage"] = s
        rec["elapsed_s"] = round(time.perf_counter() - T_START, 2)
        rec["forbidden_imports"] = forbidden_imports()
        atomic_write_json(out, rec)
        log(f"child {name}: {s}")
        if s == args.unet_stop_after:  # a preflight of the early stages (hidden option)
            raise SystemExit(0)

    stage("start")
    try:
        _unet_child_body(args, rec, stage)
    except SystemExit:
        raise
    except BaseException as err:
        rec["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
        rec["traceback"] = traceback.format_exc()[-4000:]
        atomic_write_json(out, rec)
        raise


def _unet_child_body(args: argparse.Namespace, rec: dict, stage: Callable[[str], None]) -> None:
    name = args.unet_child
    import jax
    import jax.numpy as jnp
    import numpy as np

    setup_jax_cache(args.compile_cache)
    from mixdq_jax.deploy.layers import Deployed
    from mixdq_jax.deploy.memory import plan_for_spec, tree_nbytes
    from mixdq_jax.deploy.packed import packed_shapes
    from mixdq_jax.models.unet import (
        UNet2DConditionModel,
        UNetConfig,
        example_inputs,
        param_shapes,
    )
    from mixdq_jax.quant.forward import forward, unet_arguments
    from mixdq_jax.quant.modes import Float
    from mixdq_jax.quant.qconfig import QuantSpec
    from pallas_kernels import tuning
    from pallas_kernels.backend import resolve_backend

    bits = {"w8a8": 8, "w4a8": 4}.get(name)
    float_dtype = jnp.dtype(jnp.bfloat16 if name == "bf16" else jnp.float16)
    config = UNetConfig.from_json(args.unet_config)
    model = UNet2DConditionModel(config=config, dtype=float_dtype, param_dtype=float_dtype)
    t0 = time.perf_counter()
    float_shapes = param_shapes(model)
    plan = None
    if bits is None:
        shapes = float_shapes
    else:
        spec = QuantSpec(weight_bits=bits, act_bits=8, symmetric_weights=True)
        plan, act = plan_for_spec(config, spec, float_shapes)
        shapes = packed_shapes(float_shapes, plan, act, float_dtype=float_dtype,
                               bos_dim=config.per_block("cross_attention_dim")[0])
    tuned = tuning.tuned_file()
    rec.update(
        float_dtype=float_dtype.name, weight_bits=bits, act_bits=None if bits is None else 8,
        backend=jax.default_backend(), device_kind=str(jax.devices()[0].device_kind),
        kernel_backend=None if bits is None else resolve_backend("auto"),
        latent=[args.latent, args.latent], batch=1,
        param_bytes=tree_nbytes(shapes), param_leaves=len(jax.tree.leaves(shapes)),
        quantized_layers=None if plan is None else len(plan.layers),
        tuned_tiles_file=None if tuned is None else str(tuned),
        tuned_tiles_entries=None if tuned is None else len(tuning.load_entries(tuned)),
        shapes_s=round(time.perf_counter() - t0, 2),
    )
    stage("shapes")

    t0 = time.perf_counter()
    params = jax.block_until_ready(_device_random_like(shapes, seed=0))
    example = example_inputs(config, batch=1, height=args.latent, width=args.latent)
    inputs = _device_random_like(example, seed=1)
    inputs["timesteps"] = jnp.full_like(inputs["timesteps"], 999.0)
    inputs = jax.tree.map(lambda a: a.astype(float_dtype), inputs)
    jax.block_until_ready(inputs)
    rec.update(params_s=round(time.perf_counter() - t0, 2), after_params=_memory_stats())
    stage("params")

    mode = Float() if plan is None else Deployed(plan=plan, backend="auto")

    def run(p, kw):
        return forward(model, p, None, *unet_arguments(kw), mode=mode)

    t0 = time.perf_counter()
    lowered = jax.jit(run).lower(params, inputs)
    rec["trace_lower_s"] = round(time.perf_counter() - t0, 2)
    stage("lowered")
    t0 = time.perf_counter()
    compiled = lowered.compile()
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    try:
        ma = compiled.memory_analysis()
        rec["compiled_peak_bytes"] = int(
            ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes
        )
        rec["compiled_temp_bytes"] = int(ma.temp_size_in_bytes)
    except Exception as err:  # informative only
        rec["compiled_peak_bytes"] = None
        rec["memory_analysis_error"] = str(err)
    stage("compiled")

    t0 = time.perf_counter()
    y = jax.block_until_ready(compiled(params, inputs))
    rec["first_run_ms"] = round(1e3 * (time.perf_counter() - t0), 2)
    times = []
    for _ in range(args.unet_repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, inputs))
        times.append(time.perf_counter() - t0)
    y = np.asarray(y.astype(jnp.float32))
    rec.update(
        ms=round(1e3 * statistics.median(times), 3), min_ms=round(1e3 * min(times), 3),
        times_ms=[round(1e3 * t, 3) for t in times], repeats=args.unet_repeats,
        output_shape=list(y.shape), output_finite_fraction=float(np.isfinite(y).mean()),
        **_memory_stats(),
    )
    stage("done")


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, interpret-mode Pallas, tiny UNet")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
                        tempfile.gettempdir(), "gpu_check_out"),
                    help="output folder (default $OUT, else /tmp/gpu_check_out)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop starting work after this (default 450; dry run 300)")
    ap.add_argument("--sections", default="",
                    help=f"comma list of sections to run (default all: {','.join(SECTIONS)})")
    ap.add_argument("--autotune-budget-s", type=float, default=None,
                    help="autotune time budget (default 60; dry run 15)")
    ap.add_argument("--gemm-budget-s", type=float, default=None,
                    help="GEMM timing budget (default 50; dry run 30)")
    ap.add_argument("--gemm-repeats", type=int, default=None, help="default 7; dry run 2")
    ap.add_argument("--no-write-tuned", action="store_true",
                    help="write the tuned tiles only to $OUT/tuned, not pallas_kernels/tuned")
    ap.add_argument("--unet-config", default=str(SDXL_CONFIG))
    ap.add_argument("--unet-configs", default=",".join(UNET_CONFIGS))
    ap.add_argument("--unet-repeats", type=int, default=None, help="default 5; dry run 1")
    ap.add_argument("--unet-child-timeout-s", type=float, default=None,
                    help="cap per UNet configuration (default 200; dry run 90)")
    ap.add_argument("--unet-min-start-s", type=float, default=None,
                    help="do not start a UNet configuration with less time left "
                         "(default 40; dry run 10)")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 64; dry 8)")
    ap.add_argument("--layer-costs-budget-s", type=float, default=None,
                    help="per-layer cost table: start no layer after this (default 120; dry "
                         "run 10); a rerun with the same --out resumes the table")
    ap.add_argument("--layer-costs-margin-s", type=float, default=30.0,
                    help="per-layer cost table: leave this much of the deadline (default 30)")
    ap.add_argument("--layer-costs-latent", type=int, default=None,
                    help="per-layer cost table: latent side (default 128 = 1024px; dry 8)")
    ap.add_argument("--layer-costs-repeats", type=int, default=None,
                    help="per-layer cost table: timed calls per layer (default 5; dry run 1)")
    ap.add_argument("--selection-chunk", type=int, default=8,
                    help="candidates per batched call in the selection section (8; dry run 2)")
    ap.add_argument("--compile-cache", default=None,
                    help="persistent JAX compilation cache folder ('' = off; default "
                         "/tmp/mixdq_gpu_check_jax_cache, off in the dry run)")
    ap.add_argument("--unet-stop-after", default=None,
                    choices=("shapes", "params", "lowered", "compiled"), help=argparse.SUPPRESS)
    ap.add_argument("--unet-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.dry_run
    defaults = {
        "deadline_s": (300.0, 450.0), "autotune_budget_s": (15.0, 60.0),
        "gemm_budget_s": (30.0, 50.0), "gemm_repeats": (2, 7), "unet_repeats": (1, 5),
        "unet_child_timeout_s": (90.0, 200.0), "unet_min_start_s": (10.0, 40.0),
        "latent": (8, 64), "compile_cache": ("", "/tmp/mixdq_gpu_check_jax_cache"),
        "layer_costs_budget_s": (10.0, 120.0), "layer_costs_latent": (8, 128),
        "layer_costs_repeats": (1, 5),
    }
    for key, (d_dry, d_gpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, d_dry if dry else d_gpu)
    bad = set(args.unet_configs.split(",")) - set(UNET_CONFIGS) - {""}
    if bad:
        ap.error(f"unknown UNet configurations {sorted(bad)}; choose from {UNET_CONFIGS}")
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_jax_env(args)
    if args.unet_child:
        unet_child(args)
        return 0
    ctx = Context(args)
    log(f"mode {ctx.doc['mode']}, out {ctx.out}, deadline {args.deadline_s} s")
    ctx.write()
    import jax

    setup_jax_cache(args.compile_cache)
    ctx.on_gpu = jax.default_backend() == "gpu"
    ctx.interpret = args.dry_run or not ctx.on_gpu
    ctx.doc.update(jax_backend=jax.default_backend(), interpret=ctx.interpret)
    steps = {
        "versions": section_versions,
        "kernel_checks": section_kernel_checks,
        "autotune": section_autotune,
        "gemm_timing": section_gemm_timing,
        "unet": section_unet,
        "selection": section_selection,
        "layer_costs": section_layer_costs,
    }
    for name in SECTIONS:
        ctx.run_section(name, steps[name])
    sections = ctx.doc["sections"]
    ctx.doc["summary"]["sections"] = {n: s["status"] for n, s in sections.items()}
    unet = sections.get("unet", {}).get("result", {}).get("configs", {})
    ctx.doc["summary"]["unet_status"] = {n: e.get("status") for n, e in unet.items()}
    complete = all(s["status"] in ("ok", "skipped") for s in sections.values()) and all(
        e.get("status") == "ok" for e in unet.values()
    )
    ctx.doc["status"] = "complete" if complete else "partial"
    ctx.doc["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ctx.write()
    log(f"summary: {json.dumps(_jsonable(ctx.doc['summary']))}")
    log(f"wrote {ctx.json_path} (status {ctx.doc['status']})")
    kc_ok = ctx.doc["summary"].get("kernel_checks", {}).get("all_passed", True)
    tiles_ok = not ctx.doc["summary"].get("autotune", {}).get("mismatches")
    return 0 if complete and kc_ok and tiles_ok else 1


if __name__ == "__main__":
    sys.exit(main())
