"""BOS-token outlier and what BOS-aware quantization buys, on the built-in testbed.

1. Max |activation| of token 0 (BOS) versus all other tokens, per text encoder (penultimate
   states, what SDXL feeds the UNet) and at the UNet's cross-attention input.
2. For every ``attn2.to_k`` / ``attn2.to_v``: the relative output error of quantizing its input
   (the text context) per tensor at A8 and A4, with the range calibrated on the calibration
   captions including token 0 (plain) or excluding it with the BOS row kept in float
   (BOS-aware, MixDQ Sec. 3.1), measured on held-out test captions. Weights stay float.

    .venv/bin/python benchmarks/testbed_bos.py [--num 64]
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from mixdq_jax.api import load_pipeline
from mixdq_jax.quant.quantizers import quantize_activation
from mixdq_jax.testbed import calibration_captions, data
from mixdq_jax.testbed.evaluate import bos_outlier


def _lookup(params, name):
    from mixdq_jax.quant.registry import _lookup as lookup  # noqa: PLC0415

    return lookup(params, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=64)
    args = ap.parse_args()
    pipe = load_pipeline("testbed")
    calib = calibration_captions(32)
    test = list(data.sample_scenes(args.num, seed=2024, split="test").captions)
    report = {"outlier": bos_outlier(pipe, test)}
    ctx_cal = np.asarray(pipe.encode_prompt(pipe.tokenize(calib))[0])
    ctx_test = jnp.asarray(pipe.encode_prompt(pipe.tokenize(test))[0])
    rows = {}
    names = [n for n in _names(pipe) if n.endswith(("attn2.to_k", "attn2.to_v"))]
    for bits in (8, 4):
        plain_err, bos_err = [], []
        for name in names:
            p = _lookup(pipe.params["unet"], name)
            w = p["kernel"]
            ref = ctx_test @ w
            lo_all, hi_all = min(ctx_cal.min(), 0.0), max(ctx_cal.max(), 0.0)
            lo_rest, hi_rest = min(ctx_cal[:, 1:].min(), 0.0), max(ctx_cal[:, 1:].max(), 0.0)
            q_plain = quantize_activation(ctx_test, jnp.int32(bits), lo_all, hi_all) @ w
            q_rest = quantize_activation(ctx_test[:, 1:], jnp.int32(bits), lo_rest, hi_rest) @ w
            q_bos = jnp.concatenate([ref[:, :1], q_rest], axis=1)
            denom = float(jnp.mean(ref**2))
            plain_err.append(float(jnp.mean((q_plain - ref) ** 2)) / denom)
            bos_err.append(float(jnp.mean((q_bos - ref) ** 2)) / denom)
        rows[f"A{bits}"] = {
            "layers": len(names),
            "plain_rel_mse": float(np.mean(plain_err)),
            "bos_aware_rel_mse": float(np.mean(bos_err)),
            "reduction": float(np.mean(plain_err) / max(np.mean(bos_err), 1e-30)),
        }
    report["to_k_to_v_input_quantization"] = rows
    print(json.dumps(report, indent=2))


def _names(pipe):
    from mixdq_jax.quant.registry import unet_layers  # noqa: PLC0415

    return [layer.name for layer in unet_layers(pipe.unet.config)]


if __name__ == "__main__":
    main()
