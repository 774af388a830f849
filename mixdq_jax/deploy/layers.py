"""Run the UNet on packed params: every planned Dense/Conv goes through the integer path.

:class:`Deployed` is a mode of the one interceptor (`mixdq_jax.quant.intercept`): it replaces
the calls of planned layers, so the model code is reused unchanged with the packed params tree
(`packed.pack_unet_params`). Per layer mode (`packed.LayerPlan.mode`):

- ``int``: activation -> int8 codes (`pallas_kernels.quantize_activation`), int8 x int8 GEMM
  (`int8_matmul`, `w4a8_matmul` for int4/int2 storage; convs through `int8_conv2d`) with the
  fused scale / zero-point / bias epilogue; a shortcut-split conv runs one GEMM per input half
  and adds them. Asymmetric weights add ``- a_s w_s[n] w_zp[n] (rowsum(x_q) - K a_zp)``, the
  exact integer correction for the weight zero point, after the kernel.
- ``int`` with ``LayerPlan.fp8``: the input rounded to e4m3 with its stored scale, an fp8 x fp8
  ``dot_general`` accumulating in f32 (convs through `pallas_kernels.im2col` of the codes),
  times ``a_scale * w_scale``, plus the bias; one GEMM per input part as above.
- ``weight_only`` (A16): weights dequantized to float at run time, the layer's own Flax op.
- ``act_only`` (W16): quantize-dequantize the input, float weights.

Grouped layers (SVDQuant's format, `grouped`): ``x / smooth``, per-token group codes, and
for int4 weights with activations of at most 4 bits the W4A4 GEMM (`grouped.grouped_matmul`:
`pallas_kernels.w4a4_matmul` on the Pallas backend, one dequantized XLA dot elsewhere) with
the low-rank branch ``(x / smooth) down`` (a conv for a conv layer) fused as ``lr_x @ up``;
convs go through im2col of the codes (each kernel position's channels padded to whole
groups). Other bit combinations dequantize the weights and quantize-dequantize the input
through the layer's own Flax op, plus the branch.

A branch (``down``/``up``: the exported SVD branch and/or runtime LoRA, `mixdq_jax.deploy.lora`)
is added to any layer's output, whatever its mode, as ``((x / smooth) down * branch_scale) up``
(no ``smooth``: ``x``; no ``branch_scale``: 1), before the BOS row is taken; a BOS row adds the
branch's runtime-LoRA columns to the stored float row.

BOS-aware layers (``attn2.to_k/to_v``): the output row of token 0 is the stored float
``bos_row`` whenever the input's token 0 is the stored BOS embedding (always so for CLIP
contexts); another token 0 (e.g. an all-zero negative context) takes the quantized path,
which is exact for zeros.

``backend``: as in `pallas_kernels` (``auto`` = Pallas Triton on GPU, XLA int8 dot elsewhere).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixdq_jax.deploy import grouped
from mixdq_jax.deploy.packed import DeployPlan, LayerPlan, dequantize_weight
from mixdq_jax.quant.intercept import LayerCall, Mode, Records
from mixdq_jax.quant.modes import conv_geometry
from pallas_kernels import (
    conv_weight_matrix,
    dequantize_activation,
    grid,
    im2col,
    int8_conv2d,
    int8_matmul,
    quantize_activation,
    w4a8_matmul,
)

Array = jax.Array
_BOS_RTOL = 1e-2  # token 0 "is" the BOS embedding within this fraction of its largest entry


def _float_apply(module: nn.Module, params: dict, x: Array) -> Array:
    return module.clone(parent=None).apply({"params": params}, x)


def _split(x: Array, lp: LayerPlan) -> list[Array]:
    return [x[..., a:b] for a, b in lp.parts()]


def _int_part(
    module: nn.Module, lp: LayerPlan, q: dict, x: Array, bias: Array | None, backend: str
) -> Array:
    """One input part through the integer path; f32 output (bias included if given)."""
    if lp.fp8:
        return _fp8_part(module, lp, q, x, bias)
    xq = quantize_activation(x, q["a_scale"], q["a_zp"], bits=lp.a_bits, backend=backend)
    kw = dict(
        a_scale=q["a_scale"],
        a_zero_point=q["a_zp"],
        w_scale=q["w_scale"],
        colsum=q["colsum"],
        bias=None if bias is None else bias.astype(jnp.float32),
        out_dtype=jnp.float32,
        backend=backend,
    )
    if lp.kind == "linear":
        if lp.storage_bits == 8:
            y = int8_matmul(xq, q["w"], **kw)
        else:
            y = w4a8_matmul(xq, q["w"], bits=lp.storage_bits, **kw)
        if "w_zp" in q:
            rowsum = jnp.sum(xq.astype(jnp.int32), axis=-1, keepdims=True)
            y = _zp_correction(y, q, rowsum, x.shape[-1])
        return y
    stride, pad = conv_geometry(module, lp.name)
    kh, kw_ = lp.weight_shape[:2]
    y = int8_conv2d(
        xq,
        q["w"],
        kernel_size=(kh, kw_),
        stride=stride,
        padding=pad,
        weight_bits=lp.storage_bits,
        **kw,
    )
    if "w_zp" in q:
        # sum of the im2col row = box sum of the channel sums; padding carries a_zp per channel
        c = x.shape[-1]
        s = jnp.sum(xq.astype(jnp.int32), axis=-1)
        s = jnp.pad(
            s,
            ((0, 0), (pad, pad), (pad, pad)),
            constant_values=q["a_zp"].astype(jnp.int32) * c,
        )
        rowsum = jax.lax.reduce_window(
            s, jnp.int32(0), jax.lax.add, (1, kh, kw_), (1, stride, stride), "VALID"
        )[..., None]
        y = _zp_correction(y, q, rowsum, kh * kw_ * c)
    return y


def _fp8_part(module: nn.Module, lp: LayerPlan, q: dict, x: Array, bias: Array | None) -> Array:
    """One input part through the FP8 GEMM: e4m3 codes of ``x / a_scale`` times the stored
    e4m3 weights, summed in f32 (no zero points: the e4m3 grid is symmetric); f32 output."""
    xq = grid.fp8_round(x, q["a_scale"]).astype(jnp.float8_e4m3fn)  # exact: already on e4m3
    w = q["w"]
    if lp.kind == "conv":
        stride, pad = conv_geometry(module, lp.name)
        xq = im2col(xq, tuple(lp.weight_shape[:2]), stride, pad, 0.0)
        w = conv_weight_matrix(w)
    y = jax.lax.dot_general(
        xq, w, (((xq.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    y = y * (q["a_scale"] * q["w_scale"])
    return y if bias is None else y + bias.astype(jnp.float32)


def _zp_correction(y: Array, q: dict, rowsum: Array, k: int) -> Array:
    """Subtract ``a_s w_s w_zp (rowsum - K a_zp)``: the weight zero point's share, exactly
    computed in int32 and applied in f32."""
    corr = (rowsum - jnp.int32(k) * q["a_zp"].astype(jnp.int32)).astype(jnp.float32)
    coef = q["a_scale"] * q["w_scale"] * q["w_zp"].astype(jnp.float32)
    return y - corr * coef


def _fake_act(x: Array, lp: LayerPlan, p: dict) -> Array:
    """Quantize-dequantize each input part with its stored scale / zero point."""
    parts = []
    for j, xi in enumerate(_split(x, lp)):
        q = p[f"q{j}"]
        if lp.fp8:
            parts.append((grid.fp8_round(xi, q["a_scale"]) * q["a_scale"]).astype(x.dtype))
            continue
        codes = quantize_activation(xi, q["a_scale"], q["a_zp"], bits=lp.a_bits, backend="xla")
        parts.append(dequantize_activation(codes, q["a_scale"], q["a_zp"]).astype(x.dtype))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _with_bos_row(y: Array, x: Array, p: dict, module: nn.Module, lp: LayerPlan) -> Array:
    """Token 0's output row from the stored float ``bos_row`` where token 0 is BOS (plus the
    runtime-LoRA columns of the branch: the exported SVD columns are in ``bos_row``)."""
    x0 = x[..., 0, :].astype(jnp.float32)
    ref = p["bos_in"]
    tol = _BOS_RTOL * jnp.max(jnp.abs(ref)) + 1e-6
    is_bos = jnp.all(jnp.abs(x0 - ref) <= tol, axis=-1, keepdims=True)
    bos_row = p["bos_row"].astype(jnp.float32)
    extra = grouped.branch_output(module, p, x[..., :1, :], skip=lp.rank)
    if extra is not None:
        bos_row = bos_row + extra[..., 0, :]
    row0 = jnp.where(is_bos, bos_row.astype(y.dtype), y[..., 0, :])
    return jnp.concatenate([row0[..., None, :], y[..., 1:, :]], axis=-2)


def _plus_branch(y: Array, module: nn.Module, p: dict, x: Array) -> Array:
    """``y`` plus the layer's branch (none: ``y``), summed in f32."""
    b = grouped.branch_output(module, p, x)
    return y if b is None else (y.astype(jnp.float32) + b).astype(y.dtype)


