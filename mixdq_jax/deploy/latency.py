"""Latency on whatever backend JAX has: SDXL GEMM/conv shapes and a whole UNet forward.

Kernel entries are the median wall time (ms) of `repeats` calls of a jitted function after one
warm-up call. On CPU the "pallas" entries run only with ``include_interpret`` (they measure the
interpreter, not a kernel) and int8 has no hardware advantage over f32 (no VNNI on the
development machine); GPU speedups must be measured on a GPU with the same command
(``mixdq bench kernels``).

The UNet entry times one jitted forward of a UNet architecture with random weights: FP (the
float dtype), W8A8 and W4A8 (symmetric weights, every Dense/Conv on the integer path). Packed
params are drawn directly as random int8 codes / scales of the packed shapes
(`packed.packed_shapes`), so no float model is materialised for the quantized runs; random
values change no timing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

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
    epi = dict(
        a_scale=0.02,
        a_zero_point=3,
        w_scale=jnp.full((cout,), 0.01, jnp.float32),
        out_dtype=jnp.bfloat16,
        stride=stride,
        padding=pad,
    )

    def float_conv(a, k_):
        return jax.lax.conv_general_dilated(
            a,
            k_,
            (stride, stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    entries = {
        "f32_conv": (jax.jit(float_conv), (x, wf)),
        "bf16_conv": (jax.jit(float_conv), (x.astype(jnp.bfloat16), wf.astype(jnp.bfloat16))),
        "int8_conv_xla": (
            jax.jit(lambda a, k_: int8_conv2d(a, k_, backend="xla", **epi)),
            (x_q, w_q),
        ),
        "im2col_only": (jax.jit(lambda a: im2col(a, (kk, kk), stride, pad, 3)), (x_q,)),
        "im2col_plus_int8_xla_gemm": (
            jax.jit(
                lambda a, k_: int8_matmul(
                    im2col(a, (kk, kk), stride, pad, 3),
                    conv_weight_matrix(k_),
                    backend="xla",
                    **{k: v for k, v in epi.items() if k not in ("stride", "padding")},
                )
            ),
            (x_q, w_q),
        ),
    }
    if with_pallas:
        entries["int8_conv_pallas_im2col"] = (
            jax.jit(lambda a, k_: int8_conv2d(a, k_, backend="pallas", **epi)),
            (x_q, w_q),
        )
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


# A reduced SDXL-shaped UNet for CPU timing (the full SDXL UNet needs ~10 GB in f32): SDXL's
# block types, channels and text width; one resnet and one transformer layer per block level
# (436M params).
SDXL_MINI_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 1],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "cross_attention_dim": 2048,
}


def _random_like(tree: Any, seed: int) -> Any:
    """Random arrays of the abstract tree's shapes: int8 codes, e4m3 codes, positive small
    scales, smoothing factors near 1 (no overflow or subnormals to slow a CPU down)."""
    leaves, treedef = jax.tree.flatten_with_path(tree)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        key = str(getattr(path[-1], "key", path[-1]))
        dtype = jnp.dtype(leaf.dtype)
        if jnp.issubdtype(dtype, jnp.integer):
            hi = 8 if key == "a_zp" else 127
            arr = rng.integers(-hi, hi, size=leaf.shape, dtype=np.int32)
        elif dtype.itemsize == 1:  # fp8 codes
            arr = rng.uniform(-16.0, 16.0, size=leaf.shape)
        elif key in ("w_scale", "a_scale"):
            arr = rng.uniform(1e-3, 2e-2, size=leaf.shape)
        elif key == "smooth":
            arr = rng.uniform(0.5, 2.0, size=leaf.shape)
        else:
            arr = rng.normal(0.0, 0.02, size=leaf.shape)
        out.append(jnp.asarray(arr, dtype))
    return jax.tree.unflatten(treedef, out)


def unet_latency(
    unet_config: Any = None,
    *,
    latent: int = 32,
    float_dtype: Any = None,
    repeats: int = 3,
    configs: tuple[str, ...] = ("fp", "w8a8", "w4a8"),
    backend: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Median ms of one jitted UNet forward (batch 1, ``latent`` x ``latent``) per config."""
    from mixdq_jax.deploy.memory import plan_for_spec, tree_nbytes  # noqa: PLC0415
    from mixdq_jax.deploy.packed import packed_shapes  # noqa: PLC0415
    from mixdq_jax.models.unet import (  # noqa: PLC0415
        UNet2DConditionModel,
        UNetConfig,
        example_inputs,
        param_shapes,
    )
    from mixdq_jax.quant.qconfig import QuantSpec  # noqa: PLC0415

    if unet_config is None:
        unet_config = SDXL_MINI_UNET
    config = (
        unet_config
        if isinstance(unet_config, UNetConfig)
        else UNetConfig.from_dict(unet_config)
        if isinstance(unet_config, dict)
        else UNetConfig.from_json(unet_config)
    )
    if float_dtype is None:
        float_dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.float16
    float_dtype = jnp.dtype(float_dtype)
    model = UNet2DConditionModel(config=config, dtype=float_dtype, param_dtype=float_dtype)
    float_shapes = param_shapes(model)
    inputs = jax.tree.map(
        lambda a: jnp.asarray(np.random.default_rng(seed).normal(size=a.shape), float_dtype),
        example_inputs(config, batch=1, height=latent, width=latent),
    )
    bits = {"w8a8": 8, "w4a8": 4}
    result: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "float_dtype": float_dtype.name,
        "latent": [latent, latent],
        "repeats": repeats,
        "ms": {},
        "param_bytes": {},
    }
    for name in configs:
        if name == "fp":
            plan, params = None, _random_like(float_shapes, seed)
        else:
            spec = QuantSpec(weight_bits=bits[name], act_bits=8, symmetric_weights=True)
            plan, act = plan_for_spec(config, spec, float_shapes)
            shapes = packed_shapes(
                float_shapes,
                plan,
                act,
                float_dtype=float_dtype,
                bos_dim=config.per_block("cross_attention_dim")[0],
            )
            params = _random_like(shapes, seed)

        result["param_bytes"][name] = tree_nbytes(params)
        ms = forward_ms(model, plan, params, inputs, repeats=repeats, backend=backend)
        result["ms"][name] = round(ms, 2)
        del params
    fp = result["ms"].get("fp")
    if fp:
        result["speedup_vs_fp"] = {k: round(fp / v, 3) for k, v in result["ms"].items()}
    return result


def forward_ms(
    model: Any, plan: Any, params: Any, inputs: dict, *, repeats: int, backend: str = "auto"
) -> float:
    """Median ms of one jitted UNet forward of ``model`` on ``params``: the float model for
    ``plan=None`` (or an empty plan), else every planned layer on its packed params."""
    from mixdq_jax.deploy.layers import Deployed  # noqa: PLC0415
    from mixdq_jax.quant import Float, forward  # noqa: PLC0415
    from mixdq_jax.quant.forward import unet_arguments  # noqa: PLC0415

    mode = Float() if plan is None or not plan.layers else Deployed(plan=plan, backend=backend)

    def run(p, kw):
        return forward(model, p, None, *unet_arguments(kw), mode=mode)

    return _median_ms(jax.jit(run), (params, inputs), repeats)
