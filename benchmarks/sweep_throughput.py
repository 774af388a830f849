"""Sensitivity-sweep throughput: traced bit-widths under ``vmap`` vs recompiling per config.

Three ways to evaluate single-layer configurations (the SQNR metric of the sweep, on the
stored float UNet inputs of a small calibration run):

- ``traced_vmap``: the sweep's own path. Bits are data: one program, compiled once, evaluates a
  chunk of stacked configurations with ``jax.vmap`` (sharded over every device).
- ``traced_loop``: the same traced-bits program without ``vmap``, one configuration per call.
- ``static``: bits held as static Python values, as qwix and AQT hold them: each configuration
  closes over its bits as Python ints, so each one is a new trace and compile (the program
  quantizes only that one layer, the cheapest possible per-configuration program).

Reported as configurations per second (steady state, and including compile time over a whole
sweep of ``layers x bits x {weight, act}`` configurations) and their ratios. Runs on the
testbed model when it is built, otherwise on a tiny random SDXL (built with diffusers, so the
test extras must be installed). Prints one JSON object.

    .venv/bin/python benchmarks/sweep_throughput.py --traced 64 --static 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixdq_jax.api import load_pipeline  # noqa: E402
from mixdq_jax.calibrate import CalibConfig, calibrate, default_prompts  # noqa: E402
from mixdq_jax.cli.calibrate import native_size  # noqa: E402
from mixdq_jax.quant import QuantSpec  # noqa: E402
from mixdq_jax.quant.registry import unet_layers  # noqa: E402
from mixdq_jax.sensitivity import (  # noqa: E402
    Evaluator,
    base_qconfig,
    load_calibration,
    single_layer_qconfigs,
)


def _model(work: Path) -> tuple[str, str]:
    """(path, name): the testbed when it is built, else a tiny random SDXL."""
    try:
        from mixdq_jax.testbed.evaluate import testbed_path  # noqa: PLC0415

        return str(testbed_path()), "testbed"
    except (ImportError, FileNotFoundError):
        from tests.tiny_models import build_sdxl  # noqa: PLC0415

        return str(build_sdxl(work / "tiny_sdxl")), "tiny random SDXL (tests/tiny_models.py)"


def _block(x):
    return jax.block_until_ready(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--traced", type=int, default=64, help="configurations for the traced paths")
    p.add_argument("--static", type=int, default=3, help="configurations for the static path")
    p.add_argument("--chunk", type=int, default=8, help="vmap chunk (configurations per call)")
    p.add_argument("--kind", choices=["weight", "act"], default="weight")
    p.add_argument("--prompts", type=int, default=4, help="calibration prompts (one batch)")
    p.add_argument("--no-loop", action="store_true", help="skip the traced_loop measurement")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path, model_name = _model(work)
        pipe = load_pipeline(path)
        h, w = native_size(pipe)
        if model_name == "testbed":
            from mixdq_jax.testbed import data  # noqa: PLC0415

            h = w = data.SIZE
        prompts = tuple(default_prompts(args.prompts))
        t = time.perf_counter()
        calibrate(
            pipe,
            CalibConfig(prompts=prompts, height=h, width=w, batch_size=len(prompts)),
            work / "run",
        )
        calib_s = time.perf_counter() - t
        calib = load_calibration(work / "run", pipe)
        layers = [layer.name for layer in unet_layers(pipe.unet.config)]
        base = base_qconfig(pipe, QuantSpec(), calib.ranges)
        evaluator = Evaluator(pipe, calib)
        chunk = -(-args.chunk // evaluator.size) * evaluator.size
        tasks = [(n, b) for n in layers for b in (2, 4, 8)]
        full_sweep = 2 * len(tasks)  # weights and activations
        n_traced = max(chunk, args.traced // chunk * chunk)
        todo = tasks[:n_traced]

        # traced bits under vmap: first chunk = trace + compile + run, then steady state
        chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
        t = time.perf_counter()
        evaluator.evaluate("sqnr", args.kind, single_layer_qconfigs(base, args.kind, chunks[0]))
        vmap_first = time.perf_counter() - t
        t = time.perf_counter()
        for part in chunks[1:]:
            evaluator.evaluate("sqnr", args.kind, single_layer_qconfigs(base, args.kind, part))
        vmap_steady = (time.perf_counter() - t) / max(1, len(todo) - chunk)
        if len(chunks) == 1:  # too few to separate: time the first chunk again
            t = time.perf_counter()
            evaluator.evaluate("sqnr", args.kind, single_layer_qconfigs(base, args.kind, todo))
            vmap_steady = (time.perf_counter() - t) / chunk

        batch = calib.batches[0]
        emb = (batch.context, batch.pooled)
        params = evaluator.params

        def one_config(name: str, bits: int):
            qc = single_layer_qconfigs(base, args.kind, [(name, bits)])
            return jax.tree.map(lambda x: x[0], qc)

        # traced bits, no vmap: one program, one configuration per call
        loop = None
        if not args.no_loop:
            fn = jax.jit(evaluator._sqnr_one)
            t = time.perf_counter()
            _block(fn(params, one_config(*todo[0]), batch.inputs, batch.outputs, emb))
            loop_first = time.perf_counter() - t
            t = time.perf_counter()
            for name, bits in todo[1:]:
                _block(fn(params, one_config(name, bits), batch.inputs, batch.outputs, emb))
            loop_steady = (time.perf_counter() - t) / max(1, len(todo) - 1)
            loop = {"first_call_s": loop_first, "steady_s_per_config": loop_steady}

        # static bits (qwix/AQT style): a new trace + compile for every configuration
        static_times = []
        for name, bits in tasks[: args.static]:
            sub = base_qconfig(pipe, QuantSpec(), calib.ranges, [name])
            attr = "w_bits" if args.kind == "weight" else "a_bits"
            const = sub.with_bits(**{attr: {name: bits}})
            # Python scalars (ranges: numpy constants), closed over by the traced function
            const = jax.tree.map(
                lambda x: np.asarray(x).item() if np.size(x) == 1 else np.asarray(x), const
            )

            def static_fn(prm, inputs, outputs, e, qc=const):
                return evaluator._sqnr_one(prm, qc, inputs, outputs, e)

            t = time.perf_counter()
            _block(jax.jit(static_fn)(params, batch.inputs, batch.outputs, emb))
            static_times.append(time.perf_counter() - t)
        static_per = float(np.mean(static_times))

    compile_total = vmap_first - chunk * vmap_steady
    result = {
        "benchmark": "sweep_throughput",
        "model": model_name,
        "unet_layers": len(layers),
        "kind": args.kind,
        "metric": "sqnr",
        "calibration": {
            "prompts": len(prompts),
            "steps": calib.steps,
            "image": [h, w],
            "seconds": calib_s,
        },
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "traced_vmap": {
            "chunk": chunk,
            "configs": len(todo),
            "first_chunk_s": vmap_first,
            "compile_s_est": compile_total,
            "steady_s_per_config": vmap_steady,
            "configs_per_s": 1.0 / vmap_steady,
        },
        "traced_loop": None
        if loop is None
        else {**loop, "configs_per_s": 1.0 / loop["steady_s_per_config"]},
        "static_recompile": {
            "configs": len(static_times),
            "s_per_config": static_per,
            "each_s": static_times,
            "configs_per_s": 1.0 / static_per,
        },
        "ratio_traced_vmap_over_static": static_per / vmap_steady,
        "full_sweep": {
            "configs": full_sweep,
            "traced_vmap_s_est": compile_total + full_sweep * vmap_steady,
            "static_s_est": full_sweep * static_per,
            "ratio": full_sweep * static_per / (compile_total + full_sweep * vmap_steady),
        },
    }
    if loop is not None:
        result["ratio_traced_loop_over_static"] = static_per / loop["steady_s_per_config"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