def _run_grouped(
    module: nn.Module, lp: LayerPlan, p: dict, x: Array, out_dtype: Any, backend: str
) -> Array:
    """A grouped layer's output before the BOS row (branch included)."""
    xs = grouped.smoothed_input(x, p)
    bias = p.get("bias")
    if lp.mode in ("act_only", "float"):  # float (smoothed) kernel
        xin = xs if lp.mode == "float" else grid.group_fake_quant(xs, lp.a_bits, lp.group)
        params = {"kernel": p["kernel"], **({"bias": bias} if bias is not None else {})}
        y = _float_apply(module, params, xin)
        if lp.bos and lp.mode == "act_only":  # as the fake path: token 0 in float
            y0 = _float_apply(module, params, xs[..., :1, :])
            y = jnp.concatenate([y0, y[..., 1:, :]], axis=-2)
        return _plus_branch(y, module, p, x)
    q = p["q0"]
    if lp.mode == "int" and lp.storage_bits == 4 and lp.a_bits <= 4:
        return _grouped_gemm(module, lp, p, xs, x, out_dtype, backend)
    kernel = grouped.dequantized_kernel(
        q["w"], q["w_scale"], lp.weight_shape, lp.storage_bits, lp.group
    )
    xin = xs if lp.mode == "weight_only" else grid.group_fake_quant(xs, lp.a_bits, lp.group)
    params = {"kernel": kernel.astype(module.param_dtype)}
    if bias is not None:
        params["bias"] = bias
    return _plus_branch(_float_apply(module, params, xin), module, p, x)


