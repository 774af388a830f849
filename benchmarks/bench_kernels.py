"""Times the quantized GEMM/conv kernels on SDXL shapes against float dots; prints JSON.

    .venv/bin/python -m benchmarks.bench_kernels [--repeats 10] [--interpret] [--out FILE]

Every entry is the median wall time (ms) of `repeats` calls of a jitted function after one
warm-up call, on whatever backend JAX has. On CPU the "pallas" entries run in interpret mode
(only with --interpret; they measure the interpreter, not a kernel) and int8 has no hardware
advantage over f32 (no VNNI on the development machine); GPU numbers must come from a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import (
    conv_weight_matrix,
    im2col,
    int8_conv2d,
    int8_matmul,
    pack_weights,
    packed_column_sums,
    quantize_activation,
    w4a8_matmul,
    weight_column_sums,
)

# (M, K, N) of SDXL UNet GEMMs at 1024px / 128x128 latents.
GEMM_SHAPES: dict[str, tuple[int, int, int]] = {
    "attn_proj_4096x640x640": (4096, 640, 640),  # down_blocks.1 attention projections
    "ff_1024x1280x5120": (1024, 1280, 5120),  # down_blocks.2 feed-forward up-projection
    "text_kv_77x2048x1280": (77, 2048, 1280),  # attn2.to_k / to_v on the text embeddings
}
# (B, H, W, Cin, Cout, kernel, stride) of SDXL convs (64x64 stage of a 512px image).
CONV_SHAPES: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "resnet_conv_64x64x320_3x3": (1, 64, 64, 320, 320, 3, 1),
}


def _median_ms(fn: Callable, args: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _time_all(entries: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, float]:
    return {op: round(_median_ms(fn, args, repeats), 3) for op, (fn, args) in entries.items()}


def _gemm_entries(m, k, n, rng, *, with_pallas: bool) -> dict[str, tuple[Callable, tuple]]:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    x_q = jnp.asarray(rng.integers(-128, 128, size=(m, k)), jnp.int8)
    w_q = jnp.asarray(rng.integers(-128, 128, size=(k, n)), jnp.int8)
    w4 = pack_weights(jnp.asarray(rng.integers(-8, 8, size=(k, n)), jnp.int8), 4)
    w_scale = jnp.full((n,), 0.01, jnp.float32)
    bias = jnp.zeros((n,), jnp.float32)
    cs8, cs4 = weight_column_sums(w_q), packed_column_sums(w4)
    epi = dict(a_scale=0.02, a_zero_point=3, w_scale=w_scale, bias=bias, out_dtype=jnp.bfloat16)

    def q8(backend):
        return jax.jit(lambda a, b, c: int8_matmul(a, b, colsum=c, backend=backend, **epi))

    def q4(backend):
        return jax.jit(lambda a, b, c: w4a8_matmul(a, b, colsum=c, backend=backend, **epi))

    entries = {
        "f32_dot": (jax.jit(jnp.dot), (x, w)),
        "bf16_dot": (jax.jit(jnp.dot), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))),
        "int8_xla": (q8("xla"), (x_q, w_q, cs8)),
        "w4a8_xla": (q4("xla"), (x_q, w4, cs4)),
        "quantize_act_xla": (
            jax.jit(lambda a: quantize_activation(a, 0.02, 3, backend="xla")),
            (x.astype(jnp.bfloat16),),
        ),
    }
    if with_pallas:
        entries["int8_pallas"] = (q8("pallas"), (x_q, w_q, cs8))
        entries["w4a8_pallas"] = (q4("pallas"), (x_q, w4, cs4))
        entries["quantize_act_pallas"] = (
            jax.jit(lambda a: quantize_activation(a, 0.02, 3, backend="pallas")),
            (x.astype(jnp.bfloat16),),
        )
    return entries


def _conv_entries(b, h, w_, cin, cout, kk, stride, rng, *, with_pallas: bool):
    pad = kk // 2
    x = jnp.asarray(rng.normal(size=(b, h, w_, cin)), jnp.float32)
    wf = jnp.asarray(rng.normal(size=(kk, kk, cin, cout)), jnp.float32)
    x_q = jnp.asarray(rng.integers(-128, 128, size=x.shape), jnp.int8)
    w_q = jnp.asarray(rng.integers(-128, 128, size=wf.shape), jnp.int8)
    epi = dict(a_scale=0.02, a_zero_point=3, w_scale=jnp.full((cout,), 0.01, jnp.float32),
               out_dtype=jnp.bfloat16, stride=stride, padding=pad)

    def float_conv(a, k_):
        return jax.lax.conv_general_dilated(
            a, k_, (stride, stride), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    entries = {
        "f32_conv": (jax.jit(float_conv), (x, wf)),
        "bf16_conv": (jax.jit(float_conv), (x.astype(jnp.bfloat16), wf.astype(jnp.bfloat16))),
        "int8_conv_xla": (jax.jit(lambda a, k_: int8_conv2d(a, k_, backend="xla", **epi)),
                          (x_q, w_q)),
        "im2col_only": (jax.jit(lambda a: im2col(a, (kk, kk), stride, pad, 3)), (x_q,)),
        "im2col_plus_int8_xla_gemm": (
            jax.jit(lambda a, k_: int8_matmul(
                im2col(a, (kk, kk), stride, pad, 3), conv_weight_matrix(k_), backend="xla",
                **{k: v for k, v in epi.items() if k not in ("stride", "padding")})),
            (x_q, w_q),
        ),
    }
    if with_pallas:
        entries["int8_conv_pallas_im2col"] = (
            jax.jit(lambda a, k_: int8_conv2d(a, k_, backend="pallas", **epi)), (x_q, w_q))
    return entries


def run_kernel_bench(
    *,
    repeats: int = 10,
    include_interpret: bool = False,
    gemm_shapes: dict[str, tuple[int, int, int]] | None = None,
    conv_shapes: dict[str, tuple[int, int, int, int, int, int, int]] | None = None,
    seed: int = 0,
) -> dict:
    """Median ms per op and shape. Pallas entries run on GPU, or on CPU in interpret mode
    when `include_interpret` (slow; a correctness path, not a speed claim)."""
    on_gpu = jax.default_backend() == "gpu"
    with_pallas = on_gpu or include_interpret
    rng = np.random.default_rng(seed)
    result: dict = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "repeats": repeats,
        "pallas_mode": "triton" if on_gpu else ("interpret" if include_interpret else "skipped"),
        "gemm": {},
        "conv": {},
    }
    for name, (m, k, n) in (GEMM_SHAPES if gemm_shapes is None else gemm_shapes).items():
        entries = _gemm_entries(m, k, n, rng, with_pallas=with_pallas)
        timings = _time_all(entries, repeats)
        gemm_ops = {op: t for op, t in timings.items() if not op.startswith("quantize")}
        result["gemm"][name] = {
            "mkn": [m, k, n],
            "ms": timings,
            "tops": {op: round(2 * m * k * n / (t * 1e-3) / 1e12, 4) for op, t in gemm_ops.items()},
        }
    for name, shape in (CONV_SHAPES if conv_shapes is None else conv_shapes).items():
        entries = _conv_entries(*shape, rng, with_pallas=with_pallas)
        result["conv"][name] = {
            "shape_bhwcokc": list(shape),
            "ms": _time_all(entries, repeats),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--interpret", action="store_true",
                        help="on CPU, also time the Pallas kernels in interpret mode")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = run_kernel_bench(repeats=args.repeats, include_interpret=args.interpret)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
