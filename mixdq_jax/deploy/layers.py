"""Run the UNet on packed params: every planned Dense/Conv goes through the integer path.

:class:`Deployed` is a mode of the one interceptor (`mixdq_jax.quant.intercept`): it replaces
the calls of planned layers, so the model code is reused unchanged with the packed params tree
(`packed.pack_unet_params`). Per layer mode (`packed.LayerPlan.mode`):

- ``int``: activation -> int8 codes (`pallas_kernels.quantize_activation`), int8 x int8 GEMM
  (`int8_matmul`, `w4a8_matmul` for int4/int2 storage; convs through `int8_conv2d`) with the
  fused scale / zero-point / bias epilogue; a shortcut-split conv runs one GEMM per input half
  and adds them. Asymmetric weights add ``- a_s w_s[n] w_zp[n] (rowsum(x_q) - K a_zp)``, the
  exact integer correction for the weight zero point, after the kernel.
- ``weight_only`` (A16): weights dequantized to float at run time, the layer's own Flax op.
- ``act_only`` (W16): quantize-dequantize the input, float weights.

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

from mixdq_jax.deploy.packed import DeployPlan, LayerPlan, dequantize_weight
from mixdq_jax.quant.intercept import LayerCall, Mode, Records
from pallas_kernels import (
    dequantize_activation,
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


def _conv_geometry(module: nn.Conv, lp: LayerPlan) -> tuple[int, int]:
    """(stride, padding) of a conv the int8 kernels support (square, symmetric padding)."""
    strides = module.strides or 1
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    pad = module.padding
    if isinstance(pad, str):
        if pad.upper() != "VALID":
            raise ValueError(f"layer {lp.name!r}: padding {pad!r} is not supported")
        pad = ((0, 0), (0, 0))
    elif isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    pads = {int(p) for pair in pad for p in (pair if isinstance(pair, tuple | list) else (pair,))}
    dil = module.kernel_dilation or 1
    if (
        len(set(strides)) != 1
        or len(pads) != 1
        or module.feature_group_count != 1
        or (dil if isinstance(dil, int) else max(dil)) != 1
        or (module.input_dilation or 1) not in (1, (1, 1))
    ):
        raise ValueError(
            f"layer {lp.name!r}: only square strides, symmetric padding, no dilation or groups"
        )
    return strides[0], pads.pop()


def _int_part(
    module: nn.Module, lp: LayerPlan, q: dict, x: Array, bias: Array | None, backend: str
) -> Array:
    """One input part through the integer path; f32 output (bias included if given)."""
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
    stride, pad = _conv_geometry(module, lp)
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
        codes = quantize_activation(xi, q["a_scale"], q["a_zp"], bits=lp.a_bits, backend="xla")
        parts.append(dequantize_activation(codes, q["a_scale"], q["a_zp"]).astype(x.dtype))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _with_bos_row(y: Array, x: Array, p: dict) -> Array:
    """Token 0's output row from the stored float ``bos_row`` where token 0 is BOS."""
    x0 = x[..., 0, :].astype(jnp.float32)
    ref = p["bos_in"]
    tol = _BOS_RTOL * jnp.max(jnp.abs(ref)) + 1e-6
    is_bos = jnp.all(jnp.abs(x0 - ref) <= tol, axis=-1, keepdims=True)
    row0 = jnp.where(is_bos, p["bos_row"].astype(y.dtype), y[..., 0, :])
    return jnp.concatenate([row0[..., None, :], y[..., 1:, :]], axis=-2)


def run_layer(module: nn.Module, lp: LayerPlan, p: dict, x: Array, backend: str = "auto"):
    """The real quantized call of one planned Dense/Conv on its packed params ``p``."""
    out_dtype = jnp.dtype(module.dtype or x.dtype)
    params = {"bias": p["bias"]} if "bias" in p else {}
    if lp.mode == "act_only":
        params["kernel"] = p["kernel"]
        y = _float_apply(module, params, _fake_act(x, lp, p))
        if lp.bos:  # as the fake path: token 0 through the float layer
            y0 = _float_apply(module, params, x[..., :1, :])
            y = jnp.concatenate([y0, y[..., 1:, :]], axis=-2)
        return y
    if lp.mode == "weight_only":
        kernels = [dequantize_weight(p[f"q{j}"], lp, part) for j, part in enumerate(lp.parts())]
        kernel = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=-2)
        params["kernel"] = kernel.astype(module.param_dtype)
        y = _float_apply(module, params, x)
    else:
        y = None
        for j, xi in enumerate(_split(x, lp)):
            yj = _int_part(module, lp, p[f"q{j}"], xi, p.get("bias") if j == 0 else None, backend)
            y = yj if y is None else y + yj
        y = y.astype(out_dtype)
    if lp.bos:
        y = _with_bos_row(y, x, p)
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
        if "kernel" in p and lp.mode != "act_only":
            raise ValueError(
                f"layer {call.name!r} holds a float kernel: the params are not packed for this "
                "plan (use mixdq_jax.deploy.pack_unet_params)"
            )
        return run_layer(call.module, lp, p, call.x, self.backend)