def _grouped_gemm(
    module: nn.Module, lp: LayerPlan, p: dict, xs: Array, x: Array, out_dtype: Any, backend: str
) -> Array:
    """The integer route: group codes per token (im2col of them for a conv), the W4A4 GEMM
    with the branch fused as ``lr_x @ up``."""
    q = p["q0"]
    xq, x_scale = grouped.group_act_codes(xs, lp.a_bits, lp.group)
    if lp.kind == "conv":
        stride, pad = conv_geometry(module, lp.name)
        xq, x_scale = grouped.conv_patches(xq, x_scale, lp.weight_shape[:2], stride, pad)
    lead = xq.shape[:-1]  # tokens: (..., T) for a Dense, (B, Ho, Wo) for a conv
    xq, x_scale = xq.reshape(-1, xq.shape[-1]), x_scale.reshape(-1, x_scale.shape[-1])
    low = grouped.branch_columns(module, p, x)
    lr_x = None if low is None else low.reshape(-1, low.shape[-1])
    y = grouped.grouped_matmul(
        xq, x_scale, q["w"], q["w_scale"], group=lp.group, storage_bits=lp.storage_bits,
        # the branch in the model's compute dtype, as the fake quantizer runs it (the kernel
        # casts lr_x to lr_up's dtype)
        lr_x=lr_x, lr_up=None if low is None else p["up"].astype(x.dtype), bias=p.get("bias"),
        out_dtype=jnp.float32, backend=backend,
    )  # fmt: skip
    return y.reshape(*lead, y.shape[-1]).astype(out_dtype)


def run_layer(module: nn.Module, lp: LayerPlan, p: dict, x: Array, backend: str = "auto"):
    """The real quantized call of one planned Dense/Conv on its packed params ``p``."""
    out_dtype = jnp.dtype(module.dtype or x.dtype)
    if lp.group is not None:
        y = _run_grouped(module, lp, p, x, out_dtype, backend)
        if lp.bos and lp.mode not in ("act_only", "float"):
            y = _with_bos_row(y, x, p, module, lp)
        return y
    params = {"bias": p["bias"]} if "bias" in p else {}
    if lp.mode in ("act_only", "float"):
        params["kernel"] = p["kernel"]
        xin = x if lp.mode == "float" else _fake_act(x, lp, p)
        y = _float_apply(module, params, xin)
        if lp.bos and lp.mode == "act_only":  # as the fake path: token 0 through the float layer
            y0 = _float_apply(module, params, x[..., :1, :])
            y = jnp.concatenate([y0, y[..., 1:, :]], axis=-2)
        return _plus_branch(y, module, p, x)
    if lp.mode == "weight_only":
        kernels = [dequantize_weight(p[f"q{j}"], lp, part) for j, part in enumerate(lp.parts())]
        kernel = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=-2)
        params["kernel"] = kernel.astype(module.param_dtype)
        y = _plus_branch(_float_apply(module, params, x), module, p, x)
    else:
        y = None
        for j, xi in enumerate(_split(x, lp)):
            yj = _int_part(module, lp, p[f"q{j}"], xi, p.get("bias") if j == 0 else None, backend)
            y = yj if y is None else y + yj
        b = grouped.branch_output(module, p, x)
        y = (y if b is None else y + b).astype(out_dtype)
    if lp.bos:
        y = _with_bos_row(y, x, p, module, lp)
    return y


@dataclass(frozen=True, kw_only=True)
class Deployed(Mode):
    """The deployed integer path: every layer of ``plan`` runs on its packed params (the
    ``qconfig`` argument is unused: the configuration is frozen into the params)."""

    plan: DeployPlan
    backend: str = "auto"

    def layers(self, qconfig: Any) -> Collection[str]:
        return self.plan.layers

    def handle(self, call: LayerCall, qconfig: Any, records: Records) -> Array:
        lp = self.plan.layers[call.name]
        p = call.params
        if "kernel" in p and lp.mode not in ("act_only", "float"):
            raise ValueError(
                f"layer {call.name!r} holds a float kernel: the params are not packed for this "
                "plan (use mixdq_jax.deploy.pack_unet_params)"
            )
        return run_layer(call.module, lp, p, call.x, self.backend)
